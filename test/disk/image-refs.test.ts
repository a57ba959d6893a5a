/**
 * vmvault's own reading of image headers: the format a disk's first bytes claim and
 * the files its metadata names, checked against images made by real qemu-img.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { fileReader, imageReferences, isProtocolName, isVmdkDescriptor, probeFormat } from '../../src/disk/image-refs.js';
import { exportImage, snapshotCreate, snapshotDelete, snapshotList } from '../../src/disk/qemu.js';
import { tempDir } from '../helpers/images.js';

const dir = await tempDir('vmvault-refs-');
const MiB = 1024 * 1024;

async function read(file: string) {
  const fh = await open(file, 'r');
  const r = fileReader(fh);
  return { probe: await probeFormat(r), refs: (format: 'qcow2' | 'vmdk' | 'raw' | 'vdi') => imageReferences(r, format, file.split('/').pop()!), close: () => fh.close() };
}

describe('image headers', () => {
  test('images qemu-img makes are recognised, and plain ones name nothing', async () => {
    for (const format of ['qcow2', 'vmdk', 'vdi', 'raw'] as const) {
      const file = join(dir.path, `plain.${format}`);
      await execa('qemu-img', ['create', '-q', '-f', format, file, `${MiB}`]);
      const r = await read(file);
      try {
        assert.deepEqual(r.probe, { format });
        assert.deepEqual(await r.refs(format), []);
      } finally {
        await r.close();
      }
    }
  });

  test('a qcow2 backing file with its format, a data file, a flat vmdk extent and a vmdk parent are all named', async () => {
    const base = join(dir.path, 'base.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, `${MiB}`]);
    const top = join(dir.path, 'top.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const withData = join(dir.path, 'data.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir.path, 'data.bin')}`, withData, `${MiB}`]);
    const flat = join(dir.path, 'flat.vmdk');
    await execa('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', flat, `${MiB}`]);
    const vbase = join(dir.path, 'vbase.vmdk');
    await execa('qemu-img', ['create', '-q', '-f', 'vmdk', vbase, `${MiB}`]);
    const child = join(dir.path, 'child.vmdk');
    await execa('qemu-img', ['create', '-q', '-f', 'vmdk', '-b', vbase, '-F', 'vmdk', child]);
    const cases: [string, 'qcow2' | 'vmdk', unknown][] = [
      [top, 'qcow2', [{ kind: 'backing file', name: base, format: 'qcow2' }]],
      [withData, 'qcow2', [{ kind: 'data file', name: join(dir.path, 'data.bin') }]],
      [flat, 'vmdk', [{ kind: 'vmdk extent', name: 'flat-flat.vmdk' }]],
      [child, 'vmdk', [{ kind: 'vmdk parent', name: vbase }]],
    ];
    for (const [file, format, want] of cases) {
      const r = await read(file);
      try {
        assert.deepEqual(r.probe, { format });
        assert.deepEqual(await r.refs(format), want, file);
      } finally {
        await r.close();
      }
    }
  });

  test('a qcow2 export never opens its backing file unless allowed (the second lock behind the inspection)', async () => {
    const base = join(dir.path, 'lock-base.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, `${MiB}`]);
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5e 0 64k', base]);
    const top = join(dir.path, 'lock-top.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    for (const allowBacking of [false, true]) {
      const exp = await exportImage(top, { format: 'qcow2', readOnly: true, allowBacking });
      try {
        const buf = Buffer.alloc(65536);
        await exp.client.readInto(0, buf);
        assert.equal(buf.every((b) => b === 0x5e), allowBacking, `allowBacking ${allowBacking}`);
        if (!allowBacking) assert.ok(buf.every((b) => b === 0));
      } finally {
        await exp.close();
      }
    }
  });

  test('internal snapshots are made and listed without opening a backing file', async () => {
    const img = join(dir.path, 'snap-top.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', img, `${MiB}`]);
    // A backing file qemu could not open: any attempt to open it fails the command.
    await execa('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-F', 'raw', '-b', join(dir.path, 'no-such-backing'), img]);
    await snapshotCreate(img, 'vmvault-test');
    assert.deepEqual((await snapshotList(img)).map((x) => x.name), ['vmvault-test']);
    await snapshotDelete(img, 'vmvault-test');
    assert.deepEqual(await snapshotList(img), []);
  });

  test("vmdk descriptors are recognised by qemu's rule: comments and blank lines, then version=", () => {
    assert.ok(isVmdkDescriptor(Buffer.from('# Disk DescriptorFile\nversion=1\n')));
    assert.ok(isVmdkDescriptor(Buffer.from('# anything\n   \nversion=3\r\n')));
    assert.ok(isVmdkDescriptor(Buffer.from('version=2\n')));
    assert.ok(!isVmdkDescriptor(Buffer.from('#\nCID=1\nversion=1\n')));
    assert.ok(!isVmdkDescriptor(Buffer.from('version=4\n')));
    assert.ok(!isVmdkDescriptor(Buffer.alloc(512)));
  });

  test('protocol names are told from file names', () => {
    for (const p of ['nbd:localhost:10809', 'json:{"driver":"file"}', 'http://x/y', 'nbd+unix:///e?socket=/s', 'file:x']) assert.ok(isProtocolName(p), p);
    for (const p of ['/var/lib/a:b.qcow2', 'base.qcow2', './a:b', '../x.raw']) assert.ok(!isProtocolName(p), p);
  });

  test('foreign formats are named, not read as raw', async () => {
    for (const [name, magic] of [['vhdx', 'vhdxfile'], ['vpc (vhd)', 'conectix'], ['qed', 'QFI\0']] as const) {
      const r = await probeFormat(async (pos, len) => Buffer.concat([Buffer.from(magic, 'latin1'), Buffer.alloc(512)]).subarray(pos, pos + len));
      assert.deepEqual(r, { foreign: name });
    }
  });
});

after(() => dir.cleanup());

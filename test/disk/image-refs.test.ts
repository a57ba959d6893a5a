/**
 * vmvault's own reading of image headers: the format a disk's first bytes claim and
 * the files its metadata names, checked against images made by real qemu-img.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { mkdir, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileReader, imageReferences, isProtocolName, isVmdkDescriptor, probeFormat } from '../../src/disk/image-refs.js';
import { inspectDisk } from '../../src/disk/inspect.js';
import { exportImage, snapshotCreate, snapshotDelete, snapshotList } from '../../src/disk/qemu.js';
import { VmvaultError } from '../../src/errors.js';
import { hostSecret, qemuVmdkNames, sparseVmdkOfCapacity0, vmdkDescriptor } from '../helpers/hostile.js';
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

  test('a qcow2 backing file name at an offset past any file is named, not read (found by refs-fuzz)', async () => {
    const base = join(dir.path, 'far-base.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, `${MiB}`]);
    const file = join(dir.path, 'far-top.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'far-base.qcow2', '-F', 'qcow2', file]);
    const img = await readFile(file);
    img.writeBigUInt64BE(0xffffffffffffffffn, 8); // backing_file_offset; its size stays 14
    await writeFile(file, img);
    // qemu refuses the image; Node would have read such a position from elsewhere in the file.
    assert.match((await execa('qemu-img', ['info', '-f', 'qcow2', file], { reject: false })).stderr, /Invalid backing file offset/);
    const positions: number[] = [];
    const fh = await open(file, 'r');
    try {
      const fr = fileReader(fh);
      const refs = await imageReferences(async (position, length) => { positions.push(position); return fr(position, length); }, 'qcow2', 'far-top.qcow2');
      assert.deepEqual(refs, [{ kind: 'backing file', name: '(backing file name of 14 bytes at offset 18446744073709551615)', format: 'qcow2' }]);
      assert.ok(positions.every((p) => Number.isSafeInteger(p)), `read at ${positions.join(', ')}`);
    } finally {
      await fh.close();
    }
  });

  test('the file reader every image parser uses refuses a position Node would read from elsewhere (past 2^53), and negative ones', async () => {
    const file = join(dir.path, 'positions.raw');
    await writeFile(file, Buffer.alloc(4096, 7));
    const fh = await open(file, 'r');
    try {
      const read = fileReader(fh);
      assert.equal((await read(4000, 200)).length, 96, 'a read past the end is short, as before');
      for (const [at, n] of [[2 ** 53 + 2, 14], [Number(0xffffffffffffffffn), 14], [-512, 14], [0, -1], [1.5, 4]] as const) {
        await assert.rejects(read(at, n), (err: unknown) => err instanceof VmvaultError && err.code === 'UNSAFE_IMAGE' && /damaged or crafted/.test(err.message), `read(${at}, ${n})`);
      }
    } finally {
      await fh.close();
    }
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

/** A qemu-img-made monolithicSparse image whose embedded descriptor has `edit` applied (within its 20 sectors). */
async function editedSparseVmdk(name: string, edit: (desc: string) => string, create: string[] = []): Promise<string> {
  const file = join(dir.path, name);
  await execa('qemu-img', ['create', '-q', '-f', 'vmdk', ...create, file, ...(create.length ? [] : [`${MiB}`])]);
  const img = await readFile(file);
  const area = img.subarray(512, 512 + 20 * 512);
  const desc = area.subarray(0, area.indexOf(0)).toString('latin1');
  const edited = Buffer.from(edit(desc), 'latin1');
  assert.ok(edited.length < area.length);
  area.fill(0);
  edited.copy(area);
  await writeFile(file, img);
  return file;
}

async function vmdkRefs(file: string) {
  const r = await read(file);
  try {
    return await r.refs('vmdk');
  } finally {
    await r.close();
  }
}

describe('vmdk: every file qemu would open is named', { timeout: 120_000 }, () => {
  test('a sparse vmdk of capacity 0 has its descriptor opened as a descriptor file, extents and all; a normal one does not', async () => {
    const secret = await hostSecret(dir.path);
    const desc = vmdkDescriptor(`RW 2048 FLAT "${secret.path}" 0`);
    const hostile = join(dir.path, 'capacity0.vmdk');
    await writeFile(hostile, sparseVmdkOfCapacity0(desc));
    // The trap is real: qemu reads the host's file as the disk.
    assert.deepEqual(await qemuVmdkNames(hostile), [secret.path]);
    const r = await read(hostile);
    try {
      assert.deepEqual(r.probe, { format: 'vmdk' });
      assert.deepEqual(await r.refs('vmdk'), [{ kind: 'vmdk extent', name: secret.path }]);
    } finally {
      await r.close();
    }
    // The same extent line in a normal sparse vmdk's descriptor: qemu ignores it, and so does vmvault.
    const normal = await editedSparseVmdk('normal-sparse.vmdk', (d) => d.replace('# Extent description\n', `# Extent description\nRW 2048 FLAT "${secret.path}" 0\n`));
    assert.deepEqual(await qemuVmdkNames(normal), []);
    assert.deepEqual(await vmdkRefs(normal), []);
  });

  test("extent lines and parent hints as qemu's sscanf and strstr read them are named", async () => {
    const gone = (k: string) => join(dir.path, `gone-${k}`);
    const cases: [string, Buffer][] = [
      ['signed', vmdkDescriptor(`RW +2048 FLAT "${gone('signed')}" 0`)],
      ['no-space', vmdkDescriptor(`RW 2048FLAT "${gone('no-space')}" 0`)],
      ['over-lines', vmdkDescriptor(`RW\n2048\n\nFLAT\n"${gone('over-lines')}" 0`)],
      ['unterminated', vmdkDescriptor(`RW 2048 SPARSE "${gone('unterminated')}`)],
      ['ten-letter-type', vmdkDescriptor(`RW 2048 VMFSSPARSE"${gone('ten-letter-type')}"`)],
      ['c-spaces', vmdkDescriptor(`\t RW\v2048\fFLAT\r"${gone('c-spaces')}" 0\r`)],
      ['vmfs', vmdkDescriptor(`RW 2048 VMFS "${gone('vmfs')}"`)],
      ['parent-in-comment', vmdkDescriptor(`#parentFileNameHint="${gone('parent-in-comment')}"\nRW 2048 FLAT "self.vmdk" 0`)],
      ['parent-mid-line', vmdkDescriptor(`ddb.note = "x" parentFileNameHint="${gone('parent-mid-line')}"\nRW 2048 FLAT "self.vmdk" 0`)],
    ];
    const files: [string, string][] = [];
    for (const [k, bytes] of cases) {
      const sub = join(dir.path, `case-${k}`);
      await mkdir(sub);
      const file = join(sub, 'self.vmdk'); // extents naming self.vmdk are the image itself
      await writeFile(file, bytes);
      files.push([k, file]);
    }
    files.push(['capacity0-plus', join(dir.path, 'capacity0-plus.vmdk')]);
    await writeFile(files.at(-1)![1], sparseVmdkOfCapacity0(vmdkDescriptor(`RW +2048 FLAT "${gone('capacity0-plus')}" 0`)));
    // A sparse vmdk's parent is read at 0x200 whatever its header says of its descriptor.
    const vbase = join(dir.path, 'hint-base.vmdk');
    await execa('qemu-img', ['create', '-q', '-f', 'vmdk', vbase, `${MiB}`]);
    const child = await editedSparseVmdk('hint-child.vmdk', (d) => d.replace(vbase, gone('sparse-parent')), ['-b', vbase, '-F', 'vmdk']);
    const img = await readFile(child);
    img.writeBigUInt64LE(0n, 28);
    await writeFile(child, img);
    files.push(['sparse-parent', child]);

    for (const [k, file] of files) {
      // qemu opens (or, for a parent, names) the file: the case is one qemu really follows.
      assert.deepEqual(await qemuVmdkNames(file), [gone(k)], k);
      assert.deepEqual((await vmdkRefs(file)).map((r) => r.name), [gone(k)], k);
    }
  });
});

describe('inspectDisk refuses a hostile vmdk before qemu opens what it names', { timeout: 120_000 }, () => {
  // A FIFO: had qemu opened it, the inspection would block (until qemu-img info is stopped).
  const refusal = (name: string) => (err: unknown): boolean => {
    assert.ok(err instanceof VmvaultError, String(err));
    assert.equal(err.code, 'UNSAFE_IMAGE', err.message);
    assert.ok(err.message.includes(`names another file: vmdk extent "${name}"`), err.message);
    assert.match(err.message, /--format raw/);
    assert.match(err.message, /if it is a vmdk made of extent files you trust, set allowChain: true for it \(--allow-chain\)/);
    assert.doesNotMatch(err.message, /backing file/);
    return true;
  };

  test('capacity 0 and a signed sector count, naming a FIFO, are refused; vmdks qemu-img makes are read as before', async () => {
    const fifo = join(dir.path, 'extent-fifo');
    await execa('mkfifo', [fifo]);
    const capacity0 = join(dir.path, 'fifo-capacity0.vmdk');
    await writeFile(capacity0, sparseVmdkOfCapacity0(vmdkDescriptor(`RW 2048 FLAT "${fifo}" 0`)));
    const signed = join(dir.path, 'fifo-signed.vmdk');
    await writeFile(signed, vmdkDescriptor(`RW +2048 FLAT "${fifo}" 0`));
    for (const file of [capacity0, signed]) {
      await assert.rejects(inspectDisk({ path: file }), refusal(fifo), file);
      await assert.rejects(inspectDisk({ path: file, format: 'vmdk' }), refusal(fifo), file);
    }

    const sparse = join(dir.path, 'made-sparse.vmdk');
    await execa('qemu-img', ['create', '-q', '-f', 'vmdk', sparse, `${MiB}`]);
    const s = await inspectDisk({ path: sparse });
    assert.deepEqual([s.format, s.formatSource, s.virtualSize, s.chain], ['vmdk', 'detected', MiB, []]);
    const flat = join(dir.path, 'made-flat.vmdk');
    await execa('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', flat, `${MiB}`]);
    await assert.rejects(inspectDisk({ path: flat }), refusal('made-flat-flat.vmdk'));
    const f = await inspectDisk({ path: flat, allowChain: true });
    assert.deepEqual([f.format, f.virtualSize, f.chain], ['vmdk', MiB, [join(dir.path, 'made-flat-flat.vmdk')]]);
  });
});

after(() => dir.cleanup());

/**
 * A guest never chooses what the host reads: raw disks whose guests wrote headers
 * naming a host file (qcow2 backing file, qcow2 data file, vmdk extent, protocol
 * filename), backed up through the real CLI with real qemu tools on the directory
 * backend. Declared raw: backed up as raw, byte-identical. Undeclared: refused with
 * an error naming the file. Never a byte of the host's file in the repository.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { compareImages } from '../../src/disk/qemu.js';
import { BIN, cli, cliJson } from '../helpers/cli.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { GUEST_WRITES, TRAPS, hostSecret, qemuWouldFollow, trappedRawDisk } from '../helpers/hostile.js';
import { backupJson, e2eFile, initRepo } from './harness.js';

const MiB = 1024 * 1024;
const { all, work } = await e2eFile('vmvault-hostile-');
const local = all.find((b) => b.name === 'local')!;

/** Restores a backup's only disk as raw and returns its path. */
async function restoreRaw(env: Record<string, string | undefined>, id: string, to: string): Promise<string> {
  const r = await cliJson(['restore', id, '--to', to, '--format', 'raw'], env);
  return r.files.find((f: any) => f.kind === 'disk').path;
}

describe('hostile guest disks', () => {
  for (const trap of TRAPS) {
    test(`${trap}: declared raw is backed up as raw and identical; undeclared is refused naming the file`, async () => {
      const { env } = await initRepo(local);
      const secret = await hostSecret(work);
      const disk = await trappedRawDisk(work, `guest-${trap.replaceAll(' ', '-')}.raw`, trap, secret.path);
      // The trap is real: left to probe, qemu takes the disk for an image naming the host's file.
      assert.match(await qemuWouldFollow(disk), /qcow2|vmdk/);

      const made = await backupJson(env, 'guest', [disk], ['--format', 'raw']);
      assert.equal(made.disks[0].format, 'raw');
      const out = await restoreRaw(env, made.id, join(work, `out-${made.id.slice(0, 8)}`));
      const cmp = await compareImages(disk, out, 'raw', 'raw');
      assert.ok(cmp.identical, cmp.output);
      const restored = await readFile(out);
      assert.equal(restored.indexOf(secret.marker), -1, 'the restored disk holds bytes of the host file');
      assert.ok(restored.subarray(8 * MiB, 9 * MiB).every((b) => b === GUEST_WRITES[0]!.pattern), "the guest's own data is missing");

      const refused = await cli(['backup', '--vm', 'guest2', '--disk', disk, '--json'], env);
      assert.notEqual(refused.code, 0, refused.stdout);
      assert.match(refused.stderr, /names another file/);
      assert.ok(refused.stderr.includes(secret.path), `the error names the file: ${refused.stderr}`);
      assert.match(refused.stderr, /format: raw|--format raw/);
      const listed = await cliJson(['backups', '--vm', 'guest2'], env);
      assert.deepEqual(listed, [], 'a refused backup commits nothing');
    });
  }

  test('a disk detected raw is pinned: a later qcow2 header is refused until the format is declared', async () => {
    const { env } = await initRepo(local);
    const disk = await makeImage(work, 'pinned.raw', 'raw', 16 * MiB, [{ offset: MiB, length: MiB, pattern: 0x33 }]);
    const first = await backupJson(env, 'pin', [`root=${disk}`]);
    assert.equal(first.disks[0].format, 'raw');
    const shown = await cliJson(['show', first.id], env);
    assert.equal(shown.disks[0].formatSource, 'detected');
    // The guest writes a harmless-looking qcow2 header (no backing file) onto its raw disk.
    const hdr = await makeImage(work, 'plain-hdr.qcow2', 'qcow2', 16 * MiB);
    await execa('dd', [`if=${hdr}`, `of=${disk}`, 'conv=notrunc', 'status=none']);
    const refused = await cli(['backup', '--vm', 'pin', '--disk', `root=${disk}`], env);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /disk "root" .* was raw and now looks like qcow2: set its format in the inventory/);
    // A header of a format vmvault does not read: the pin still speaks first, never advice to convert the guest's data.
    const foreign = Buffer.from('QFI\xfb\0\0\0\x01', 'latin1');
    await execa('dd', [`of=${disk}`, 'conv=notrunc', 'status=none'], { input: foreign });
    const alien = await cli(['backup', '--vm', 'pin', '--disk', `root=${disk}`], env);
    assert.notEqual(alien.code, 0);
    assert.match(alien.stderr, /disk "root" .* was raw and now looks like qcow version 1: set its format in the inventory \(format: raw/);
    assert.doesNotMatch(alien.stderr, /convert/);
    const declared = await backupJson(env, 'pin', [`root=${disk}`], ['--format', 'raw']);
    assert.equal(declared.disks[0].format, 'raw');
    const again = await cliJson(['show', declared.id], env);
    assert.equal(again.disks[0].formatSource, 'declared');
    const out = await restoreRaw(env, declared.id, join(work, 'pinned-out'));
    assert.ok((await compareImages(disk, out, 'raw', 'raw')).identical);
  });

  test('a linked clone is read flattened only with --allow-chain, and its chain is recorded', async () => {
    const { env } = await initRepo(local);
    const base = await makeImage(work, 'base.qcow2', 'qcow2', 16 * MiB, [{ offset: 0, length: 2 * MiB, pattern: 0x41 }]);
    const clone = join(work, 'clone.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', clone]);
    await writePattern(clone, 'qcow2', 4 * MiB, MiB, 0x42);
    const refused = await cli(['backup', '--vm', 'clone', '--disk', clone], env);
    assert.notEqual(refused.code, 0);
    assert.ok(refused.stderr.includes(`backing file "${base}"`), refused.stderr);
    const made = await backupJson(env, 'clone', [clone], ['--format', 'qcow2', '--allow-chain']);
    const shown = await cliJson(['show', made.id], env);
    assert.deepEqual(shown.disks[0].chain, [base]);
    const out = await cliJson(['restore', made.id, '--to', join(work, 'clone-out'), '--format', 'qcow2'], env);
    const disk = out.files.find((f: any) => f.kind === 'disk').path;
    assert.ok((await compareImages(clone, disk, 'qcow2', 'qcow2')).identical, 'the clone restores flattened');
    const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', '-f', 'qcow2', disk])).stdout);
    assert.equal(info['backing-filename'], undefined, 'the restored image has no backing file');

    // Even an allowed chain never follows a protocol name.
    const secret = await hostSecret(work);
    const proto = await trappedRawDisk(work, 'proto.raw', 'protocol filename', secret.path);
    const r = await cli(['backup', '--vm', 'proto', '--disk', proto, '--format', 'qcow2', '--allow-chain'], env);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /json:/);
  });

  test('a FIFO, a directory or a character device given as a disk is refused before any qemu tool runs', async () => {
    const { env } = await initRepo(local);
    const fifo = join(work, 'a-fifo');
    await execa('mkfifo', [fifo]);
    for (const [path, kind] of [[fifo, 'a FIFO (named pipe)'], [work, 'a directory'], ['/dev/zero', 'a character device']] as const) {
      const r = await execa(process.execPath, [BIN, 'backup', '--vm', 'x', '--disk', path, '--format', 'raw'],
        { env, reject: false, timeout: 20_000, stdin: 'ignore' });
      assert.equal(r.timedOut, false, `${kind}: the backup hung`);
      assert.notEqual(r.exitCode, 0);
      assert.ok(String(r.stderr).includes(`is ${kind}, not a disk image`), String(r.stderr));
    }
  });

  test('--format applies to the --disk before it and is refused before any --disk', async () => {
    const { env } = await initRepo(local);
    const r = await cli(['backup', '--vm', 'x', '--format', 'raw', '--disk', '/nonexistent'], env);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /--format applies to the --disk given before it/);
  });
});

/**
 * A full repository cleans itself: on a small tmpfs filled by a failed backup (and
 * topped up, to the last page, by the unreferenced chunks such runs leave), `gc` frees
 * the space without help, though its lock does not fit at first; the next backup and
 * `verify --read-data` pass. And temporary files of killed writers are swept by gc.
 * The directory backend only: S3 has neither a full disk nor temporary files.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm, rmdir, stat, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { LocalStorage } from '../../src/storage/local.js';
import { chunkName } from '../../src/repo/chunk.js';
import { writeRefusal } from '../../src/storage/refusal.js';
import { compareImages } from '../../src/disk/qemu.js';
import { makeImage } from '../helpers/images.js';
import { cli, cliJson } from '../helpers/cli.js';
import { e2eFile, backupJson, envFor, initRepo, objects, PASSWORD } from './harness.js';
import { readOnlyDir } from '../helpers/read-only-dir.js';

const MiB = 1024 * 1024;
const { all, work } = await e2eFile('vmvault-full-');
const local = all.find((b) => b.name === 'local')!;

/** A tmpfs of `size` bytes (mount needs root: without it this fails, it does not skip). */
async function smallDisk(size: number): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-tmpfs-'));
  await execa('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir]);
  after(async () => {
    await execa('umount', [dir]);
    await rmdir(dir);
  });
  return dir;
}

async function randomRaw(name: string, size: number): Promise<string> {
  const file = join(work, name);
  await writeFile(file, randomBytes(size));
  return file;
}

/** Writes unreferenced chunk objects, each size until none fits: the disk is then full to the last page. */
async function fillWithOrphans(repo: string): Promise<number> {
  const storage = new LocalStorage(repo);
  let n = 0;
  for (const size of [MiB, 64 * 1024, 4096, 1]) {
    for (;;) {
      try {
        await storage.put(chunkName(randomBytes(32).toString('hex')), randomBytes(size));
        n++;
      } catch (err) {
        if (writeRefusal(err) === 'full') break;
        throw err;
      }
    }
  }
  return n;
}

describe('a full repository', () => {
  test('gc frees the space of a failed backup by itself; the next backup and verify --read-data pass', async () => {
    const disk = await smallDisk(20 * MiB);
    const repo = join(disk, 'repo');
    const env = envFor(local, repo);
    const init = await cli(['init', '--kdf', 'weak'], env);
    assert.equal(init.code, 0, init.stderr);
    const kept = await randomRaw('kept.raw', 4 * MiB);
    const first = await backupJson(env, 'kept', [kept]);

    const big = await randomRaw('big.raw', 32 * MiB);
    const failed = await cli(['backup', '--vm', 'big', '--disk', big], env);
    assert.equal(failed.code, 1, failed.stderr);
    assert.match(failed.stderr, /full/);
    const orphans = await fillWithOrphans(repo);
    const chunksBefore = [...(await objects(repo)).keys()].filter((n) => n.startsWith('chunks/'));
    await assert.rejects(writeFile(join(repo, 'probe'), 'x'), /ENOSPC/, 'the disk is full to the last page');

    const gc = await cli(['gc', '--json'], env);
    assert.equal(gc.code, 0, gc.stderr);
    const report = JSON.parse(gc.stdout);
    assert.equal(report.chunksDeleted, chunksBefore.length - 1, `every chunk but the kept backup's (${orphans} orphans written)`);
    assert.equal(report.backups, 1);

    const next = await randomRaw('next.raw', 8 * MiB);
    const made = await backupJson(env, 'next', [next]);
    assert.equal(made.stats.chunksNew, 2);
    const v = await cli(['verify', '--read-data'], env);
    assert.equal(v.code, 0, v.stdout + v.stderr);
    const out = join(work, 'kept-out');
    const r = await cliJson(['restore', first.id, '--to', out], env);
    const cmp = await compareImages(kept, r.files[0].path, 'raw', 'raw');
    assert.ok(cmp.identical, cmp.output);
  });

  test('gc sweeps the temporary files of killed writers, and leaves young ones to the puts still under way', async () => {
    const repo = await local.newRepo();
    const env = envFor(local, repo);
    assert.equal((await cli(['init', '--kdf', 'weak'], env)).code, 0);
    const img = await makeImage(work, 'tmp.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: 2 * MiB, pattern: 0x61 }]);
    await backupJson(env, 'tmp', [img]);
    await mkdir(join(repo, 'chunks', 'ab'), { recursive: true });
    const old = [join(repo, 'chunks', 'ab', '.tmp-0123456789abcdef'), join(repo, 'locks', '.tmp-00112233aabbccdd'), join(repo, '.tmp-feedfacecafebeef')];
    const young = join(repo, 'backups', '.tmp-fedcba9876543210');
    await mkdir(join(repo, 'locks'), { recursive: true });
    await mkdir(join(repo, 'backups'), { recursive: true });
    const hourAgo = new Date(Date.now() - 3600_000);
    for (const f of old) {
      await writeFile(f, randomBytes(100_000));
      await utimes(f, hourAgo, hourAgo);
    }
    await writeFile(young, randomBytes(10));
    const report = await cliJson(['gc'], env);
    assert.equal(report.tempFilesDeleted, 3);
    assert.equal(report.tempBytesDeleted, 300_000);
    for (const f of old) await assert.rejects(stat(f), /ENOENT/);
    await stat(young);
    assert.equal(report.chunksDeleted, 0);
    const v = await cli(['verify', '--read-data'], env);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });

  test('a restore onto a full, then read-only, file system says so and what to do, and leaves nothing behind', async () => {
    const { env } = await initRepo(local);
    const raw = await randomRaw('restore-target.raw', 2 * MiB);
    const made = await backupJson(env, 'rt', [raw], ['--format', 'raw']);
    const small = await smallDisk(512 * 1024);
    const full = await cli(['restore', made.id, '--to', join(small, 'out'), '--format', 'raw'], env);
    assert.equal(full.code, 1, full.stderr);
    assert.match(full.stderr, /^vmvault: error: cannot restore into .*\/out: its file system is full: free some space there, or restore into another directory \(.*ENOSPC.*\); the partly written files were removed/);
    assert.deepEqual(await readdir(small), [], 'no partial file left, nor the directory the restore made');
    const ro = await readOnlyDir(small);
    try {
      const refused = await cli(['restore', made.id, '--to', join(ro.path, 'new', 'dir'), '--format', 'raw'], env);
      assert.equal(refused.code, 1, refused.stderr);
      assert.match(refused.stderr, /^vmvault: error: cannot restore into .*\/new\/dir: its file system is read-only: remount it read-write, or restore into another directory \(.*EROFS.*\); nothing was written/);
    } finally {
      await ro.release();
    }
  });

  test('a restore to qcow2, vmdk or vdi onto a full, then read-only, file system says so as a raw one does, and removes the directory it made', async () => {
    const { env } = await initRepo(local);
    const raw = await randomRaw('restore-target-img.raw', 2 * MiB);
    const made = await backupJson(env, 'ri', [raw], ['--format', 'raw']);
    const small = await smallDisk(512 * 1024);
    const fullMessage = (to: string) => new RegExp(`^vmvault: error: cannot restore into ${to}: its file system is full: free some space there, or restore into another directory \\(.*(ENOSPC|No space left on device).*\\); the partly written files were removed`);
    for (const format of ['qcow2', 'vmdk', 'vdi']) {
      // Room for the image's header, not for its data: an NBD write fails.
      const to = join(small, format);
      const r = await cli(['restore', made.id, '--to', to, '--format', format], env);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, fullMessage(to), format);
      assert.deepEqual(await readdir(small), [], `${format}: the directory the restore made is gone`);
    }
    // No room for the header either: qemu-img create fails.
    await execa('sh', ['-c', `cat /dev/zero > ${join(small, 'filler')}`], { reject: false });
    const header = await cli(['restore', made.id, '--to', join(small, 'q'), '--format', 'qcow2'], env);
    assert.equal(header.code, 1, header.stderr);
    assert.match(header.stderr, fullMessage(join(small, 'q')));
    assert.deepEqual(await readdir(small), ['filler']);
    await rm(join(small, 'filler'));
    await mkdir(join(small, 'kept'));
    const ro = await readOnlyDir(small);
    try {
      const refused = await cli(['restore', made.id, '--to', join(ro.path, 'kept'), '--format', 'qcow2'], env);
      assert.equal(refused.code, 1, refused.stderr);
      assert.match(refused.stderr, /^vmvault: error: cannot restore into .*\/kept: (its file system is read-only: remount it read-write|permission denied: fix the permissions of that directory), or restore into another directory \(.*(EROFS|EACCES|Read-only file system|Permission denied).*\); the partly written files were removed/);
    } finally {
      await ro.release();
    }
    assert.deepEqual(await readdir(small), ['kept'], 'a directory the restore did not make stays');
  });
});

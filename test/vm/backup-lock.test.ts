/**
 * backupVm and the repository's shared lock. Whatever happens (a point in time that
 * cannot be taken, a repository locked by gc, a backup that succeeds), the lock is held
 * while the backup commits and given back after it, and the image is left as it was.
 * Real qcow2 images, real qemu-img.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { compareImages } from '../../src/disk/qemu.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { acquireLock, readLocks } from '../../src/repo/locks.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import { VmvaultError } from '../../src/errors.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;

/** The image's vmvault bitmaps and snapshots, read without a lock (-U). */
async function oursIn(file: string): Promise<{ bitmaps: string[]; snapshots: string[] }> {
  const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', '-U', '-f', 'qcow2', file])).stdout) as {
    snapshots?: { name: string }[]; 'format-specific': { data: { bitmaps?: { name: string }[] } };
  };
  const ours = (names: string[]) => names.filter((n) => n.startsWith('vmvault-'));
  return { bitmaps: ours((info['format-specific'].data.bitmaps ?? []).map((b) => b.name)), snapshots: ours((info.snapshots ?? []).map((x) => x.name)) };
}

describe('backupVm: the repository lock around the point in time', () => {
  let dir: TempDir;
  let repo: Repository;
  let img: string;

  before(async () => {
    dir = await tempDir();
    repo = await Repository.init(new LocalStorage(path.join(dir.path, 'repo')), 'pw', { kdf: 'weak' });
    img = await makeImage(dir.path, 'root.qcow2', 'qcow2', 16 * MiB, [{ offset: MiB, length: 3 * MiB, pattern: 0x41 }]);
  });
  after(async () => dir.cleanup());

  it('a point in time that cannot be taken fails with its own error and leaves no lock behind', async () => {
    const missing = path.join(dir.path, 'no-such-disk.qcow2');
    await assert.rejects(
      backupVm(repo, { vm: 'gone', driver: 'image', disks: [{ path: missing, format: 'qcow2' }] }),
      (err: Error) => err.message.includes(missing),
    );
    // A lock whose writing was under way when the point in time failed would appear a
    // moment after the failure: a backupVm that takes it early must give it back first.
    await sleep(500);
    assert.deepEqual(await readLocks(repo), [], 'the lock taken beside the point in time was given back');
  });

  it('a repository locked by gc fails with LOCKED: the image keeps no snapshot or bitmap of it, and only gc\'s lock remains', async () => {
    const gc = await acquireLock(repo, 'exclusive', { purpose: 'gc' });
    try {
      await assert.rejects(
        backupVm(repo, { vm: 'v', driver: 'image', disks: [{ path: img, format: 'qcow2' }] }),
        (err: unknown) => err instanceof VmvaultError && err.code === 'LOCKED' && /locked \(exclusive lock for gc/.test(err.message),
      );
      assert.deepEqual(await oursIn(img), { bitmaps: [], snapshots: [] }, 'the point in time was given back');
      assert.deepEqual((await readLocks(repo)).map((l) => l.id), [gc.id]);
    } finally {
      await gc.release();
    }
  });

  it('a backup holds its shared lock until it has committed, gives it back after, and restores identical', async () => {
    let locksAtCommit: string[] = [];
    const r = await backupVm(repo, {
      vm: 'v', driver: 'image', disks: [{ path: img, format: 'qcow2' }],
      beforeCommit: async () => { locksAtCommit = (await readLocks(repo)).map((l) => `${l.lock?.kind} ${l.lock?.purpose}`); },
    });
    assert.deepEqual(locksAtCommit, ['shared backup of v']);
    assert.deepEqual(await readLocks(repo), []);
    assert.deepEqual(await oursIn(img), { bitmaps: [r.manifest.disks[0]!.bitmap!], snapshots: [] });
    const out = path.join(dir.path, 'out');
    await restore(repo, { backupId: r.manifest.id, to: out, format: 'qcow2' });
    const cmp = await compareImages(img, path.join(out, 'root.qcow2'), 'qcow2', 'qcow2');
    assert.ok(cmp.identical, cmp.output);
  });
});

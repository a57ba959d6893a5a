/**
 * The image driver gives back the instant it read from as soon as the backup has read
 * everything (PointInTime.read): the internal snapshot is deleted while the backup
 * commits, not after, while change tracking (the new bitmap) is settled only at close.
 * On real qcow2 images with real qemu-img; the backup restores identical.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { execa } from 'execa';
import { compareImages, imageCheck, snapshotList } from '../../src/disk/qemu.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import { openImages } from '../../src/vm/image-driver.js';
import { newBackupId } from '../../src/pipeline/backup.js';
import { ChunkPool, type PoolLease } from '../../src/pipeline/pool.js';
import { readFile, writeFile } from 'node:fs/promises';
import { holdImageLock, makeImage, qemuIo, tempDir, verifyPatterns, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';

const MiB = 1024 * 1024;

/**
 * The image's bitmaps and snapshots, read without a lock (-U): a locking reader would
 * make the driver's own `qemu-img snapshot -d` fail while it looks.
 */
async function infoOf(file: string): Promise<{ bitmaps: string[]; snapshots: string[] }> {
  const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', '-U', '-f', 'qcow2', file])).stdout) as {
    snapshots?: { name: string }[]; 'format-specific': { data: { bitmaps?: { name: string }[] } };
  };
  return { bitmaps: (info['format-specific'].data.bitmaps ?? []).map((b) => b.name), snapshots: (info.snapshots ?? []).map((x) => x.name) };
}
const bitmapsOf = async (file: string) => (await infoOf(file)).bitmaps;

const ours = (names: string[]) => names.filter((n) => n.startsWith('vmvault-'));

/** Restores `backupId` into `out` as `format` and compares the disk with `img`. */
async function restoresIdentical(repo: Repository, backupId: string, img: string, out: string, format: 'qcow2' | 'raw'): Promise<void> {
  await restore(repo, { backupId, to: out, format });
  const cmp = await compareImages(img, path.join(out, `${path.basename(img, '.qcow2')}.${format}`), 'qcow2', format);
  assert.ok(cmp.identical, cmp.output);
}

describe('image driver: the snapshot goes once everything is read', () => {
  let dir: TempDir;
  let repo: Repository;

  before(async () => {
    dir = await tempDir();
    repo = await Repository.init(new LocalStorage(path.join(dir.path, 'repo')), 'pw', { kdf: 'weak' });
  });
  after(async () => dir.cleanup());

  it('deletes the snapshot before the manifest is written, keeps the new bitmap until close, and the backup restores identical', async () => {
    const img = await makeImage(dir.path, 'root.qcow2', 'qcow2', 16 * MiB, [
      { offset: 0, length: 5 * MiB, pattern: 0x31 },
      { offset: 9 * MiB, length: MiB, pattern: 0x32 },
    ]);
    let atCommit: { snapshots: string[]; bitmaps: string[] } | undefined;
    const r = await backupVm(repo, {
      vm: 'v', driver: 'image', disks: [{ path: img, format: 'qcow2' }],
      beforeCommit: async () => {
        // Without the early give-back the snapshot goes only after the commit: this would time out.
        await waitFor('the snapshot to be deleted before the commit', async () => ours((await infoOf(img)).snapshots).length === 0, 20_000);
        atCommit = await infoOf(img);
      },
    });
    const bitmap = r.manifest.disks[0]!.bitmap;
    assert.ok(bitmap, 'the backup left a bitmap for the next one');
    assert.deepEqual(ours(atCommit!.snapshots), []);
    assert.ok(atCommit!.bitmaps.includes(bitmap), 'the new bitmap is still there at the commit');
    // After close: no snapshot of ours, the committed backup's bitmap alone.
    assert.deepEqual(ours((await snapshotList(img)).map((s) => s.name)), []);
    assert.deepEqual(ours(await bitmapsOf(img)), [bitmap]);

    await restoresIdentical(repo, r.manifest.id, img, path.join(dir.path, 'out'), 'qcow2');
  });

  it('an incremental reads the changes from the bitmap in the image file, starting no qemu-nbd, and restores identical', async () => {
    const img = await makeImage(dir.path, 'inc.qcow2', 'qcow2', 32 * MiB, [{ offset: 0, length: 12 * MiB, pattern: 0x51 }]);
    const first = await backupVm(repo, { vm: 'inc', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
    assert.equal(first.manifest.disks[0]!.mode, 'full');
    // Two regions change: one inside a chunk, one across two.
    await qemuIo(img, 'qcow2', ['write -P 0x52 5M 100k', 'write -P 0x53 15M 2M']);
    const pit = await openImages(repo, { vm: 'inc', disks: [{ path: img, format: 'qcow2' }] }, newBackupId());
    try {
      const d = pit.disks[0]!;
      assert.equal(d.mode, 'incremental', d.reason);
      assert.equal(d.connect, undefined, 'no NBD export serves this disk: its file is read');
      const dirty = await d.changes!.dirty(0, 32 * MiB);
      assert.deepEqual(dirty, [{ offset: 5 * MiB, length: 128 * 1024 }, { offset: 15 * MiB, length: 2 * MiB }]);
    } finally {
      await pit.close(false);
    }
    const second = await backupVm(repo, { vm: 'inc', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
    const entry = second.manifest.disks[0]!;
    assert.equal(entry.mode, 'incremental', entry.reason);
    // Chunks 1, 3 and 4 were read (their allocated parts: 4 MiB, then 1 MiB of each of the
    // others, the rest never written); chunks 0 and 2, data the bitmap calls clean, came from the first backup.
    assert.equal(second.manifest.stats.chunksUnchanged, 2);
    assert.equal(second.manifest.stats.bytesRead, 6 * MiB);
    await restoresIdentical(repo, second.manifest.id, img, path.join(dir.path, 'out-inc'), 'qcow2');
  });

  it('a linked clone whose backing file changed is read in full (its bitmap counts writes to the clone only), and restores as qemu reads it', async () => {
    const base = await makeImage(dir.path, 'base.qcow2', 'qcow2', 16 * MiB, [{ offset: 0, length: 4 * MiB, pattern: 0x11 }]);
    const top = path.join(dir.path, 'clone.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const disks = [{ path: top, format: 'qcow2' as const, allowChain: true }];
    const first = await backupVm(repo, { vm: 'clone', driver: 'image', disks });
    assert.deepEqual(first.manifest.disks[0]!.chain, [base]);
    assert.equal(first.manifest.disks[0]!.chainStamps?.length, 1);
    // Nothing written to the clone: its own bitmap stays clean. Unchanged base: nothing to read.
    const same = await backupVm(repo, { vm: 'clone', driver: 'image', disks });
    assert.equal(same.manifest.disks[0]!.mode, 'incremental', same.manifest.disks[0]!.reason);
    // The base changes in place (an updated template): the clone reads differently, its bitmap says nothing.
    await qemuIo(base, 'qcow2', ['write -P 0x22 0 4M']);
    const second = await backupVm(repo, { vm: 'clone', driver: 'image', disks });
    const entry = second.manifest.disks[0]!;
    assert.equal(entry.mode, 'full');
    assert.match(entry.reason!, /a file of the image's backing chain changed since backup/);
    await restoresIdentical(repo, second.manifest.id, top, path.join(dir.path, 'out-clone'), 'raw');
  });

  it('an image whose metadata is damaged (a data cluster with refcount 0) is read as it is and never written: no bitmap, no snapshot, guest data intact, restores as qemu read it', async () => {
    const img = await makeImage(dir.path, 'rc0.qcow2', 'qcow2', 16 * MiB, [{ offset: MiB, length: 64 * 1024, pattern: 0x5c }, { offset: 2 * MiB, length: 64 * 1024, pattern: 0x5d }]);
    // The refcount of the cluster holding guest data at 1 MiB set to 0: qemu would take it for its own metadata.
    const bytes = await readFile(img);
    const clusterBits = bytes.readUInt32BE(20);
    const l1 = Number(bytes.readBigUInt64BE(40));
    const refTable = Number(bytes.readBigUInt64BE(48));
    const mask = 0x00fffffffffffe00n;
    const l2 = Number(bytes.readBigUInt64BE(l1) & mask);
    const host = Number(bytes.readBigUInt64BE(l2 + (MiB >> clusterBits) * 8) & mask);
    const block = Number(bytes.readBigUInt64BE(refTable) & ~0x1ffn);
    bytes.writeUInt16BE(0, block + (host >> clusterBits) * 2);
    await writeFile(img, bytes);
    const before = path.join(dir.path, 'rc0-before.raw');
    await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, before]);
    const warnings: string[] = [];
    const r = await backupVm(repo, { vm: 'rc0', driver: 'image', disks: [{ path: img, format: 'qcow2' }], warn: (m: string) => warnings.push(m) });
    const entry = r.manifest.disks[0]!;
    assert.equal(entry.mode, 'full');
    assert.match(entry.reason!, /the image has \d+ metadata corruption\(s\) \(qemu-img check\): read as it is, without a snapshot or bitmap/);
    assert.equal(entry.bitmap, undefined);
    assert.ok(warnings.some((w) => /metadata corruption.*qemu-img check -r all on the copy/.test(w)), warnings.join('\n'));
    assert.deepEqual(await infoOf(img), { bitmaps: [], snapshots: [] }, 'nothing was written to the image');
    assert.equal(Buffer.compare(await readFile(img), bytes), 0, 'the image file is byte for byte as it was');
    await verifyPatterns(img, 'qcow2', [{ offset: MiB, length: 64 * 1024, pattern: 0x5c }]);
    await restore(repo, { backupId: r.manifest.id, to: path.join(dir.path, 'out-rc0'), format: 'raw' });
    assert.ok((await compareImages(before, path.join(dir.path, 'out-rc0', 'rc0.raw'), 'raw', 'raw')).identical);
    // An image a process holds (a VM started since it was inspected) is not "damaged": IMAGE_LOCKED, as a snapshot would say.
    const held = await makeImage(dir.path, 'held.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x61 }]);
    const release = await holdImageLock(held, 'qcow2');
    try {
      await assert.rejects(imageCheck(held), (e: Error & { code?: string }) => e.code === 'IMAGE_LOCKED');
    } finally {
      await release();
    }
    assert.deepEqual(await imageCheck(held), { corruptions: 0 });
  });

  it('a disk whose header claims more than a backup can hold (40 TiB in a few MiB of file) is refused before anything is read or changed', async () => {
    const huge = path.join(dir.path, 'huge.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', huge, '40T']);
    await assert.rejects(backupVm(repo, { vm: 'huge', driver: 'image', disks: [{ path: huge, format: 'qcow2' }] }), (e: Error & { code?: string }) =>
      e.code === 'UNSUPPORTED' && /VM "huge" has 10485760 chunks of 4 MiB in its disks \("huge" 40\.0 TiB\): one backup holds at most 7500000 \(28\.6 TiB .*vmvault init --chunk-size.*nothing was read/.test(e.message));
    assert.deepEqual(await infoOf(huge), { bitmaps: [], snapshots: [] }, 'no bitmap, no snapshot');
  });

  it('an unchanged disk is backed up without a snapshot or a new bitmap: the clean bitmap goes on counting, and the next change is caught', async () => {
    const img = await makeImage(dir.path, 'same.qcow2', 'qcow2', 16 * MiB, [{ offset: 2 * MiB, length: 5 * MiB, pattern: 0x61 }]);
    const first = await backupVm(repo, { vm: 'same', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
    const tracking = first.manifest.disks[0]!.bitmap!;
    let atCommit: { snapshots: string[]; bitmaps: string[] } | undefined;
    const second = await backupVm(repo, {
      vm: 'same', driver: 'image', disks: [{ path: img, format: 'qcow2' }],
      beforeCommit: async () => { atCommit = await infoOf(img); },
    });
    const entry = second.manifest.disks[0]!;
    assert.equal(entry.mode, 'incremental');
    assert.match(entry.reason ?? '', /unchanged since backup .* is clean/);
    assert.equal(entry.bitmap, tracking, 'the first backup\'s bitmap is the one that counts on');
    assert.deepEqual(ours(atCommit!.snapshots), [], 'no snapshot was taken');
    assert.deepEqual(ours(atCommit!.bitmaps), [tracking], 'no bitmap was added');
    assert.deepEqual(ours(await bitmapsOf(img)), [tracking]);
    assert.equal(second.manifest.stats.bytesRead, 0);
    assert.deepEqual(entry.chunks, first.manifest.disks[0]!.chunks);

    // A write after it is counted by that bitmap: the next backup reads it.
    await qemuIo(img, 'qcow2', ['write -P 0x62 9M 64k']);
    const third = await backupVm(repo, { vm: 'same', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
    assert.equal(third.manifest.disks[0]!.mode, 'incremental');
    assert.ok(third.manifest.stats.bytesRead > 0);
    assert.notEqual(third.manifest.disks[0]!.bitmap, tracking, 'a changed disk moves tracking to a new bitmap');
    await restoresIdentical(repo, third.manifest.id, img, path.join(dir.path, 'out-same'), 'raw');
  });

  it('a disk read without a snapshot refuses what was read once the image was written meanwhile', async () => {
    const img = await makeImage(dir.path, 'raced.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: 4 * MiB, pattern: 0x71 }]);
    await backupVm(repo, { vm: 'raced', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
    const pit = await openImages(repo, { vm: 'raced', disks: [{ path: img, format: 'qcow2' }] }, newBackupId());
    try {
      const d = pit.disks[0]!;
      assert.equal(d.snapshot, undefined, 'unchanged: no snapshot');
      await d.verifyRead!(); // nothing written yet
      await qemuIo(img, 'qcow2', ['write -P 0x72 1M 4k']);
      await assert.rejects(d.verifyRead!(), /was written to while this backup read it/);
    } finally {
      await pit.close(false);
    }
  });

  it('a backup that fails after reading still gives everything back: no snapshot, and its new bitmap removed', async () => {
    const img = await makeImage(dir.path, 'fail.qcow2', 'qcow2', 8 * MiB, [{ offset: MiB, length: 2 * MiB, pattern: 0x41 }]);
    await assert.rejects(backupVm(repo, {
      vm: 'f', driver: 'image', disks: [{ path: img, format: 'qcow2' }],
      beforeCommit: async () => { throw new Error('lost the job'); },
    }), /lost the job/);
    assert.deepEqual(ours((await snapshotList(img)).map((s) => s.name)), []);
    assert.deepEqual(ours(await bitmapsOf(img)), [], 'an uncommitted backup leaves no bitmap');
  });

  it('the chunk threads make their slots ready while a qcow2 point in time is taken; an unchanged qcow2 image, or raw image of undeclared format, starts none', async () => {
    /** A pool of the backup's own that records its warm-ups and when they came, released when the backup is done with it. */
    const recordingLease = (events: string[]): { lease: () => PoolLease; warmed: () => number; released: () => boolean } => {
      const pool = new ChunkPool(repo.workerInit());
      let warmed = 0;
      let released = false;
      const warm = pool.warm.bind(pool);
      pool.warm = (n?: number) => {
        warmed++;
        events.push('warm');
        return warm(n);
      };
      return { lease: () => ({ pool, release: async () => { released = true; await pool.close(); } }), warmed: () => warmed, released: () => released };
    };
    const img = await makeImage(dir.path, 'warm.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: 3 * MiB, pattern: 0x51 }]);
    const events: string[] = [];
    const q = recordingLease(events);
    const r = await backupVm(repo, {
      vm: 'warm', driver: 'image', disks: [{ path: img, format: 'qcow2' }], chunkPool: q.lease,
      beforeCommit: async () => { events.push('commit'); },
    });
    // Once by backupVm before the point in time, once more by backup() (which finds them ready): before the commit both.
    assert.deepEqual(events, ['warm', 'warm', 'commit']);
    assert.ok(q.released(), 'the pool is given back');
    await restoresIdentical(repo, r.manifest.id, img, path.join(dir.path, 'out-warm'), 'raw');

    // The same image again, unchanged: nothing to read, so no slot made and no thread started.
    const u = recordingLease([]);
    const same = await backupVm(repo, { vm: 'warm', driver: 'image', disks: [{ path: img, format: 'qcow2' }], chunkPool: u.lease });
    assert.equal(same.manifest.stats.bytesRead, 0);
    assert.equal(u.warmed(), 0, 'an unchanged qcow2 image starts no thread');
    assert.ok(u.released());

    // A raw image given without a format: pinned raw by its first backup, then unchanged: nothing read, no thread started.
    const raw = await makeImage(dir.path, 'still.raw', 'raw', 8 * MiB, [{ offset: MiB, length: MiB, pattern: 0x52 }]);
    await backupVm(repo, { vm: 'still', driver: 'image', disks: [{ path: raw, format: 'raw' }] });
    const s = recordingLease([]);
    const again = await backupVm(repo, { vm: 'still', driver: 'image', disks: [{ path: raw }], chunkPool: s.lease });
    assert.equal(again.manifest.stats.bytesRead, 0);
    assert.equal(s.warmed(), 0, 'no thread started and no slot made for a disk with nothing to read');
    assert.ok(s.released(), 'the pool is given back');
  });
});

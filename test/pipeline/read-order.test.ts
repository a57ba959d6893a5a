/**
 * The order a backup reads a disk in (pipeline/chunk-reader.ts): from two places at
 * once, the first half of its status windows and the second, a chunk of each in turn,
 * each half in order. Checked with a real repository and real chunk threads reading a
 * disk that a recording reader serves (1 GiB windows make the disks of these tests
 * several GiB: a real image file that size would only be holes to the reader anyway).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { readChunks, type ReadChunksOptions } from '../../src/pipeline/chunk-reader.js';
import { ownPool } from '../../src/pipeline/pool.js';
import { ProgressMeter } from '../../src/pipeline/progress.js';
import type { BackupStats } from '../../src/repo/manifest.js';
import type { Extent } from '../../src/disk/nbd.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/**
 * A disk of `windows` GiB with data in the first `perWindow` MiB of each window listed in
 * `withData`; records where it is read. Chunks whose offsets are in `changed` hold other
 * bytes; asking for the extents of window `failAt` fails.
 */
function recordingDisk(windows: number, withData: number[], perWindow: number, opts: { changed?: number[]; failAt?: number } = {}) {
  const reads: number[] = [];
  const hasData = (w: number) => withData.includes(w);
  const reader = {
    async extents(offset: number, length: number): Promise<Extent[]> {
      if (opts.failAt !== undefined && Math.floor(offset / GiB) === opts.failAt) throw new Error(`no extents for window ${opts.failAt}`);
      const out: Extent[] = [];
      for (let at = offset; at < offset + length;) {
        const w = Math.floor(at / GiB);
        const dataEnd = w * GiB + perWindow * MiB;
        const next = Math.min(offset + length, at < dataEnd && hasData(w) ? dataEnd : (w + 1) * GiB);
        const data = at < dataEnd && hasData(w);
        out.push({ offset: at, length: next - at, zero: !data, hole: !data });
        at = next;
      }
      return out;
    },
    async readInto(offset: number, target: Uint8Array): Promise<void> {
      reads.push(offset);
      // Different bytes in every chunk: each one is new to the repository.
      const salt = opts.changed?.includes(offset) ? 100 : 0;
      for (let i = 0; i < target.length; i += 4096) target.fill(1 + ((offset / MiB + i / 4096 + salt) % 251), i, Math.min(target.length, i + 4096));
    },
    async close() {},
  };
  return { reader, reads, size: windows * GiB };
}

/** Where chunk `c` of window `w` starts. */
const at = (w: number, c: number) => w * GiB + c * MiB;

describe('the order a backup reads a disk in', () => {
  let dir: TempDir;
  let repo: Repository;

  before(async () => {
    dir = await tempDir('vmvault-read-order-');
    const storage = new LocalStorage(join(dir.path, 'repo'));
    await Repository.init(storage, 'read order test passphrase', { kdf: 'weak', chunkSize: MiB });
    repo = await Repository.open(storage, 'read order test passphrase', { cacheDir: false, onWarning: () => {} });
  });
  after(async () => {
    await dir.cleanup();
  });

  /** One backup's reading of `disk`, one chunk at a time (so that reads happen in the order chunks are taken). */
  async function read(disk: ReturnType<typeof recordingDisk>, inFlight = 1, extra: Partial<ReadChunksOptions> = {}) {
    const lease = ownPool(repo.workerInit());
    const stats: BackupStats = { bytesRead: 0, bytesUploaded: 0, chunksNew: 0, chunksReused: 0, chunksZero: 0, chunksUnchanged: 0, seconds: 0 };
    try {
      const known = await repo.chunkIndex();
      const ids = await readChunks({
        repo, pool: lease.pool, client: async () => disk.reader, size: disk.size, known, stats,
        meter: new ProgressMeter('backup', disk.size), inFlight, ...extra,
      });
      await known.flush(true);
      return { ids, stats };
    } finally {
      await lease.release();
    }
  }

  test('four windows: the two halves in turn, each in order; the same chunk ids whatever the order', async () => {
    const disk = recordingDisk(4, [0, 1, 2, 3], 3);
    const first = await read(disk);
    assert.deepEqual(disk.reads, [
      at(0, 0), at(2, 0), at(0, 1), at(2, 1), at(0, 2), at(2, 2),
      at(1, 0), at(3, 0), at(1, 1), at(3, 1), at(1, 2), at(3, 2),
    ]);
    assert.equal(first.stats.chunksNew, 12);
    const dataAt = [0, 1, 2, 3].flatMap((w) => [0, 1, 2].map((c) => at(w, c) / MiB));
    assert.deepEqual(first.ids.flatMap((id, i) => (id === null ? [] : [i])), dataAt, 'an id where there is data, and only there');
    assert.equal(new Set(first.ids.filter((id) => id !== null)).size, 12, 'twelve different chunks');

    // Read again with chunks in flight together, from another place: every chunk is found stored, under the same index.
    disk.reads.length = 0;
    const again = await read(disk, 6, { startAt: (n) => n - 1 });
    assert.deepEqual(again.ids, first.ids);
    assert.equal(again.stats.chunksReused, 12);
    assert.equal(again.stats.chunksNew, 0);
    assert.deepEqual([...disk.reads].sort((a, b) => a - b), [...dataAt.map((m) => m * MiB)].sort((a, b) => a - b), 'each chunk read once');
  });

  test('three windows with data only in the first half: read in order, alone', async () => {
    const disk = recordingDisk(3, [0, 1], 2);
    const { ids } = await read(disk);
    assert.deepEqual(disk.reads, [at(0, 0), at(0, 1), at(1, 0), at(1, 1)]);
    assert.equal(ids.filter((id) => id !== null).length, 4);
  });

  test('an odd number of windows: the first half is the larger', async () => {
    const disk = recordingDisk(3, [0, 1, 2], 1);
    await read(disk);
    // Halves [0, 1] and [2]: window 2 goes with window 0, then window 1 goes on alone.
    assert.deepEqual(disk.reads, [at(0, 0), at(2, 0), at(1, 0)]);
  });

  test('an incremental across both halves reads only what changed there; an audit reads it all and finds the change tracking missed', async () => {
    const before = recordingDisk(4, [0, 1, 2, 3], 3);
    const { ids: previous } = await read(before);
    const dirtyAt = [at(0, 1), at(2, 2)];
    const changes = {
      previous,
      dirty: async (offset: number, length: number) => dirtyAt.filter((x) => x >= offset && x < offset + length).map((x) => ({ offset: x, length: 4096 })),
    };
    // The dirty chunks hold new bytes, and so does one that tracking does not report.
    const after = recordingDisk(4, [0, 1, 2, 3], 3, { changed: [...dirtyAt, at(3, 0)] });
    const inc = await read(after, 1, { changes });
    assert.deepEqual(after.reads, dirtyAt, 'the two changed chunks, one from each half');
    assert.equal(inc.stats.chunksUnchanged, 10);
    assert.equal(inc.stats.chunksNew, 2);
    assert.deepEqual(inc.ids.map((id, i) => (id === previous[i] ? '=' : 'new')).filter((x) => x === 'new').length, 2);

    after.reads.length = 0;
    const audit = { unchanged: 0, differing: [] as number[] };
    const audited = await read(after, 3, { changes, audit });
    assert.equal(after.reads.length, 12, 'an audit reads every chunk');
    assert.equal(audit.unchanged, 4096 - 2, 'every chunk but the two dirty ones (holes included) was called unchanged');
    assert.deepEqual(audit.differing, [at(3, 0)], 'the write tracking missed, by its offset');
    assert.equal(audited.stats.chunksNew, 1, 'only the missed chunk is new: the dirty ones were stored by the incremental');
  });

  test('a window whose extents cannot be had, in the second half with chunks of the first in flight: the backup fails with that error', async () => {
    const disk = recordingDisk(4, [0, 1, 2, 3], 3, { failAt: 3 });
    await assert.rejects(read(disk, 4), /no extents for window 3/);
  });

  test('a reading start among the windows: the halves follow it, wrapped around', async () => {
    const disk = recordingDisk(4, [0, 1, 2, 3], 1);
    // startAt is asked for windows (4) and then for the chunks within each window (1 here).
    await read(disk, 1, { startAt: (n) => (n === 4 ? 1 : 0) });
    // Order 1, 2, 3, 0: halves [1, 2] and [3, 0].
    assert.deepEqual(disk.reads, [at(1, 0), at(3, 0), at(2, 0), at(0, 0)]);
  });
});

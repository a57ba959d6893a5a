/**
 * A restore is as sparse as its source: within a 4 MiB chunk only the parts that hold
 * data are written, so a disk with small scattered writes does not come back with
 * every touched chunk fully allocated. Checked on real images with qemu-img (actual
 * size and compare), for raw and qcow2.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { dataRuns, ZERO_RUN } from '../../src/pipeline/sparse.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type PatternWrite, type TempDir } from '../helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** 64 KiB here and there in four chunks, one 1 MiB run, and a partial last chunk. */
const WRITES: PatternWrite[] = [
  { offset: 0, length: 64 * KiB, pattern: 0x11 },
  { offset: 3 * MiB + 128 * KiB, length: 64 * KiB, pattern: 0x22 },
  { offset: 5 * MiB, length: MiB, pattern: 0x33 },
  { offset: 9 * MiB + 4 * KiB, length: 4 * KiB, pattern: 0x44 },
  { offset: 14 * MiB - 64 * KiB, length: 128 * KiB, pattern: 0x55 },
  { offset: 18 * MiB - 64 * KiB, length: 64 * KiB, pattern: 0x66 },
];
const SIZE = 18 * MiB;

let dir: TempDir;
let repo: Repository;

before(async () => {
  dir = await tempDir('vmvault-restore-sparse-');
  repo = await Repository.init(new LocalStorage(join(dir.path, 'repo')), 'sparse', { kdf: 'weak' });
});

after(async () => {
  await dir?.cleanup();
});

async function actualSize(file: string, format: string): Promise<number> {
  const r = await execa('qemu-img', ['info', '-f', format, '--output=json', file]);
  return (JSON.parse(r.stdout) as { 'actual-size': number })['actual-size'];
}

describe('restore writes only the non-zero parts of each chunk', () => {
  for (const format of ['raw', 'qcow2'] as const) {
    test(`${format}: the restored image is allocated no more than its source, and compares equal`, async () => {
      const src = await makeImage(dir.path, `src.${format}`, format, SIZE, WRITES);
      const { manifest } = await backupVm(repo, { vm: `vm-${format}`, driver: 'image', disks: [{ path: src, name: 'root', format }] });
      const to = join(dir.path, `to-${format}`);
      const r = await restore(repo, { backupId: manifest.id, to, format });
      const restored = r.files.find((f) => f.kind === 'disk')!.path;
      await execa('qemu-img', ['compare', '-q', '-f', format, '-F', format, src, restored]);
      const [before, afterRestore] = [await actualSize(src, format), await actualSize(restored, format)];
      // Allocation granularity may differ a little (filesystem blocks, qcow2 clusters); whole chunks may not.
      assert.ok(afterRestore <= before + 256 * KiB, `source ${before} bytes allocated, restored ${afterRestore}`);
      const data = WRITES.reduce((n, w) => n + w.length, 0);
      assert.ok(r.stats.bytesWritten <= data + 8 * 64 * KiB, `wrote ${r.stats.bytesWritten} bytes for ${data} bytes of data`);
    });
  }
});

describe('dataRuns', () => {
  test('an all-zero buffer has no runs; an empty one neither', () => {
    assert.deepEqual(dataRuns(Buffer.alloc(4 * ZERO_RUN)), []);
    assert.deepEqual(dataRuns(Buffer.alloc(0)), []);
  });
  test('non-zero pieces are kept whole and merged where adjacent; a short last piece counts', () => {
    const b = Buffer.alloc(5 * ZERO_RUN + 100);
    b[1] = 1; // piece 0
    b[2 * ZERO_RUN - 1] = 1; // piece 1, adjacent to 0
    b[4 * ZERO_RUN] = 1; // piece 4
    b[5 * ZERO_RUN + 99] = 1; // the short last piece, adjacent to 4
    assert.deepEqual(dataRuns(b), [{ start: 0, end: 2 * ZERO_RUN }, { start: 4 * ZERO_RUN, end: 5 * ZERO_RUN + 100 }]);
  });
  test('a view into a larger buffer is judged by its own bytes only', () => {
    const big = Buffer.alloc(3 * ZERO_RUN, 0xff);
    big.fill(0, ZERO_RUN, 2 * ZERO_RUN);
    assert.deepEqual(dataRuns(big.subarray(ZERO_RUN, 2 * ZERO_RUN)), []);
  });
  test('a granularity outside 1..64 KiB is refused', () => {
    assert.throws(() => dataRuns(Buffer.alloc(1), 0), RangeError);
    assert.throws(() => dataRuns(Buffer.alloc(1), 2 * ZERO_RUN), RangeError);
  });
});

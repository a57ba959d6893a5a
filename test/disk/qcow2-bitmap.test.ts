/**
 * Dirty bitmaps read from the qcow2 file itself (src/disk/qcow2-bitmap.ts) against
 * QEMU's own answer: real images, bitmaps added by `qemu-img bitmap`, writes made by
 * `qemu-io` (which records them in the bitmap and stores it on close), and the same
 * bitmap served by `qemu-nbd -B` and asked over NBD. Anything the reader is not sure
 * of (a bitmap a killed QEMU left in use, a disabled one, damaged metadata) is refused
 * with the reason, so that the backup asks qemu instead.
 */
import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { execa } from 'execa';
import { fileReader } from '../../src/disk/image-refs.js';
import { openQcow2Bitmap, type DirtyBitmap } from '../../src/disk/qcow2-bitmap.js';
import { exportImage } from '../../src/disk/qemu.js';
import { bitmapFromFile } from '../../src/vm/change-tracking.js';
import { qemuIo, tempDir, type TempDir } from '../helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** The bitmap read from the file, or the reason it is not. */
async function fromFile(file: string, name: string, size: number): Promise<DirtyBitmap | { unmapped: string }> {
  const fh = await open(file, 'r');
  try {
    const st = await fh.stat();
    const b = await openQcow2Bitmap(fileReader(fh), st.size, size, name);
    if ('unmapped' in b) return b;
    // Read it all now, while the file is open.
    const all = await b.dirty(0, size);
    return { granularity: b.granularity, clean: b.clean, dirty: async (o, l) => all.flatMap((r) => {
      const from = Math.max(o, r.offset);
      const to = Math.min(o + l, r.offset + r.length);
      return to > from ? [{ offset: from, length: to - from }] : [];
    }) };
  } finally {
    await fh.close();
  }
}

/** What QEMU says is dirty, over NBD from `qemu-nbd -B`. */
async function fromQemu(file: string, name: string, size: number): Promise<{ offset: number; length: number }[]> {
  const exp = await exportImage(file, { format: 'qcow2', readOnly: true, bitmap: name });
  try {
    const out: { offset: number; length: number }[] = [];
    // In pieces, as a backup asks (and NBD replies are bounded).
    for (let at = 0; at < size; at += 1 * GiB) {
      for (const r of await exp.client.dirtyExtents(at, Math.min(1 * GiB, size - at))) {
        const prev = out[out.length - 1];
        if (prev && prev.offset + prev.length === r.offset) prev.length += r.length;
        else out.push({ ...r });
      }
    }
    return out;
  } finally {
    await exp.close();
  }
}

async function create(dir: string, name: string, size: number, clusterSize: number): Promise<string> {
  const file = path.join(dir, name);
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, file, String(size)]);
  return file;
}

describe('dirty bitmaps read from the qcow2 file', () => {
  let dir: TempDir;
  before(async () => { dir = await tempDir(); });
  after(async () => dir.cleanup());

  const shapes: [string, number, number, string[]][] = [
    // One data cluster of bitmap, granularity = cluster size (qemu's default).
    ['64 KiB clusters, default granularity', 256 * MiB, 64 * KiB, []],
    // Small clusters: one bitmap data cluster covers 2 GiB, so an 8 GiB disk needs four, and the last is partly tail.
    ['4 KiB clusters, 64 KiB granularity, several data clusters', 8 * GiB + 3 * MiB, 4 * KiB, ['-g', '65536']],
    // A coarse bitmap: one bit covers 1 MiB.
    ['1 MiB granularity', 512 * MiB, 64 * KiB, ['-g', String(MiB)]],
  ];
  for (const [what, size, clusterSize, gran] of shapes) {
    it(`agrees with QEMU over NBD: ${what}`, async () => {
      const img = await create(dir.path, `agree-${clusterSize}-${size}.qcow2`, size, clusterSize);
      await execa('qemu-img', ['bitmap', '--add', ...gran, '-f', 'qcow2', img, 'b']);
      // Nothing written yet: nothing dirty.
      const clean = await fromFile(img, 'b', size);
      assert.ok(!('unmapped' in clean), 'unmapped' in clean ? clean.unmapped : '');
      assert.deepEqual(await clean.dirty(0, size), []);
      assert.equal(clean.clean, true);
      // Writes of every shape: tiny, spanning granules, at both ends, and one across a bitmap data cluster's edge.
      const writes = [[0, 512], [size - 4096, 4096], [3 * MiB + 100, 70 * KiB], [Math.floor(size / 2), 2 * MiB]];
      for (let i = 0; i < 12; i++) writes.push([randomInt(0, size - MiB), randomInt(1, 300 * KiB)]);
      if (size > 4 * GiB) writes.push([2 * GiB - 128 * KiB, 256 * KiB]);
      await qemuIo(img, 'qcow2', writes.map(([o, l]) => `write -P 0x5a ${o} ${l}`));
      const mine = await fromFile(img, 'b', size);
      assert.ok(!('unmapped' in mine), 'unmapped' in mine ? mine.unmapped : '');
      const qemu = await fromQemu(img, 'b', size);
      assert.ok(qemu.length > 0);
      assert.deepEqual(await mine.dirty(0, size), qemu);
      // Asked for a window, it answers exactly that window's part.
      const from = 3 * MiB;
      const to = Math.floor(size / 2) + MiB;
      const expected = qemu.flatMap((r) => {
        const a = Math.max(from, r.offset);
        const b = Math.min(to, r.offset + r.length);
        return b > a ? [{ offset: a, length: b - a }] : [];
      });
      assert.deepEqual(await mine.dirty(from, to - from), expected);
    });
  }

  it('a bitmap left in use by a QEMU that was killed is refused, with the reason', async () => {
    const img = await create(dir.path, 'in-use.qcow2', 64 * MiB, 64 * KiB);
    await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', img, 'b']);
    // qemu-io opened read-write marks the bitmap in use on disk; killed, it never clears the mark.
    const io = execa('qemu-io', ['-f', 'qcow2', img], { reject: false, stdin: 'pipe' });
    io.stdin!.write('write -P 1 0 4096\n');
    for (let i = 0; i < 100; i++) {
      const info = JSON.parse((await execa('qemu-img', ['info', '-U', '--output=json', img])).stdout) as { 'format-specific': { data: { bitmaps?: { flags: string[] }[] } } };
      if (info['format-specific'].data.bitmaps?.[0]?.flags.includes('in-use')) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    io.kill('SIGKILL');
    await io;
    const b = await fromFile(img, 'b', 64 * MiB);
    assert.ok('unmapped' in b);
    assert.match(b.unmapped, /in use/);
  });

  it('a disabled bitmap, a missing one and a size that is not the disk\'s are refused', async () => {
    const img = await create(dir.path, 'refused.qcow2', 64 * MiB, 64 * KiB);
    await execa('qemu-img', ['bitmap', '--add', '--disable', '-f', 'qcow2', img, 'off']);
    const off = await fromFile(img, 'off', 64 * MiB);
    assert.ok('unmapped' in off && /disabled/.test(off.unmapped), JSON.stringify(off));
    const none = await fromFile(img, 'nope', 64 * MiB);
    assert.ok('unmapped' in none && /no bitmap named "nope"/.test(none.unmapped), JSON.stringify(none));
    const other = await fromFile(img, 'off', 32 * MiB);
    assert.ok('unmapped' in other && /not the 33554432 inspected/.test(other.unmapped), JSON.stringify(other));
  });

  it('damaged metadata is refused, never followed outside the file: the directory moved away, the consistency bit cleared', async () => {
    const img = await create(dir.path, 'damaged.qcow2', 64 * MiB, 64 * KiB);
    await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', img, 'b']);
    await qemuIo(img, 'qcow2', ['write -P 7 1M 64k']);
    const good = await readFile(img);
    const ext = good.subarray(0, 64 * KiB).indexOf(Buffer.from('23852875', 'hex'));
    assert.ok(ext > 0, 'the bitmaps extension is in the first cluster');
    // The directory's offset (extension data bytes 16–23) far past the end of the file.
    const moved = Buffer.from(good);
    moved.writeUInt32BE(0x10, ext + 8 + 16);
    await writeFile(img, moved);
    const far = await fromFile(img, 'b', 64 * MiB);
    assert.ok('unmapped' in far && /outside the file/.test(far.unmapped), JSON.stringify(far));
    // Autoclear bit 0 cleared: the extension is not to be trusted.
    const cleared = Buffer.from(good);
    cleared[95] = cleared[95]! & ~1;
    await writeFile(img, cleared);
    const stale = await fromFile(img, 'b', 64 * MiB);
    assert.ok('unmapped' in stale && /inconsistent/.test(stale.unmapped), JSON.stringify(stale));
  });

  it('bitmaps stored again while one is read (a QEMU program closing the image) are noticed: refused, never read as clean', async () => {
    const size = 8 * GiB;
    const img = await create(dir.path, 'moved.qcow2', size, 4 * KiB);
    await execa('qemu-img', ['bitmap', '--add', '-g', '65536', '-f', 'qcow2', img, 'b']);
    await qemuIo(img, 'qcow2', [0, 2, 4, 6].map((g) => `write -P 9 ${g * GiB + MiB} 64k`));
    const fh = await open(img, 'r');
    try {
      const plain = fileReader(fh);
      let reads = 0;
      // Between reading the table and the first data cluster, another repository's backup adds its bitmap:
      // qemu-img stores every bitmap to new clusters and frees the old ones.
      const racing = async (at: number, length: number) => {
        if (++reads === 5) await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', img, 'other']);
        return plain(at, length);
      };
      const b = await openQcow2Bitmap(racing, (await fh.stat()).size, size, 'b');
      assert.ok('unmapped' in b, 'the bitmap was not refused');
      assert.match(b.unmapped, /changed while bitmap "b" was read/);
    } finally {
      await fh.close();
    }
    // Read again, afterwards, it is whole and agrees with qemu.
    const again = await fromFile(img, 'b', size);
    assert.ok(!('unmapped' in again), 'unmapped' in again ? again.unmapped : '');
    assert.deepEqual(await again.dirty(0, size), await fromQemu(img, 'b', size));
    assert.equal(again.clean, false);
  });

  it('bitmapFromFile refuses what is not a regular file without waiting on it', async () => {
    const fifo = path.join(dir.path, 'fifo.qcow2');
    await execa('mkfifo', [fifo]);
    const r = await bitmapFromFile({
      path: fifo, name: 'f', format: 'qcow2', formatSource: 'declared', chain: [], virtualSize: MiB, actualSize: 0, references: [], bitmaps: [], snapshots: [],
      previous: { backupId: 'b'.repeat(64), chunkSize: 4 * MiB, entry: { name: 'f', format: 'qcow2', virtualSize: MiB, sourcePath: fifo, chunks: [null] } },
    }, 'b');
    assert.ok('why' in r && /not a regular file/.test(r.why), JSON.stringify(r));
  });
});

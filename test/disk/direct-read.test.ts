/**
 * Reading images from their files (src/disk/direct-read.ts, src/disk/qcow2-map.ts)
 * against qemu's own reading of the same image: real qcow2 images made by qemu-img
 * and qemu-io in several layouts, each read both ways, byte for byte and extent for
 * extent, for an internal snapshot and for the current state.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import fs from 'node:fs/promises';
import path from 'node:path';
import { openImageFile, type BlockReader } from '../../src/disk/direct-read.js';
import { fileReader } from '../../src/disk/image-refs.js';
import { openQcow2Map } from '../../src/disk/qcow2-map.js';
import { exportImage, type ImageFormat } from '../../src/disk/qemu.js';
import type { Extent } from '../../src/disk/nbd.js';
import { VmvaultError } from '../../src/errors.js';
import { exportLeftBy, holdImageLock, qemuIo, tempDir, waitForExit, type TempDir } from '../helpers/images.js';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 24 * MiB;

let dir: TempDir;
before(async () => { dir = await tempDir('vmvault-direct-'); });
after(async () => { await dir.cleanup(); });

/** A raw file of SIZE bytes: random data in a few places (one end unaligned), holes elsewhere. */
async function rawBase(name: string): Promise<string> {
  const file = path.join(dir.path, name);
  const fh = await fs.open(file, 'w');
  try {
    await fh.truncate(SIZE);
    for (const [at, n] of [[0, 6 * MiB], [10 * MiB, MiB + 1000], [17 * MiB - 4 * KiB, 8 * KiB]] as const) {
      await fh.write(randomBytes(n), 0, n, at);
    }
  } finally {
    await fh.close();
  }
  return file;
}

/**
 * A qcow2 image whose clusters are out of guest order in the file (writes from the end
 * backwards), with zero clusters, a discarded range, and snapshot `s1` taken before
 * further writes: the snapshot and the current state differ.
 */
async function layeredQcow2(name: string, options: string): Promise<string> {
  const raw = await rawBase(`${name}.raw`);
  const file = path.join(dir.path, name);
  await execa('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', options, raw, file]);
  await qemuIo(file, 'qcow2', [
    'write -P 0x11 20971520 1048576', 'write -P 0x12 16777728 70000', 'write -P 0x13 12582912 65536',
    'write -P 0x14 8388608 131072', 'write -z 2097152 1048576', 'discard 4194304 524288',
  ]);
  await execa('qemu-img', ['snapshot', '-c', 's1', file]);
  await qemuIo(file, 'qcow2', ['write -P 0x21 0 1048576', 'write -P 0x22 23068672 4096', 'write -z 10485760 65536']);
  return file;
}

/**
 * Where `ours` calls a range zero, `qemu`'s must too: a reader may call more data than
 * qemu does (qemu also looks for holes in the file inside an allocated cluster), never less.
 * Returns the byte counts each calls data, for a check that the comparison saw some.
 */
function sameOrMoreData(ours: Extent[], qemu: Extent[], size: number): { ours: number; qemu: number } {
  const sectors = (extents: Extent[]) => {
    const data = new Uint8Array(size / 512);
    for (const e of extents) if (!e.zero) data.fill(1, e.offset / 512, (e.offset + e.length) / 512);
    return data;
  };
  const a = sectors(ours);
  const b = sectors(qemu);
  for (let i = 0; i < a.length; i++) {
    if (b[i] && !a[i]) assert.fail(`sector ${i} (byte ${i * 512}) holds data for qemu-nbd, zeros for the file reader`);
  }
  return { ours: a.reduce((n, x) => n + x, 0) * 512, qemu: b.reduce((n, x) => n + x, 0) * 512 };
}

async function viaQemu(file: string, format: ImageFormat, snapshot?: string) {
  const exp = await exportImage(file, { format, readOnly: true, ...(snapshot ? { snapshot } : {}) });
  return { client: exp.client, close: () => exp.close() };
}

async function openFile(file: string, format: ImageFormat, snapshot?: string, size = SIZE): Promise<BlockReader & { viaQemuBytes?: number }> {
  const opened = await openImageFile(file, { format, size, viaQemu: () => viaQemu(file, format, snapshot), ...(snapshot ? { snapshot } : {}) });
  assert.ok('reader' in opened, `read through qemu instead: ${'why' in opened ? opened.why : ''}`);
  return opened.reader;
}

/** Reads the whole disk both ways (in uneven pieces, so runs split mid-cluster) and compares bytes and extents. */
async function sameAsQemu(file: string, format: ImageFormat, snapshot?: string): Promise<BlockReader & { viaQemuBytes?: number }> {
  const direct = await openFile(file, format, snapshot);
  const qemu = await viaQemu(file, format, snapshot);
  try {
    const data = sameOrMoreData(await direct.extents(0, SIZE), await qemu.client.extents(0, SIZE), SIZE);
    assert.ok(data.qemu > 0 && data.ours <= data.qemu + 4 * MiB, `data: ${data.ours} bytes for the file reader, ${data.qemu} for qemu-nbd`);
    const piece = 3 * MiB + 512;
    for (let at = 0; at < SIZE; at += piece) {
      const n = Math.min(piece, SIZE - at);
      const a = Buffer.alloc(n, 0xee);
      const b = Buffer.alloc(n);
      await direct.readInto(at, a);
      await qemu.client.readInto(at, b);
      assert.ok(a.equals(b), `bytes ${at}+${n} differ from qemu-nbd's`);
    }
    return direct;
  } finally {
    await qemu.close();
    await direct.close();
  }
}

describe('reading qcow2 images from their files', () => {
  for (const [label, options] of [
    ['64 KiB clusters, qcow2 v3', 'cluster_size=65536,compat=1.1'],
    ['64 KiB clusters, qcow2 v2 (compat 0.10)', 'cluster_size=65536,compat=0.10'],
    ['512-byte clusters', 'cluster_size=512,compat=1.1'],
    ['2 MiB clusters', 'cluster_size=2097152,compat=1.1'],
  ] as const) {
    test(`${label}: a snapshot and the current state read as qemu reads them`, async () => {
      const file = await layeredQcow2(`img-${options.replace(/\W/g, '')}.qcow2`, options);
      for (const snapshot of ['s1', undefined]) {
        const r = await sameAsQemu(file, 'qcow2', snapshot);
        assert.equal(r.viaQemuBytes, 0, 'nothing of this image needs qemu');
      }
    });
  }

  test('compressed clusters are read through qemu, the rest from the file, and the whole reads as qemu reads it', async () => {
    const raw = await rawBase('comp.raw');
    // Compressible data in part of the disk, so that convert -c stores compressed clusters.
    await qemuIo(raw, 'raw', ['write -P 0x41 7340032 2097152']);
    const file = path.join(dir.path, 'comp.qcow2');
    await execa('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, file]);
    await qemuIo(file, 'qcow2', ['write -P 0x42 0 1048576']);
    const r = await sameAsQemu(file, 'qcow2');
    assert.ok(r.viaQemuBytes! >= 2 * MiB, `read ${r.viaQemuBytes} bytes through qemu`);
  });

  test('images the map does not fully understand are left to qemu, each with its reason', async () => {
    const cases: [string, () => Promise<string>, RegExp, number?][] = [
      ['subclusters', async () => {
        const f = path.join(dir.path, 'ext.qcow2');
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', f, String(SIZE)]);
        return f;
      }, /extended L2/],
      ['a backing file', async () => {
        const base = path.join(dir.path, 'base.qcow2');
        const f = path.join(dir.path, 'linked.qcow2');
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(SIZE)]);
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', f]);
        return f;
      }, /backing file/],
      ['the dirty flag', async () => {
        const f = path.join(dir.path, 'dirty.qcow2');
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, String(SIZE)]);
        const fh = await fs.open(f, 'r+');
        await fh.write(Buffer.from([1]), 0, 1, 79); // incompatible features, bit 0
        await fh.close();
        return f;
      }, /dirty/],
      ['a raw file configured as qcow2', () => rawBase('not-qcow2.raw'), /magic/],
      ['a size other than the inspected one', async () => {
        const f = path.join(dir.path, 'size.qcow2');
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', f, String(SIZE)]);
        return f;
      }, /not the 1048576 inspected/, MiB],
    ];
    for (const [what, make, why, size] of cases) {
      const file = await make();
      const opened = await openImageFile(file, { format: 'qcow2', size: size ?? SIZE, viaQemu: () => viaQemu(file, 'qcow2') });
      assert.ok('why' in opened, `${what}: read from the file`);
      assert.match(opened.why, why, what);
    }
    const file = await layeredQcow2('nosnap.qcow2', 'compat=1.1');
    const opened = await openImageFile(file, { format: 'qcow2', size: SIZE, snapshot: 'nope', viaQemu: () => viaQemu(file, 'qcow2') });
    assert.ok('why' in opened && /no snapshot named "nope"/.test(opened.why));
  });

  test('a damaged L2 entry (reserved bits, or an offset past the end of the file) is never read from the file', async () => {
    const file = await layeredQcow2('damaged.qcow2', 'cluster_size=65536,compat=1.1');
    const fh = await fs.open(file, 'r+');
    try {
      const header = Buffer.alloc(48);
      await fh.read(header, 0, 48, 0);
      const l1 = Buffer.alloc(8);
      await fh.read(l1, 0, 8, Number(header.readBigUInt64BE(40)));
      const l2At = Number(l1.readBigUInt64BE(0) & 0x00fffffffffffe00n);
      const entry = Buffer.alloc(8);
      // Guest cluster 1 (of random data): a reserved bit; cluster 3: an offset far past the end.
      await fh.read(entry, 0, 8, l2At + 8);
      entry.writeUInt8(entry.readUInt8(7) | 0x02, 7);
      await fh.write(entry, 0, 8, l2At + 8);
      const far = Buffer.alloc(8);
      far.writeBigUInt64BE(0x8000_0000_0000_0000n | (1n << 40n));
      await fh.write(far, 0, 8, l2At + 24);
    } finally {
      await fh.close();
    }
    const read = await fs.open(file, 'r');
    try {
      const map = await openQcow2Map(fileReader(read), (await read.stat()).size, SIZE);
      assert.ok(!('unmapped' in map));
      const runs = await map.runs(0, 4 * 65536);
      assert.deepEqual(runs.map((r) => [r.offset, r.kind]), [[0, 'data'], [65536, 'qemu'], [131072, 'data'], [196608, 'qemu']]);
    } finally {
      await read.close();
    }
    // What qemu makes of them is qemu's to say (here it reads them: it ignores the reserved
    // bit, and reads past the end of the file as zeros): the reader gives qemu's bytes.
    const direct = await sameAsQemu(file, 'qcow2');
    assert.ok(direct.viaQemuBytes! >= 2 * 65536, `read ${direct.viaQemuBytes} bytes through qemu`);
  });
});

describe('reading raw images from their files', () => {
  test('a sparse raw image reads as qemu reads it, holes included', async () => {
    const file = await rawBase('sparse.raw');
    await sameAsQemu(file, 'raw');
  });

  test('a raw image a process writes to is refused, as qemu-nbd exports refuse it', async () => {
    const file = await rawBase('busy.raw');
    const release = await holdImageLock(file, 'raw');
    try {
      await assert.rejects(openImageFile(file, { format: 'raw', size: SIZE, viaQemu: () => viaQemu(file, 'raw') }),
        (err: unknown) => err instanceof VmvaultError && err.code === 'IMAGE_LOCKED');
    } finally {
      await release();
    }
  });
});

describe('backups through the file reader', () => {
  let repo: Repository;
  before(async () => { repo = await Repository.init(new LocalStorage(path.join(dir.path, 'repo')), 'direct', { kdf: 'weak' }); });

  async function backupAndCompare(vm: string, image: string): Promise<void> {
    const { manifest } = await backupVm(repo, { vm, driver: 'image', disks: [{ path: image, name: 'root', format: 'qcow2' }] });
    const r = await restore(repo, { backupId: manifest.id, to: path.join(dir.path, `restored-${vm}`), format: 'raw' });
    await execa('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', image, r.files.find((f) => f.kind === 'disk')!.path]);
  }

  test('an image with compressed clusters (read partly through qemu) restores identical', async () => {
    const raw = await rawBase('backup-comp.raw');
    await qemuIo(raw, 'raw', ['write -P 0x41 7340032 2097152', 'write -P 0x43 14680064 1048576']);
    const image = path.join(dir.path, 'backup-comp.qcow2');
    await execa('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, image]);
    await qemuIo(image, 'qcow2', ['write -P 0x44 0 1048576', 'write -z 20971520 1048576']);
    await backupAndCompare('comp', image);
  });

  test('an image a killed vmvault\'s qemu-nbd still holds is freed and backed up, restoring identical', async () => {
    const raw = await rawBase('held.raw');
    const image = path.join(dir.path, 'held.qcow2');
    await execa('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, image]);
    const orphan = await exportLeftBy(image);
    try {
      await backupAndCompare('held', image);
      assert.ok(await waitForExit(orphan.pid, 5000), 'the orphan was ended');
    } finally {
      await orphan.stop();
    }
  });
});

/**
 * A disk restored as raw is written straight into a file (pipeline/disk-writer.ts),
 * not through qemu-nbd: it must still compare equal to its source, stay sparse, be
 * 0600 from its creation, leave nothing behind when the restore fails, and never
 * follow a symlink planted where it is created. Checked on the O_DIRECT path (the
 * test directory's filesystem) and on the buffered one (tmpfs refuses O_DIRECT), with
 * a disk whose size is not a multiple of 4 KiB, so its last bytes take the buffered
 * write beside the O_DIRECT ones.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readlinkSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rmdir, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { createDiskWriter } from '../../src/pipeline/disk-writer.js';
import type { Progress } from '../../src/pipeline/progress.js';
import { Repository } from '../../src/repo/repository.js';
import { chunkName } from '../../src/repo/chunk.js';
import type { Manifest } from '../../src/repo/manifest.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type PatternWrite, type TempDir } from '../helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB + 512; // 16 chunks and 512 bytes: the last chunk is not a whole 4 KiB block
const WRITES: PatternWrite[] = [
  { offset: 0, length: MiB, pattern: 0x11 },
  { offset: 20 * MiB + 64 * KiB, length: 64 * KiB, pattern: 0x22 },
  { offset: 40 * MiB, length: 3 * MiB, pattern: 0x33 },
  { offset: 64 * MiB, length: 512, pattern: 0x44 },
];
const DATA = WRITES.reduce((n, w) => n + w.length, 0);

let dir: TempDir;
let repoDir: string;
let repo: Repository;
let manifest: Manifest;
let src: string;
let umask: number;

before(async () => {
  umask = process.umask(0o022);
  dir = await tempDir('vmvault-restore-raw-');
  repoDir = join(dir.path, 'repo');
  repo = await Repository.init(new LocalStorage(repoDir), 'raw', { kdf: 'weak' });
  src = await makeImage(dir.path, 'src.raw', 'raw', SIZE, WRITES);
  ({ manifest } = await backupVm(repo, { vm: 'vm', driver: 'image', disks: [{ path: src, name: 'root', format: 'raw' }] }));
});

after(async () => {
  process.umask(umask);
  await dir?.cleanup();
});

/** A tmpfs (mount needs root: without it this fails, it does not skip). */
async function tmpfs(): Promise<string> {
  const mnt = join(dir.path, 'tmpfs');
  await mkdir(mnt);
  await execa('mount', ['-t', 'tmpfs', '-o', 'size=128m,mode=0700', 'tmpfs', mnt]);
  after(async () => {
    await execa('umount', [mnt]);
    await rmdir(mnt);
  });
  return mnt;
}

/** Bytes of `file` in the page cache (util-linux fincore). */
async function cached(file: string): Promise<number> {
  return Number((await execa('fincore', ['--bytes', '--noheadings', '--output', 'RES', file])).stdout.trim());
}

async function restoredWell(to: string, opts: { direct: boolean }): Promise<void> {
  const seen: Progress[] = [];
  const r = await restore(repo, { backupId: manifest.id, to, format: 'raw', onProgress: (p) => seen.push(p) });
  const file = join(to, 'root.raw');
  assert.deepEqual(r.files.map((f) => f.path), [file]);
  assert.deepEqual(await readdir(to), ['root.raw'], 'no temporary file is left beside the disk');
  // Written around the page cache: only the last, partial block went through it (read before compare does).
  if (opts.direct) assert.ok((await cached(file)) <= 64 * KiB, `${await cached(file)} bytes of the restored disk are in the page cache`);
  await execa('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, file]);
  const st = await stat(file);
  assert.equal(st.size, SIZE);
  assert.equal((st.mode & 0o777).toString(8), '600');
  // 4.1 MiB of data in a 64 MiB disk: allocated about as much as the data, nowhere near the size.
  assert.ok(st.blocks * 512 <= DATA + 256 * KiB, `${st.blocks * 512} bytes allocated for ${DATA} bytes of data`);
  assert.equal(r.stats.bytesWritten, DATA, 'only the 64 KiB runs holding data are written');
  assert.equal(r.stats.chunksWritten, 4);
  assert.equal(seen.at(-1)?.bytesDone, seen.at(-1)?.bytesTotal, 'progress reaches its total');
}

describe('restore to raw writes the file directly', () => {
  test('on a filesystem with O_DIRECT: equal to the source, sparse, 0600, nothing else left', async () => {
    await restoredWell(join(dir.path, 'to-direct'), { direct: true });
  });

  test('on tmpfs (a memory filesystem, often /tmp): the same', async () => {
    await restoredWell(join(await tmpfs(), 'to'), { direct: false });
  });

  test('sync: false makes nothing under the target durable (no fdatasync, no directory fsync), and restores the same; the default syncs the file and its directory', async () => {
    // Every sync of a file handle made during a restore, by the path of its descriptor.
    const proto = Object.getPrototypeOf(await open(process.execPath, 'r').then(async (fh) => (await fh.close(), fh))) as { sync: () => Promise<void>; datasync: () => Promise<void> };
    const synced: string[] = [];
    const [sync, datasync] = [proto.sync, proto.datasync];
    const record = (orig: () => Promise<void>) => function (this: { fd: number }) {
      synced.push(readlinkSync(`/proc/self/fd/${this.fd}`));
      return orig.call(this);
    };
    proto.sync = record(sync);
    proto.datasync = record(datasync);
    const restoreTo = async (to: string, sync?: boolean) => {
      synced.length = 0;
      const r = await restore(repo, { backupId: manifest.id, to, format: 'raw', ...(sync === undefined ? {} : { sync }) });
      await execa('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, join(to, 'root.raw')]);
      return { r, under: synced.filter((f) => f === to || f.startsWith(`${to}/`)) };
    };
    try {
      const fast = await restoreTo(join(dir.path, 'to-no-sync'), false);
      assert.equal(fast.r.durable, false);
      assert.deepEqual(fast.under, [], 'nothing under the target is synced');
      const safe = await restoreTo(join(dir.path, 'to-sync'));
      assert.equal(safe.r.durable, true);
      assert.ok(safe.under.some((f) => f.includes('.root.raw.vmvault-tmp-')), `the disk's file is synced before its rename (synced: ${safe.under.join(', ')})`);
      assert.ok(safe.under.includes(join(dir.path, 'to-sync')), 'and its directory after it');
    } finally {
      proto.sync = sync;
      proto.datasync = datasync;
    }
  });

  test("an interrupted restore's temporary files (a restore killed) are removed by the next restore of the same file, not those still being written", async () => {
    const to = join(dir.path, 'to-leftovers');
    await mkdir(to);
    const gone = Number((await execa(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'])).stdout);
    const old = join(to, '.root.raw.vmvault-tmp-0badc0de'); // an older vmvault's name: by age alone
    const dead = join(to, `.root.raw.vmvault-tmp-${gone}-0badc0de`); // its process is gone
    const live = join(to, `.root.raw.vmvault-tmp-${process.pid}-0badc0de`); // its process runs (a restore writing another disk)
    const fresh = join(to, '.root.raw.vmvault-tmp-00c0ffee');
    const other = join(to, '.other.raw.vmvault-tmp-0badc0de');
    for (const f of [old, dead, live, fresh, other]) await writeFile(f, 'partial');
    const hourAgo = new Date(Date.now() - 3600_000);
    for (const f of [old, dead, live, other]) await utimes(f, hourAgo, hourAgo);
    const r = await restore(repo, { backupId: manifest.id, to, format: 'raw' });
    assert.deepEqual(r.leftoversRemoved?.sort(), [dead, old].sort());
    assert.deepEqual((await readdir(to)).sort(), ['.other.raw.vmvault-tmp-0badc0de', '.root.raw.vmvault-tmp-00c0ffee', `.root.raw.vmvault-tmp-${process.pid}-0badc0de`, 'root.raw'].sort(),
      "a fresh one, one whose process runs, and another file's, stay");
    await execa('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, join(to, 'root.raw')]);
  });
});

describe('a raw restore that fails leaves nothing behind', () => {
  const dataChunks = () => manifest.disks[0]!.chunks.filter((id): id is string => id !== null);

  async function failsCleanly(name: string, pattern: RegExp, backupId = manifest.id): Promise<void> {
    const to = join(dir.path, name);
    // One chunk at a time: the chunks before the bad one are written first, so the failure comes mid-disk.
    await assert.rejects(restore(repo, { backupId, to, format: 'raw', inFlight: 1 }), (err: Error) => {
      assert.match(err.message, pattern);
      return true;
    });
    assert.deepEqual(existsSync(to) ? await readdir(to) : [], [], 'neither the disk nor its temporary is left');
  }

  test('a chunk missing from the repository', async () => {
    const last = dataChunks().at(-1)!;
    const file = join(repoDir, chunkName(last));
    const saved = await readFile(file);
    await execa('rm', [file]);
    try {
      await failsCleanly('to-missing', /is missing from the repository: disk "root" of backup [0-9a-f]{12} cannot be restored whole. Restore another backup of it, or run "vmvault verify"/);
    } finally {
      await writeFile(file, saved);
    }
  });

  test('a chunk damaged in the repository', async () => {
    const file = join(repoDir, chunkName(dataChunks()[2]!));
    const saved = await readFile(file);
    const flipped = Buffer.from(saved);
    flipped[flipped.length >> 1]! ^= 0x20;
    await writeFile(file, flipped);
    try {
      await failsCleanly('to-damaged', /failed authentication|damaged|does not match/);
    } finally {
      await writeFile(file, saved);
    }
  });

  test('a chunk of the wrong length for its place (a manifest naming a whole chunk as the short last one)', async () => {
    const whole = dataChunks()[0]!;
    const disk = { ...manifest.disks[0]!, virtualSize: manifest.chunkSize + 512, chunks: [whole, whole] };
    const forged: Manifest = { ...manifest, id: randomBytes(32).toString('hex'), disks: [disk] };
    await repo.saveManifest(forged);
    await failsCleanly('to-length', new RegExp(`holds ${manifest.chunkSize} bytes where 512 were expected`), forged.id);
  });
});

describe('the raw disk writer creates its file exclusively', () => {
  test('a symlink planted at its path is refused, not followed, whether its target exists or not', async () => {
    const victim = join(dir.path, 'victim');
    await writeFile(victim, 'precious');
    const planted = join(dir.path, '.planted');
    await symlink(victim, planted);
    await assert.rejects(createDiskWriter(planted, 'raw', MiB), { code: 'ALREADY_EXISTS' });
    assert.equal(await readFile(victim, 'utf8'), 'precious');
    assert.equal((await stat(victim)).size, 8);

    const dangling = join(dir.path, '.dangling');
    const nowhere = join(dir.path, 'would-be-created');
    await symlink(nowhere, dangling);
    await assert.rejects(createDiskWriter(dangling, 'raw', MiB), { code: 'ALREADY_EXISTS' });
    assert.equal(existsSync(nowhere), false);
  });

  for (const direct of [true, false]) {
    test(`${direct ? 'O_DIRECT' : 'buffered'}: writes in flight together land where they should, durable after flush`, async () => {
      const file = join(dir.path, `writer-${direct}.raw`);
      const size = 8 * MiB + 512;
      const parts = [
        { offset: MiB, data: randomBytes(2 * MiB + 64 * KiB) },
        { offset: 4 * MiB + 64 * KiB, data: randomBytes(64 * KiB) },
        { offset: 8 * MiB, data: randomBytes(512) },
      ];
      const w = await createDiskWriter(file, 'raw', size, { direct });
      try {
        await Promise.all(parts.map((p) => w.write(p.offset, p.data)));
        await w.flush();
      } finally {
        await w.close();
      }
      const inCache = await cached(file);
      const written = parts.reduce((n, p) => n + p.data.length, 0);
      // A tmpfs test directory (its files live in the page cache, and recent kernels accept
      // O_DIRECT there) cannot show that the page cache was bypassed: only the content is checked.
      const memoryFs = (await execa('stat', ['-f', '-c', '%T', dir.path])).stdout.trim() === 'tmpfs';
      if (direct && !memoryFs) assert.ok(inCache <= 4 * KiB, `${inCache} bytes in the page cache after O_DIRECT writes`);
      else assert.ok(inCache >= written - 4 * KiB, `only ${inCache} bytes in the page cache after buffered writes`);
      const expected = Buffer.alloc(size);
      for (const p of parts) p.data.copy(expected, p.offset);
      assert.ok((await readFile(file)).equals(expected), 'the file holds exactly the written parts, zeros elsewhere');
      assert.ok((await stat(file)).blocks * 512 <= written + 64 * KiB);
    });
  }

  for (const direct of [true, false]) {
    test(`${direct ? 'O_DIRECT' : 'buffered'}: fdatasyncs started as the writes go leave every write in place, and flush still waits for the last`, async () => {
      const file = join(dir.path, `syncing-${direct}.raw`);
      const pieces = Array.from({ length: 48 }, (_, i) => ({ offset: i * 320 * KiB, data: randomBytes(256 * KiB + (i % 2) * 64 * KiB) }));
      const size = 48 * 320 * KiB;
      // A sync started every 256 KiB written: many run while other writes are in flight.
      const w = await createDiskWriter(file, 'raw', size, { direct, syncEvery: 256 * KiB });
      try {
        for (let i = 0; i < pieces.length; i += 8) await Promise.all(pieces.slice(i, i + 8).map((p) => w.write(p.offset, p.data)));
        await w.flush();
      } finally {
        await w.close();
      }
      const expected = Buffer.alloc(size);
      for (const p of pieces) p.data.copy(expected, p.offset);
      assert.ok((await readFile(file)).equals(expected), 'the file holds exactly the written pieces, zeros elsewhere');
    });
  }

  test('a file it creates is 0600 before any data is written, and sized sparse', async () => {
    const file = join(dir.path, 'fresh.raw');
    const w = await createDiskWriter(file, 'raw', 16 * MiB);
    try {
      const st = await stat(file);
      assert.equal((st.mode & 0o777).toString(8), '600');
      assert.equal(st.size, 16 * MiB);
      assert.equal(st.blocks, 0);
    } finally {
      await w.close();
    }
  });
});

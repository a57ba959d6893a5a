/**
 * The chunk index (src/repo/chunk-index.ts) on a real directory repository, with
 * real images and real backups: backups never list chunks/, what the index claims
 * but storage lacks is uploaded again, what storage has but the index lacks is not,
 * gc compacts the index to exactly what stays, and the local cache is only a cache.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Repository } from '../../src/repo/repository.js';
import { ChunkIndex, INDEX_PREFIX, indexNames, openIndex, sealIndex } from '../../src/repo/chunk-index.js';
import { chunkName } from '../../src/repo/chunk.js';
import { collectGarbage } from '../../src/repo/gc.js';
import { LocalStorage } from '../../src/storage/local.js';
import type { GetOptions, Storage } from '../../src/storage/storage.js';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { verify } from '../../src/pipeline/verify.js';
import { compareImages } from '../../src/disk/qemu.js';
import { IntegrityError } from '../../src/errors.js';
import { makeImage, tempDir, writePattern } from '../helpers/images.js';

const PASSWORD = 'index test passphrase';
const MiB = 1024 * 1024;

/** A storage that counts its calls by kind and prefix ("list chunks/", "get index/", …). */
class Counting implements Storage {
  readonly calls = new Map<string, number>();
  constructor(private readonly inner: Storage) {}
  get location() { return this.inner.location; }
  get chunksInFlight() { return this.inner.chunksInFlight; }
  private count(kind: string, name: string) {
    const key = `${kind} ${name.split('/')[0]}${name.includes('/') ? '/' : ''}`;
    this.calls.set(key, (this.calls.get(key) ?? 0) + 1);
  }
  reset() { this.calls.clear(); }
  n(key: string) { return this.calls.get(key) ?? 0; }
  get(name: string, opts?: GetOptions) { this.count('get', name); return this.inner.get(name, opts); }
  put(name: string, data: Uint8Array) { this.count('put', name); return this.inner.put(name, data); }
  stat(name: string) { this.count('stat', name); return this.inner.stat(name); }
  delete(name: string) { this.count('delete', name); return this.inner.delete(name); }
  list(prefix: string) { this.count('list', prefix); return this.inner.list(prefix); }
  close() { return this.inner.close(); }
}

const random = (n: number, seed: number) => Array.from({ length: n }, (_, i) => ({ offset: i * MiB, length: MiB, pattern: (seed * 31 + i * 7) & 0xff }));

async function setup(cacheDir: string | false = false) {
  const dir = await tempDir('vmvault-index-');
  const storage = new Counting(new LocalStorage(join(dir.path, 'repo')));
  await Repository.init(storage, PASSWORD, { kdf: 'weak', chunkSize: MiB });
  const repo = await Repository.open(storage, PASSWORD, { cacheDir, onWarning: () => {} });
  return { dir, storage, repo };
}

async function restoredEqual(repo: Repository, id: string, source: string, to: string): Promise<void> {
  const out = await restore(repo, { backupId: id, to, format: 'qcow2' });
  const disk = out.files.find((f) => f.kind === 'disk')!.path;
  assert.ok((await compareImages(source, disk, 'qcow2', 'qcow2')).identical, `backup ${id.slice(0, 8)} restores identical`);
}

describe('chunk index', () => {
  test('index objects: sealed, named after their content, and checked against the name', async () => {
    const { dir, repo } = await setup();
    try {
      const ids = ['a'.repeat(64), 'b'.repeat(64), '0123456789abcdef'.repeat(4)];
      const { name, data } = sealIndex(repo, ids);
      assert.match(name, /^index\/[0-9a-f]{64}$/);
      assert.equal(openIndex(repo, name, data).toString('hex'), ids.join(''));
      const flipped = Buffer.from(data);
      flipped[flipped.length - 1]! ^= 1;
      assert.throws(() => openIndex(repo, name, flipped), (e) => e instanceof IntegrityError && /does not match its name/.test(e.message));
      assert.throws(() => openIndex(repo, `${INDEX_PREFIX}${'0'.repeat(64)}`, data), IntegrityError);
    } finally {
      await dir.cleanup();
    }
  });

  test('a backup lists neither chunks/ nor reads every object; a second one reuses through the index and both restore identical', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'a.qcow2', 'qcow2', 12 * MiB, random(10, 1));
      storage.reset();
      const first = await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      assert.equal(storage.n('list chunks/'), 0, 'no LIST of chunks/');
      assert.equal(first.stats.chunksNew, 10);
      assert.equal(storage.n('put index/'), 1, 'one index object, written before the manifest');
      // A clone (a different VM, read in full): deduplicated against the index, each chunk confirmed by one stat.
      const clone = await makeImage(dir.path, 'b.qcow2', 'qcow2', 12 * MiB, random(10, 1));
      await writePattern(clone, 'qcow2', 11 * MiB, MiB, 0x77);
      storage.reset();
      const second = await backupVm(repo, { vm: 'b', driver: 'image', disks: [{ path: clone, format: 'qcow2' }] });
      assert.equal(storage.n('list chunks/'), 0, 'no LIST of chunks/');
      assert.equal(second.stats.chunksNew, 1);
      assert.equal(second.stats.chunksReused, 10);
      assert.equal(storage.n('put chunks/'), 1, 'only the new chunk is uploaded');
      assert.equal(storage.n('stat chunks/'), 11, 'one stat per chunk read, none per chunk listed');
      await restoredEqual(repo, first.manifest.id, img, join(dir.path, 'out-a'));
      await restoredEqual(repo, second.manifest.id, clone, join(dir.path, 'out-b'));
    } finally {
      await dir.cleanup();
    }
  });

  test('a chunk the index lists but storage lost is uploaded again, and the backup restores identical', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'a.qcow2', 'qcow2', 8 * MiB, random(6, 2));
      const first = await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      const lost = first.manifest.disks[0]!.chunks.filter((c): c is string => c !== null)[3]!;
      await storage.delete(chunkName(lost));
      const warnings: string[] = [];
      const again = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: (m) => warnings.push(m) });
      const index = await again.chunkIndex();
      assert.equal(index.has(lost), true, 'the index still lists it');
      const second = await backupVm(again, { vm: 'copy', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      assert.equal(second.stats.chunksNew, 1, 'the lost chunk, and nothing else, is uploaded');
      assert.ok(await storage.stat(chunkName(lost)), 'it is back');
      assert.ok(warnings.some((w) => /1 chunk\(s\) the chunk index lists were missing from storage/.test(w)), warnings.join('\n'));
      await restoredEqual(again, second.manifest.id, img, join(dir.path, 'out-2'));
      await restoredEqual(again, first.manifest.id, img, join(dir.path, 'out-1'));
    } finally {
      await dir.cleanup();
    }
  });

  test('an unchanged disk whose chunk storage lost: the chunks taken unread are asked of storage once each, the lost one is read and uploaded, and the backup restores identical', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'u.qcow2', 'qcow2', 8 * MiB, random(6, 5));
      const first = await backupVm(repo, { vm: 'u', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      const stored = first.manifest.disks[0]!.chunks.filter((c): c is string => c !== null);
      await storage.delete(chunkName(stored[2]!));
      storage.reset();
      const warnings: string[] = [];
      const again = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: (m) => warnings.push(m) });
      const second = await backupVm(again, { vm: 'u', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      const disk = second.manifest.disks[0]!;
      assert.equal(disk.mode, 'incremental', disk.reason);
      assert.equal(second.stats.chunksNew, 1, 'the lost chunk, read from the disk again');
      assert.equal(second.stats.chunksUnchanged, stored.length - 1);
      assert.equal(second.stats.bytesRead, MiB, 'that chunk alone was read');
      assert.equal(storage.n('stat chunks/'), new Set(stored).size, 'one stat per distinct chunk taken unread');
      assert.equal(storage.n('list chunks/'), 0);
      assert.ok(warnings.some((w) => /1 chunk\(s\) the chunk index lists were missing from storage/.test(w)), warnings.join('\n'));
      await restoredEqual(again, second.manifest.id, img, join(dir.path, 'out-u2'));
      await restoredEqual(again, first.manifest.id, img, join(dir.path, 'out-u1'));
    } finally {
      await dir.cleanup();
    }
  });

  test('a chunk object left empty or cut short by a crash is neither reused nor counted present: the next backup of that data replaces it, verify finds it unread', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'a.qcow2', 'qcow2', 8 * MiB, random(6, 4));
      const first = await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      const ids = first.manifest.disks[0]!.chunks.filter((c): c is string => c !== null);
      // An empty file (data lost in a crash) and one cut to a few bytes: sizes no sealed chunk has.
      await writeFile(join(dir.path, 'repo', chunkName(ids[1]!)), '');
      await writeFile(join(dir.path, 'repo', chunkName(ids[4]!)), Buffer.alloc(20, 7));
      const warnings: string[] = [];
      const again = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: (m) => warnings.push(m) });
      const second = await backupVm(again, { vm: 'copy', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      assert.equal(second.stats.chunksNew, 2, 'the two damaged chunks, and nothing else, are uploaded');
      assert.ok(warnings.some((w) => /2 chunk object\(s\) in storage had a size no chunk has/.test(w)), warnings.join('\n'));
      await restoredEqual(again, second.manifest.id, img, join(dir.path, 'out-2'));
      await restoredEqual(again, first.manifest.id, img, join(dir.path, 'out-1'));

      await writeFile(join(dir.path, 'repo', chunkName(ids[2]!)), '');
      const report = await verify(again, {});
      assert.equal(report.ok, false);
      assert.equal(report.chunksRead, 0, 'found by its size, without a read');
      assert.deepEqual(report.problems.map((p) => p.problem), ['damaged: 0 bytes, shorter than any sealed chunk']);
      await backupVm(again, { vm: 'third', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      assert.equal((await verify(again, { readData: true })).ok, true, 'healed for every backup that shares it');
    } finally {
      await dir.cleanup();
    }
  });

  test('chunks storage has but no index lists (a backup killed before its index) are not uploaded again, and get indexed', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'a.qcow2', 'qcow2', 8 * MiB, random(6, 3));
      const first = await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      // As if the backup had died before writing its index: the chunks are there, the index is empty.
      for (const name of await indexNames(storage)) await storage.delete(name);
      await repo.writeIndex([]);
      const again = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: () => {} });
      assert.equal((await again.chunkIndex()).size, 0);
      storage.reset();
      const second = await backupVm(again, { vm: 'a2', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      assert.equal(second.stats.chunksNew, 0, 'nothing uploaded twice');
      assert.equal(storage.n('put chunks/'), 0);
      assert.equal(storage.n('list chunks/'), 0);
      const third = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: () => {} });
      const index = await third.chunkIndex();
      for (const id of first.manifest.disks[0]!.chunks) if (id) assert.ok(index.has(id), 'found chunks are indexed by the backup that found them');
      await restoredEqual(third, second.manifest.id, img, join(dir.path, 'out'));
    } finally {
      await dir.cleanup();
    }
  });

  test('a backup that fails before its commit indexes nothing, and a later backup in the same process does not index its chunks', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const a = await makeImage(dir.path, 'a.qcow2', 'qcow2', 8 * MiB, random(4, 21));
      const before = await indexNames(storage);
      await assert.rejects(backupVm(repo, {
        vm: 'a', driver: 'image', disks: [{ path: a, format: 'qcow2' }], beforeCommit: async () => { throw new Error('lost the job'); },
      }), /lost the job/);
      assert.deepEqual(await indexNames(storage), before, 'no index object written');
      const orphans = [...(await repo.chunkIds())];
      assert.equal(orphans.length, 4, 'its chunks were uploaded');
      // gc collects them (no manifest uses them); the next backup of other data must not claim them.
      await collectGarbage(repo);
      const b = await makeImage(dir.path, 'b.qcow2', 'qcow2', 8 * MiB, random(4, 22));
      await backupVm(repo, { vm: 'b', driver: 'image', disks: [{ path: b, format: 'qcow2' }] });
      const index = await (await Repository.open(storage, PASSWORD, { cacheDir: false })).chunkIndex();
      for (const id of orphans) assert.equal(index.has(id), false, 'a collected chunk of the failed backup is not claimed');
      assert.equal(index.size, 4);
    } finally {
      await dir.cleanup();
    }
  });

  test('a repository with no index (an older vmvault) is listed once and indexed; later backups list nothing', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'a.qcow2', 'qcow2', 8 * MiB, random(5, 4));
      await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      for (const name of await indexNames(storage)) await storage.delete(name);
      const warnings: string[] = [];
      const old = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: (m) => warnings.push(m) });
      storage.reset();
      const index = await old.chunkIndex();
      assert.equal(storage.n('list chunks/'), 1);
      assert.equal(index.size, 5);
      assert.ok(warnings.some((w) => /had no chunk index: its 5 chunk\(s\) were listed once and indexed/.test(w)));
      storage.reset();
      await (await Repository.open(storage, PASSWORD, { cacheDir: false })).chunkIndex();
      assert.equal(storage.n('list chunks/'), 0);
    } finally {
      await dir.cleanup();
    }
  });

  test('gc deletes nothing once its lock is no longer its own (removed as stale while it listed the chunks)', async () => {
    const dir = await tempDir('vmvault-index-');
    try {
      let steal = false;
      // Another process removes gc's lock as stale while gc lists chunks/ (gc's refreshes failed, or it was suspended).
      const inner = new LocalStorage(join(dir.path, 'repo'));
      const storage = new (class extends Counting {
        override list(prefix: string) {
          const listing = super.list(prefix);
          if (!steal || prefix !== 'chunks/') return listing;
          return (async function* () {
            for (const n of await readdir(join(dir.path, 'repo', 'locks'))) await inner.delete(`locks/${n}`);
            yield* listing;
          })();
        }
      })(inner);
      await Repository.init(storage, PASSWORD, { kdf: 'weak', chunkSize: MiB });
      const repo = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: () => {} });
      const b = await makeImage(dir.path, 'b.qcow2', 'qcow2', 8 * MiB, random(4, 8));
      const gone = await backupVm(repo, { vm: 'b', driver: 'image', disks: [{ path: b, format: 'qcow2' }] });
      await repo.deleteManifest(gone.manifest.id);
      const chunksBefore = [...(await repo.chunkIds())].sort();
      const indexBefore = await indexNames(storage);
      steal = true;
      await assert.rejects(collectGarbage(repo), (e: Error & { code?: string }) => e.code === 'LOCKED' && /exclusive lock for garbage collection was lost \(another process removed it as stale\)/.test(e.message));
      steal = false;
      assert.deepEqual([...(await repo.chunkIds())].sort(), chunksBefore, 'no chunk deleted');
      assert.deepEqual(await indexNames(storage), indexBefore, 'the index untouched');
      assert.equal((await collectGarbage(repo)).chunksDeleted, chunksBefore.length, 'a gc that keeps its lock collects them');
    } finally {
      await dir.cleanup();
    }
  });

  test('gc compacts the index to exactly the chunks that stay; a damaged index object costs only its chunks', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const a = await makeImage(dir.path, 'a.qcow2', 'qcow2', 8 * MiB, random(4, 5));
      const b = await makeImage(dir.path, 'b.qcow2', 'qcow2', 8 * MiB, random(4, 6));
      const kept = await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: a, format: 'qcow2' }] });
      const gone = await backupVm(repo, { vm: 'b', driver: 'image', disks: [{ path: b, format: 'qcow2' }] });
      await repo.deleteManifest(gone.manifest.id);
      const before = await indexNames(storage);
      assert.equal(before.length, 3, 'the empty one of init, and one per backup');
      const report = await collectGarbage(repo);
      assert.equal(report.chunksDeleted, 4);
      const after = await indexNames(storage);
      assert.equal(after.length, 1);
      assert.ok(!before.includes(after[0]!));
      const ids = openIndex(repo, after[0]!, await storage.get(after[0]!));
      const listed = new Set(Array.from({ length: ids.length / 32 }, (_, i) => ids.subarray(i * 32, i * 32 + 32).toString('hex')));
      assert.deepEqual([...listed].sort(), [...(await repo.chunkIds())].sort(), 'the index lists exactly the chunks stored');
      const index = await (await Repository.open(storage, PASSWORD, { cacheDir: false })).chunkIndex();
      for (const id of gone.manifest.disks[0]!.chunks) if (id) assert.equal(index.has(id), false, 'a collected chunk is not claimed');
      // Damage the index object: its chunks become unknown (a warning), the next backup checks and reuses them.
      await writeFile(join(dir.path, 'repo', after[0]!), 'garbage');
      const warnings: string[] = [];
      const damaged = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: (m) => warnings.push(m) });
      const again = await backupVm(damaged, { vm: 'a', driver: 'image', disks: [{ path: a, format: 'qcow2' }], fullRead: true });
      assert.ok(warnings.some((w) => /index object index\/[0-9a-f]+ is damaged/.test(w)), warnings.join('\n'));
      assert.equal(again.stats.chunksNew, 0);
      await restoredEqual(damaged, kept.manifest.id, a, join(dir.path, 'out'));
    } finally {
      await dir.cleanup();
    }
  });

  test('the local cache: index objects are downloaded once per host; a lost or tampered cache costs downloads only', async () => {
    const { dir, storage } = await setup();
    const cache = join(dir.path, 'cache');
    try {
      const repo = await Repository.open(storage, PASSWORD, { cacheDir: cache, onWarning: () => {} });
      for (const seed of [7, 8, 9]) {
        const img = await makeImage(dir.path, `v${seed}.qcow2`, 'qcow2', 4 * MiB, random(3, seed));
        await backupVm(repo, { vm: `v${seed}`, driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      }
      const other = async () => (await Repository.open(storage, PASSWORD, { cacheDir: cache, onWarning: () => {} })).chunkIndex();
      storage.reset();
      let index = await other();
      assert.equal(storage.n('get index/'), 0, 'everything this host wrote is cached');
      assert.equal(index.size, 9);
      const cached = join(cache, repo.id, 'index');
      const files = await readdir(cached);
      assert.equal(files.length, 4);
      await writeFile(join(cached, files[0]!), 'tampered');
      await rm(join(cached, files[1]!));
      storage.reset();
      index = await other();
      assert.equal(storage.n('get index/'), 2, 'the tampered and the lost object are downloaded again');
      assert.equal(index.size, 9);
      storage.reset();
      await other();
      assert.equal(storage.n('get index/'), 0, 'and cached again');
    } finally {
      await dir.cleanup();
    }
  });

  test('ChunkIndex: quarantined chunks are neither claimed nor checked, so producing one uploads it', async () => {
    const { dir, storage } = await setup();
    try {
      const q = 'c'.repeat(64);
      const index = new ChunkIndex(new BigUint64Array([BigInt(`0x${q.slice(0, 16)}`)]), new Set([q]), storage, { objects: 1, fetched: 0, damaged: [], built: false });
      assert.equal(index.has(q), false);
      assert.equal(await index.present(q), false);
      assert.equal(storage.n('stat chunks/'), 0);
      index.add(q);
      assert.equal(index.has(q), true, 'stored by this session');
    } finally {
      await dir.cleanup();
    }
  });
});

describe("a VM's previous backups", () => {
  test('are found without decrypting other VMs\' manifests again: one GET for its newest manifest once the host has seen the rest', async () => {
    const { dir, storage } = await setup();
    const cache = join(dir.path, 'cache');
    try {
      const open = () => Repository.open(storage, PASSWORD, { cacheDir: cache, onWarning: () => {} });
      const images = new Map<string, string>();
      for (const vm of ['a', 'b', 'c']) {
        images.set(vm, await makeImage(dir.path, `${vm}.qcow2`, 'qcow2', 4 * MiB, random(3, vm.charCodeAt(0))));
        for (let i = 0; i < 2; i++) await backupVm(await open(), { vm, driver: 'image', disks: [{ path: images.get(vm)!, format: 'qcow2' }] });
      }
      storage.reset();
      const repo = await open();
      const next = await backupVm(repo, { vm: 'a', driver: 'image', disks: [{ path: images.get('a')!, format: 'qcow2' }] });
      assert.equal(next.manifest.disks[0]!.mode, 'incremental', 'the previous backup was found');
      assert.equal(storage.n('get backups/'), 1, 'only the newest manifest of VM a is read');
      // A cache that lies (another VM's backup listed as a's) is ignored with a warning, never trusted.
      const summaries = join(cache, repo.id, 'backups');
      const bId = (await repo.vmBackups('b')).at(-1)!.id;
      const { readFile: rf } = await import('node:fs/promises');
      const lie = JSON.parse(await rf(join(summaries, bId), 'utf8'));
      lie.vm = 'a';
      lie.time = new Date(Date.now() + 3600_000).toISOString();
      await writeFile(join(summaries, bId), JSON.stringify(lie));
      const warnings: string[] = [];
      const fooled = await Repository.open(storage, PASSWORD, { cacheDir: cache, onWarning: (m) => warnings.push(m) });
      const after = await backupVm(fooled, { vm: 'a', driver: 'image', disks: [{ path: images.get('a')!, format: 'qcow2' }] });
      assert.ok(warnings.some((w) => w.includes(`backup ${bId} as one of VM "a", but it is of "b"`)), warnings.join('\n'));
      assert.equal(after.manifest.disks[0]!.mode, 'incremental', "a's own previous backup still counts");
      await restoredEqual(fooled, after.manifest.id, images.get('a')!, join(dir.path, 'out'));
      // A cached summary of the wrong shape (another vmvault's, or damaged) is a cache miss, never a crash.
      const newest = (await fooled.vmBackups('a')).at(-1)!.id;
      for (const bad of [{ id: newest, vm: 'a', time: 'x', disks: [null] }, { id: newest, vm: 'a', time: 'x', disks: [{}] }]) {
        await writeFile(join(summaries, newest), JSON.stringify(bad));
        const r = await Repository.open(storage, PASSWORD, { cacheDir: cache, onWarning: () => {} });
        const again = await backupVm(r, { vm: 'a', driver: 'image', disks: [{ path: images.get('a')!, format: 'qcow2' }] });
        assert.equal(again.manifest.disks[0]!.mode, 'incremental', JSON.stringify(bad));
      }
    } finally {
      await dir.cleanup();
    }
  });

  test('verify counts a chunk present only under its own name: one moved to another chunks/ directory is missing, as restore finds it', async () => {
    const { dir, storage, repo } = await setup();
    try {
      const img = await makeImage(dir.path, 'w.qcow2', 'qcow2', 4 * MiB, random(2, 9));
      const made = await backupVm(repo, { vm: 'w', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
      const id = made.manifest.disks[0]!.chunks.find((c): c is string => c !== null)!;
      const other = id.startsWith('00') ? '01' : '00';
      await storage.put(`chunks/${other}/${id}`, await storage.get(chunkName(id)));
      await storage.delete(chunkName(id));
      const report = await verify(repo);
      assert.equal(report.ok, false);
      assert.deepEqual(report.problems.map((p) => [p.object, p.problem]), [[chunkName(id), 'missing']]);
    } finally {
      await dir.cleanup();
    }
  });
});

describe('the index under concurrent writers', () => {
  test('two hosts back up clones at once, gc waits for them, and the index then lists exactly what is stored', async (t) => {
    const { dir, storage } = await setup();
    let running: Promise<unknown> | undefined;
    try {
      const host = (name: string) => Repository.open(storage, PASSWORD, { cacheDir: join(dir.path, `cache-${name}`), onWarning: () => {} });
      const [h1, h2] = await Promise.all([host('one'), host('two')]);
      const base = random(24, 11);
      const a = await makeImage(dir.path, 'a.qcow2', 'qcow2', 32 * MiB, base);
      const b = await makeImage(dir.path, 'b.qcow2', 'qcow2', 32 * MiB, base);
      await writePattern(b, 'qcow2', 30 * MiB, MiB, 0x99);
      // A backup reports progress once it holds its lock and has read data: its lock file
      // alone is not enough (written before it looks for others' locks, it would meet gc's
      // and back off, which is right, but not what this test is about).
      const reading = new Set<string>();
      const onProgress = (vm: string) => () => { reading.add(vm); };
      const both = Promise.all([
        backupVm(h1, { vm: 'a', driver: 'image', disks: [{ path: a, format: 'qcow2' }], onProgress: onProgress('a') }),
        backupVm(h2, { vm: 'b', driver: 'image', disks: [{ path: b, format: 'qcow2' }], onProgress: onProgress('b') }),
      ]);
      running = both;
      let ended = false;
      void both.finally(() => { ended = true; }).catch(() => undefined);
      // gc while the backups hold their shared locks: refused, nothing deleted, the index untouched.
      const locks = async () => { let n = 0; for await (const _ of storage.list('locks/')) n++; return n; };
      while (!ended && (reading.size < 2 || (await locks()) < 2)) await new Promise((r) => setTimeout(r, 5));
      if (ended) await both; // a backup that failed early: its own error
      const indexBefore = await indexNames(storage);
      await assert.rejects(collectGarbage(h1), (e: { code?: string }) => e.code === 'LOCKED');
      assert.deepEqual((await indexNames(storage)).filter((n) => indexBefore.includes(n)), indexBefore, 'no index object removed');
      const [ra, rb] = await both;
      // A chunk both read at the same moment may be uploaded by both (each stats it before the
      // other's put lands); each host uploads a chunk once at most. How many overlap depends on
      // timing (reported: 2 to 14 here, the more the faster the pipeline against the puts), so
      // the count is a diagnostic, and what is asserted is what holds whatever the timing.
      const stored = await h1.chunkIds();
      const twice = ra.stats.chunksNew + rb.stats.chunksNew - stored.size;
      t.diagnostic(`${stored.size} chunks stored, ${twice} uploaded by both hosts`);
      assert.ok(twice >= 0 && twice <= Math.min(ra.stats.chunksNew, rb.stats.chunksNew), `${twice} chunks uploaded twice`);
      assert.equal(stored.size, 25, 'the 24 shared chunks and the one that differs, each stored once');
      const index = await (await host('three')).chunkIndex();
      for (const id of stored) assert.ok(index.has(id), 'every stored chunk is indexed after both commits');
      await collectGarbage(h2);
      const names = await indexNames(storage);
      const listed = new Set<string>();
      for (const n of names) { const ids = openIndex(h2, n, await storage.get(n)); for (let o = 0; o < ids.length; o += 32) listed.add(ids.subarray(o, o + 32).toString('hex')); }
      assert.deepEqual([...listed].sort(), [...stored].sort());
      await restoredEqual(h1, ra.manifest.id, a, join(dir.path, 'out-a'));
      await restoredEqual(h2, rb.manifest.id, b, join(dir.path, 'out-b'));
    } finally {
      // A failure above leaves a backup running: it ends before its files are removed (or the
      // removal fails, hiding what went wrong).
      await running?.catch(() => undefined);
      await dir.cleanup();
    }
  });

  test('a host without a cache reads small index objects several at a time and gc-sized ones one at a time, and loads every id', async () => {
    const dir = await tempDir('vmvault-index-reads-');
    /** Index reads take 20 ms each; counts how many ran at once. */
    class SlowIndexReads implements Storage {
      running = 0;
      most = 0;
      constructor(private readonly inner: Storage) {}
      get location() { return this.inner.location; }
      async get(name: string, opts?: GetOptions) {
        if (!name.startsWith(INDEX_PREFIX)) return this.inner.get(name, opts);
        this.most = Math.max(this.most, ++this.running);
        try {
          await new Promise((r) => setTimeout(r, 20));
          return await this.inner.get(name, opts);
        } finally {
          this.running--;
        }
      }
      put(name: string, data: Uint8Array) { return this.inner.put(name, data); }
      stat(name: string) { return this.inner.stat(name); }
      delete(name: string) { return this.inner.delete(name); }
      list(prefix: string) { return this.inner.list(prefix); }
      close() { return this.inner.close(); }
    }
    try {
      const storage = new SlowIndexReads(new LocalStorage(join(dir.path, 'repo')));
      await Repository.init(storage, PASSWORD, { kdf: 'weak', chunkSize: MiB });
      const repo = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: () => {} });
      const ids = (n: number) => Array.from({ length: n }, () => randomBytes(32).toString('hex'));
      const plant = async (list: string[]) => {
        const { name, data } = sealIndex(repo, list);
        await storage.put(name, data);
        return name;
      };
      // Twenty small objects, as backups leave them between two gc runs.
      const small = await Promise.all(Array.from({ length: 20 }, () => plant(ids(10))));
      assert.equal((await repo.chunkIndex()).size, 200);
      assert.ok(storage.most > 1 && storage.most <= 8, `small objects are read several at a time, at most 8: ${storage.most}`);
      // Two objects of the size gc writes (65536 ids, 2 MiB): one at a time.
      for (const name of small) await storage.delete(name);
      await plant(ids(65536));
      await plant(ids(65536));
      storage.most = 0;
      assert.equal((await repo.chunkIndex()).size, 131072);
      assert.equal(storage.most, 1, 'gc-sized objects are read one at a time');
    } finally {
      await dir.cleanup();
    }
  });
});

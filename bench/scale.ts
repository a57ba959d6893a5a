/**
 * Scale benchmark: the backup of one small VM into a repository that already holds
 * 1,000,000 chunks. What it must not pay for is everyone else's data.
 *
 *   node dist/bench/scale.js setup DIR [CHUNKS]   # the synthetic repository (once; ~1 min)
 *   node dist/bench/scale.js measure DIR          # one backup, in a fresh process
 *   bash bench/scale.sh                           # both, before (a given commit) and after
 *
 * setup: a directory repository with CHUNKS (default 1,000,000) chunk objects, empty
 * files named by random chunk ids (their content is never read: only their existence
 * matters, to a listing or a stat), the chunk index listing them (compacted, as gc
 * leaves it).
 *
 * measure: makes a 64 MiB qcow2 image with 40 MiB of fresh random data (10 chunks
 * that are new to the repository), then opens the repository through a counting storage, backs the image up, and
 * prints JSON: time to the first chunk upload (from the start of the backup, and
 * from the start of the process), peak RSS of the process, storage requests by kind
 * before the first upload and in all (a LIST counted as S3 pages of 1000 names), and the backup's own figures. Run against an
 * older build (bench/scale.sh does), it gives the "before" figures on the same data.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile, rm, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { Repository } from '../src/repo/repository.js';
import { LocalStorage } from '../src/storage/local.js';
import type { GetOptions, Storage } from '../src/storage/storage.js';
import { backupVm } from '../src/vm/drivers.js';

const PASSWORD = 'scale bench passphrase';
const MiB = 1024 * 1024;

class Counting implements Storage {
  readonly total = new Map<string, number>();
  beforeUpload: Record<string, number> | undefined;
  firstUploadAt: number | undefined;
  constructor(private readonly inner: Storage) {}
  get location() { return this.inner.location; }
  get chunksInFlight() { return this.inner.chunksInFlight; }
  private count(kind: string, name: string): void {
    const key = `${kind} ${name.split('/')[0]}`;
    this.total.set(key, (this.total.get(key) ?? 0) + 1);
  }
  get(name: string, opts?: GetOptions) { this.count('GET', name); return this.inner.get(name, opts); }
  put(name: string, data: Uint8Array) {
    if (name.startsWith('chunks/') && this.firstUploadAt === undefined) {
      this.firstUploadAt = performance.now();
      this.beforeUpload = Object.fromEntries(this.total);
    }
    this.count('PUT', name);
    return this.inner.put(name, data);
  }
  stat(name: string) { this.count('HEAD', name); return this.inner.stat(name); }
  delete(name: string) { this.count('DELETE', name); return this.inner.delete(name); }
  /** Counted as S3 would answer it: one request per page of 1000 names. */
  async *list(prefix: string) {
    let n = 0;
    this.count('LIST', prefix);
    for await (const item of this.inner.list(prefix)) {
      if (++n % 1000 === 0) this.count('LIST', prefix);
      yield item;
    }
  }
  close() { return this.inner.close(); }
}

async function setup(dir: string, count: number): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const storage = new LocalStorage(join(dir, 'repo'));
  const repo = await Repository.init(storage, PASSWORD, { kdf: 'weak' });
  const ids: string[] = [];
  const t0 = performance.now();
  for (let d = 0; d < 256; d++) await mkdir(join(dir, 'repo', 'chunks', d.toString(16).padStart(2, '0')), { recursive: true });
  const batch: Promise<void>[] = [];
  for (let i = 0; i < count; i++) {
    const id = randomBytes(32).toString('hex');
    ids.push(id);
    batch.push(writeFile(join(dir, 'repo', 'chunks', id.slice(0, 2), id), ''));
    if (batch.length === 512) await Promise.all(batch.splice(0));
  }
  await Promise.all(batch);
  // As gc leaves it: the index compacted into objects of 65536 ids.
  for (const name of await repo.indexNames()) await storage.delete(name);
  const names = await repo.writeIndex(ids);
  process.stdout.write(`${JSON.stringify({ chunks: count, indexObjects: names.length, seconds: (performance.now() - t0) / 1000 })}\n`);
}

/**
 * A fresh 64 MiB qcow2 image with 40 MiB of random data: 10 chunks no repository has.
 * Made by child processes, so that the peak RSS this process reports is the backup's.
 */
async function freshImage(dir: string): Promise<string> {
  const img = join(dir, 'vm.qcow2');
  const random = join(dir, 'random.bin');
  await execa('dd', ['if=/dev/urandom', `of=${random}`, 'bs=1M', 'count=40', 'status=none']);
  await rm(img, { force: true });
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', random, img]);
  await execa('qemu-img', ['resize', '-q', '-f', 'qcow2', img, '64M']);
  await rm(random);
  return img;
}

async function measure(dir: string): Promise<void> {
  const img = await freshImage(dir);
  const storage = new Counting(new LocalStorage(join(dir, 'repo')));
  const openStart = performance.now();
  // No host cache directory: the first backup on a new host (the index is downloaded).
  const cacheDir = process.env.SCALE_CACHE_DIR;
  const repo = await Repository.open(storage, PASSWORD, { cacheDir: cacheDir ? cacheDir : false, onWarning: (m: string) => process.stderr.write(`warning: ${m}\n`) } as never);
  const backupStart = performance.now();
  const made = await backupVm(repo, { vm: `scale-${randomBytes(3).toString('hex')}`, driver: 'image', disks: [{ path: img, format: 'qcow2' }] } as never);
  const end = performance.now();
  // Its manifest is removed again, so that every run finds as many backups (its 10 chunks stay).
  await repo.deleteManifest(made.manifest.id);
  const version = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')).version as string;
  process.stdout.write(`${JSON.stringify({
    version,
    openSeconds: +((backupStart - openStart) / 1000).toFixed(3),
    firstUploadSeconds: storage.firstUploadAt === undefined ? null : +((storage.firstUploadAt - backupStart) / 1000).toFixed(3),
    // performance.now() counts from the start of the process.
    firstUploadFromProcessStartSeconds: storage.firstUploadAt === undefined ? null : +(storage.firstUploadAt / 1000).toFixed(3),
    backupSeconds: +((end - backupStart) / 1000).toFixed(3),
    peakRssMiB: Math.round(process.resourceUsage().maxRSS / 1024),
    requestsBeforeFirstUpload: storage.beforeUpload ?? null,
    requestsBeforeFirstUploadTotal: storage.beforeUpload ? Object.values(storage.beforeUpload).reduce((a, b) => a + b, 0) : null,
    requestsTotal: Object.fromEntries(storage.total),
    stats: made.stats,
  })}\n`);
}

const [mode, dir, count] = process.argv.slice(2);
if (!dir || (mode !== 'setup' && mode !== 'measure')) {
  process.stderr.write('usage: scale.js setup DIR [CHUNKS] | measure DIR\n');
  process.exit(2);
}
await (mode === 'setup' ? setup(dir, Number(count ?? 1_000_000)) : measure(dir));
process.exit(0);

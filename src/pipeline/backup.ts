/**
 * Backup of one VM's disks: point in time → read through NBD → chunk → hash →
 * dedup → seal → upload, with bounded concurrency; the manifest is written last.
 */
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { hostname } from 'node:os';
import { NotFoundError, VmvaultError } from '../errors.js';
import { exportImage, imageInfo, snapshotCreate, snapshotDelete, type ImageInfo } from '../disk/qemu.js';
import type { NbdClient } from '../disk/nbd.js';
import type { Repository } from '../repo/repository.js';
import type { BackupStats, DiskEntry, Manifest } from '../repo/manifest.js';
import { ChunkPool } from './pool.js';
import { dataBytes, planChunks, type ChunkPlan } from './plan.js';
import { TaskWindow } from './window.js';
import { BufferPool } from './buffers.js';
import { ProgressMeter, type ProgressFn } from './progress.js';
import { assertSafeName, diskNameFromPath, uniqueNames } from './names.js';
import { withLock, type HeldLock } from '../repo/locks.js';

export interface BackupRequest {
  vm: string;
  /** Disk image paths, optionally named (`name` defaults to the file name without extension). */
  disks: { path: string; name?: string }[];
  /** Configuration files stored with the backup (e.g. a libvirt domain XML). */
  configs?: string[];
  labels?: string[];
  policy?: string;
  host?: string;
  onProgress?: ProgressFn;
  /** Chunks processed at once; bounds memory to about 2 × inFlight × chunk size. */
  inFlight?: number;
  /**
   * Called just before the manifest is written; throwing aborts the backup without
   * committing it (a queue worker checks here that it still owns its job).
   */
  beforeCommit?: () => Promise<void>;
  /**
   * The disk paths already are one point in time that nothing writes to while the
   * backup reads them (a running VM's base images under overlays, see src/vm/live.ts):
   * they are read as they are, without an internal snapshot.
   */
  frozen?: boolean;
  /**
   * Stops the backup (rejecting with the signal's reason) before its next chunk; the
   * cleanup of the point in time still runs, and nothing is committed.
   */
  signal?: AbortSignal;
  /** Recorded in the manifest; default `offline` (frozen: the caller says `crash` or `application`). */
  consistency?: Manifest['consistency'];
}

export interface BackupResult { manifest: Manifest; stats: BackupStats }

/** Internal snapshots this tool creates are named with this prefix, so leftovers can be found. */
export const SNAPSHOT_PREFIX = 'vmvault-';
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;
const STATUS_WINDOW = 1024 * 1024 * 1024;

export async function backup(repo: Repository, req: BackupRequest): Promise<BackupResult> {
  const started = Date.now();
  if (!req.vm.trim()) throw new VmvaultError('BAD_INPUT', 'the VM name is empty');
  if (req.disks.length === 0) throw new VmvaultError('BAD_INPUT', `no disk given for VM "${req.vm}": pass at least one --disk`);
  // Inspect everything before writing anything: a bad path or a locked image fails here.
  const infos: ImageInfo[] = [];
  for (const d of req.disks) infos.push(await imageInfo(d.path));
  const names = uniqueNames(req.disks.map((d) => d.name ?? diskNameFromPath(d.path)));
  names.forEach((n) => assertSafeName(n, 'disk name'));
  const configs = await readConfigs(req.configs ?? []);

  // A shared lock: garbage collection (exclusive) cannot delete the chunks this backup reuses.
  return withLock(repo, 'shared', { purpose: `backup of ${req.vm}` }, (lock) => run(repo, req, infos, names, configs, started, lock));
}

async function run(
  repo: Repository, req: BackupRequest, infos: ImageInfo[], names: string[], configs: Manifest['configs'], started: number, lock: HeldLock,
): Promise<BackupResult> {
  const id = randomBytes(32).toString('hex');
  const stats: BackupStats = { bytesRead: 0, bytesUploaded: 0, chunksNew: 0, chunksReused: 0, chunksZero: 0, seconds: 0 };
  // Quarantined chunks are left out: producing one uploads it again, which heals it (repo/health.ts).
  const known = await repo.usableChunkIds();
  const meter = new ProgressMeter('backup', infos.reduce((n, i) => n + i.virtualSize, 0), req.onProgress);
  const pool = new ChunkPool(repo.workerInit());
  const disks: DiskEntry[] = [];
  try {
    for (const [i, info] of infos.entries()) {
      meter.disk = names[i]!;
      const chunks = await backupDisk(repo, pool, info, id, known, stats, meter, req.inFlight ?? 10, req.frozen ?? false, req.signal);
      disks.push({ name: names[i]!, format: info.format, virtualSize: info.virtualSize, sourcePath: info.path, chunks });
    }
  } finally {
    await pool.close();
  }
  meter.finish();
  stats.seconds = (Date.now() - started) / 1000;
  const manifest: Manifest = {
    version: 1, id, vm: req.vm, host: req.host ?? hostname(), time: new Date(started).toISOString(),
    labels: [...new Set(req.labels ?? [])], ...(req.policy ? { policy: req.policy } : {}),
    consistency: req.consistency ?? 'offline',
    chunkSize: repo.chunkSize, disks, configs, stats,
  };
  req.signal?.throwIfAborted();
  await req.beforeCommit?.();
  await lock.confirm();
  await repo.saveManifest(manifest);
  return { manifest, stats };
}

async function readConfigs(paths: string[]): Promise<Manifest['configs']> {
  const out: Manifest['configs'] = [];
  const names = uniqueNames(paths.map((p) => basename(p)));
  let total = 0;
  for (const [i, p] of paths.entries()) {
    let data: Buffer;
    try {
      data = await readFile(p);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new NotFoundError(`config file ${p} does not exist`);
      throw new VmvaultError('BAD_INPUT', `cannot read config file ${p}: ${(err as Error).message}`);
    }
    total += data.length;
    if (total > MAX_CONFIG_BYTES) throw new VmvaultError('BAD_INPUT', `config files add up to more than ${MAX_CONFIG_BYTES >> 20} MiB: pass only configuration, not data`);
    assertSafeName(names[i]!, 'config file name');
    out.push({ name: names[i]!, sourcePath: p, data: data.toString('base64') });
  }
  return out;
}

/** Point in time for one image: an internal snapshot for qcow2, the file itself otherwise (or when the caller froze it). */
async function backupDisk(
  repo: Repository, pool: ChunkPool, info: ImageInfo, backupId: string, known: Set<string>,
  stats: BackupStats, meter: ProgressMeter, inFlight: number, frozen: boolean, signal?: AbortSignal,
): Promise<(string | null)[]> {
  let snapshot: string | undefined;
  if (info.format === 'qcow2' && !frozen) {
    await removeStaleSnapshots(info);
    snapshot = `${SNAPSHOT_PREFIX}${backupId.slice(0, 16)}`;
    await snapshotCreate(info.path, snapshot);
  }
  try {
    const exp = await exportImage(info.path, { format: info.format, readOnly: true, ...(snapshot ? { snapshot } : {}) });
    try {
      return await readChunks(repo, pool, exp.client, info.virtualSize, known, stats, meter, inFlight, signal);
    } finally {
      await exp.close();
    }
  } finally {
    if (snapshot) await snapshotDelete(info.path, snapshot);
  }
}

/** Snapshots left by a backup that was killed: the image is not in use now (we could inspect it), so they are ours to remove. */
async function removeStaleSnapshots(info: ImageInfo): Promise<void> {
  for (const s of info.snapshots) {
    if (s.name.startsWith(SNAPSHOT_PREFIX)) await snapshotDelete(info.path, s.name);
  }
}

async function readChunks(
  repo: Repository, pool: ChunkPool, client: NbdClient, size: number, known: Set<string>,
  stats: BackupStats, meter: ProgressMeter, inFlight: number, signal?: AbortSignal,
): Promise<(string | null)[]> {
  const chunkSize = repo.chunkSize;
  const ids: (string | null)[] = new Array(Math.ceil(size / chunkSize)).fill(null);
  const uploading = new Map<string, Promise<void>>();
  const window = new TaskWindow(inFlight);

  const buffers = new BufferPool(chunkSize, inFlight);

  const one = async (plan: ChunkPlan) => {
    const data = await readPlan(client, plan, buffers);
    stats.bytesRead += dataBytes(plan);
    const { id, data: plain } = await pool.hash(data);
    meter.add(plan.length);
    if (id === null) {
      stats.chunksZero++;
      buffers.give(plain);
      return;
    }
    ids[plan.index] = id;
    const pendingUpload = uploading.get(id);
    if (known.has(id) || pendingUpload) {
      stats.chunksReused++;
      buffers.give(plain);
      await pendingUpload;
      return;
    }
    const upload = (async () => {
      const { sealed, plain: back } = await pool.seal(id, plain);
      buffers.give(back);
      await repo.putChunk(id, sealed);
      stats.bytesUploaded += sealed.length;
      stats.chunksNew++;
      known.add(id);
    })();
    uploading.set(id, upload);
    try {
      await upload;
    } finally {
      uploading.delete(id);
    }
  };

  for (let start = 0; start < size && window.ok; start += STATUS_WINDOW) {
    const end = Math.min(size, start + STATUS_WINDOW);
    const plans = planChunks(await client.extents(start, end - start), start, end, chunkSize);
    for (const plan of plans) {
      if (plan.data.length === 0) {
        stats.chunksZero++;
        meter.add(plan.length);
        continue;
      }
      signal?.throwIfAborted();
      await window.add(() => one(plan));
    }
  }
  await window.drain();
  return ids;
}

/** Reads a chunk's data ranges into a pooled buffer; the rest of the chunk is zeros. */
async function readPlan(client: NbdClient, plan: ChunkPlan, buffers: BufferPool): Promise<Buffer> {
  const buf = buffers.take(plan.length);
  if (plan.data.length !== 1 || plan.data[0]!.length !== plan.length) buf.fill(0);
  await Promise.all(plan.data.map((r) => client.readInto(r.offset, buf.subarray(r.offset - plan.offset, r.offset - plan.offset + r.length))));
  return buf;
}

/**
 * Backup of one VM's disks once a point-in-time driver (src/vm/) has frozen them:
 * read through NBD → chunk → hash → dedup → seal → upload, with bounded
 * concurrency; the manifest is written last. The pipeline only reads, chunks and
 * commits: how the instant is taken is the driver's business.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { hostname } from 'node:os';
import { IntegrityError, NotFoundError, VmvaultError, errorMessage } from '../errors.js';
import { exportImage, type ImageFormat } from '../disk/qemu.js';
import { openImageFile, type BlockReader } from '../disk/direct-read.js';
import { abortWith, type NbdClient } from '../disk/nbd.js';
import { inspectDisk, type InspectedDisk } from '../disk/inspect.js';
import type { Repository } from '../repo/repository.js';
import type { BackupStats, DiskEntry, Manifest } from '../repo/manifest.js';
import { ownPool, type ChunkPool, type PoolLease } from './pool.js';
import { readChunks, type ChangedBlocks, type ReadChunksOptions } from './chunk-reader.js';
import { ProgressMeter, type ProgressFn } from './progress.js';
import { assertSafeName, diskNameFromPath, uniqueNames } from './names.js';
import { withLock, type HeldLock } from '../repo/locks.js';
import { DEFAULT_CHUNKS_IN_FLIGHT } from '../storage/storage.js';

/**
 * A disk as the VM's configuration gives it: its path, optional name (default: the
 * file name without extension), the format the configuration states (without it the
 * image is probed once by vmvault and the result pinned by the manifest) and whether
 * the image may name other files (a linked clone's backing chain).
 */
export interface BackupDisk { path: string; name?: string; format?: ImageFormat; allowChain?: boolean }

/** A disk inspected and named, ready for a driver to freeze, with its newest earlier backup when there is one. */
export interface NamedDisk extends InspectedDisk {
  name: string;
  /** The newest earlier backup of this disk, and when the disk was last read in full. */
  previous?: { backupId: string; chunkSize: number; entry: DiskEntry; lastFullRead?: string };
}

export type { ChangedBlocks } from './chunk-reader.js';

export type FileStamp = NonNullable<DiskEntry['fileStamp']>;

/** One disk of a point in time, as the pipeline reads it. */
export interface FrozenDisk extends NamedDisk {
  /** A qcow2 internal snapshot holding the instant; without it the image itself is frozen (nothing writes to it while it is read). */
  snapshot?: string;
  /** Read only what changed (the rest comes from `changes.previous`); absent: read everything. */
  changes?: ChangedBlocks;
  /** Recorded in the manifest: how the disk is read and why (e.g. why not incrementally). */
  mode: 'full' | 'incremental';
  reason: string;
  /** The bitmap left in the image counting changes from this instant, for the next backup. */
  bitmap?: string;
  /**
   * With `changes`: read everything anyway, and compare every chunk `changes` calls
   * unchanged with the previous backup's id (an audit of change tracking).
   */
  audit?: boolean;
  fileStamp?: FileStamp;
  /** The identity of each file of `chain` (DiskEntry.chainStamps). */
  chainStamps?: FileStamp[];
  /**
   * The driver serves this disk itself (libvirt's NBD export of a pull-mode backup, or
   * the qemu-nbd that also serves the bitmap): the pipeline reads through a client
   * from here instead of starting a qemu-nbd of `path`, and closes that client; the
   * driver's `close()` stops its server.
   */
  connect?: () => Promise<NbdClient>;
  /**
   * Called after each read of this disk: throws when what was read may no longer be the
   * instant's (a disk read without a snapshot, which the driver checks is still unwritten).
   */
  verifyRead?: () => Promise<void>;
  /**
   * The driver found nothing to read (the disk is unchanged): only a chunk that storage
   * lacks is read from it. No chunk threads are started for such a disk alone.
   */
  readsNothing?: boolean;
}

/** What the pipeline needs of a backup besides the frozen disks. */
export interface BackupOptions {
  vm: string;
  /** Configuration files stored with the backup (e.g. a libvirt domain XML). */
  configs?: string[];
  labels?: string[];
  policy?: string;
  host?: string;
  onProgress?: ProgressFn;
  /**
   * Chunks processed at once (one slot of chunk size each, plus one per sealing thread);
   * by default what the repository's storage asks for (Storage.chunksInFlight).
   */
  inFlight?: number;
  /** Where the chunk threads come from (a long-running process keeps them: PoolKeeper); default a pool of its own. */
  chunkPool?: () => PoolLease;
  /**
   * Called once every disk was read, before anything is committed: the driver may give
   * back what held the instant for reading (PointInTime.read) while the backup commits.
   */
  onRead?: () => void;
  /**
   * Called just before the manifest is written; throwing aborts the backup without
   * committing it (a queue worker checks here that it still owns its job).
   */
  beforeCommit?: () => Promise<void>;
  /**
   * Stops the backup (rejecting with the signal's reason) before its next chunk; the
   * driver's cleanup of the point in time still runs, and nothing is committed.
   */
  signal?: AbortSignal;
}

export interface BackupRequest extends BackupOptions {
  /** The backup's id (newBackupId), known before the point in time so that its bitmaps can be named after it. */
  id: string;
  disks: FrozenDisk[];
  /** What the instant guarantees, recorded in the manifest. */
  consistency: NonNullable<Manifest['consistency']>;
}

export interface BackupResult { manifest: Manifest; stats: BackupStats }

const MAX_CONFIG_BYTES = 16 * 1024 * 1024;
/** Offsets of differing chunks kept in a manifest: enough to look at, bounded whatever the bug. */
const MAX_AUDIT_OFFSETS = 32;


/** A fresh backup id: 32 random bytes in hex. */
export function newBackupId(): string {
  return randomBytes(32).toString('hex');
}

/**
 * Names and inspects a VM's disks before anything is frozen: a bad path, a locked
 * image, a bad name or an image naming another file fails here, before any change.
 * A disk with no declared format keeps the format its last backup detected.
 */
export async function inspectDisks(repo: Repository, vm: string, disks: BackupDisk[]): Promise<NamedDisk[]> {
  const out: NamedDisk[] = [];
  for (const { disk: d, name, previous: prev } of await nameDisks(repo, vm, disks)) {
    // A disk with no declared format keeps the format it was last backed up with.
    const pin = d.format === undefined ? prev?.entry.format as ImageFormat | undefined : undefined;
    out.push({ ...(await inspectDisk({ ...d, name, ...(pin ? { pinned: pin } : {}) })), name, ...(prev ? { previous: prev } : {}) });
  }
  checkChunkCount(vm, out, repo.chunkSize);
  return out;
}

/**
 * The most chunks one backup's disks may have. A manifest is one JSON string, which V8
 * caps at 2^29 - 24 characters: at 67 characters a chunk id, about 8 million ids
 * (object-limits.ts MANIFEST_MAX_BYTES), less room for the rest (configuration files
 * up to 16 MiB, base64: about 22 million characters). A disk's virtual size is what its image says
 * (a crafted qcow2 header claims petabytes in a few MiB): refused before anything is
 * read, rather than a backup that runs out of memory or a manifest no vmvault can read.
 */
export const MAX_BACKUP_CHUNKS = 7_500_000;

/** Refuses a backup whose disks have more than MAX_BACKUP_CHUNKS chunks of `chunkSize`. */
export function checkChunkCount(vm: string, disks: readonly { name: string; virtualSize: number }[], chunkSize: number): void {
  const chunks = disks.reduce((n, d) => n + Math.ceil(d.virtualSize / chunkSize), 0);
  if (chunks <= MAX_BACKUP_CHUNKS) return;
  const tib = (n: number) => `${(n / 2 ** 40).toFixed(1)} TiB`;
  const sizes = disks.map((d) => `"${d.name}" ${tib(d.virtualSize)}`).join(', ');
  throw new VmvaultError('UNSUPPORTED', `VM "${vm}" has ${chunks} chunks of ${chunkSize / 2 ** 20} MiB in its disks (${sizes}): one backup holds at most ` +
    `${MAX_BACKUP_CHUNKS} (${tib(MAX_BACKUP_CHUNKS * chunkSize)} at this repository's chunk size). Check the disks' virtual sizes (qemu-img info); ` +
    'for disks this large, back them up into a repository with larger chunks (vmvault init --chunk-size), or one disk per backup; nothing was read');
}

/**
 * The VM's disks with their names checked and their newest earlier backups, without
 * opening any image: for a driver whose hypervisor already holds the images open with
 * the formats its configuration states (a running libvirt domain).
 */
export async function nameDisks(repo: Repository, vm: string, disks: BackupDisk[]): Promise<{ disk: BackupDisk; name: string; previous?: NonNullable<NamedDisk['previous']> }[]> {
  if (!vm.trim()) throw new VmvaultError('BAD_INPUT', 'the VM name is empty');
  if (disks.length === 0) throw new VmvaultError('BAD_INPUT', `no disk given for VM "${vm}": pass at least one --disk`);
  const names = uniqueNames(disks.map((d) => d.name ?? diskNameFromPath(d.path)));
  names.forEach((n) => assertSafeName(n, 'disk name'));
  const previous = await previousDisks(repo, vm);
  return disks.map((disk, i) => {
    const prev = previous.get(names[i]!);
    return { disk, name: names[i]!, ...(prev ? { previous: prev } : {}) };
  });
}

/** How many chunks a backup with `req` processes at once: by default what the repository's storage asks for. */
function chunksInFlight(repo: Repository, req: Pick<BackupOptions, 'inFlight'>): number {
  return req.inFlight ?? repo.storage.chunksInFlight ?? DEFAULT_CHUNKS_IN_FLIGHT;
}

/**
 * Has `pool` make ready the slots a backup with `req` holds at once: one per chunk in
 * flight, and a second for each chunk being sealed (ChunkPool.warm; it starts the threads too).
 */
export function readySlots(repo: Repository, req: Pick<BackupOptions, 'inFlight'>, pool: ChunkPool): Promise<void> {
  const inFlight = chunksInFlight(repo, req);
  return pool.warm(inFlight + Math.min(inFlight, pool.threads));
}

/** Reads, chunks and commits the frozen disks of one point in time. */
export async function backup(repo: Repository, req: BackupRequest): Promise<BackupResult> {
  const started = Date.now();
  if (req.disks.length === 0) throw new VmvaultError('BAD_INPUT', `no disk given for VM "${req.vm}"`);
  checkChunkCount(req.vm, req.disks, repo.chunkSize);
  const configs = await readConfigs(req.configs ?? []);
  // A shared lock: garbage collection (exclusive) cannot delete the chunks this backup reuses.
  return withLock(repo, 'shared', { purpose: `backup of ${req.vm}` }, (lock) => run(repo, req, configs, started, lock));
}

async function run(repo: Repository, req: BackupRequest, configs: Manifest['configs'], started: number, lock: HeldLock): Promise<BackupResult> {
  const id = req.id;
  if (!/^[0-9a-f]{64}$/.test(id)) throw new VmvaultError('BAD_INPUT', `"${id}" is not a backup id`);
  const stats: BackupStats = { bytesRead: 0, bytesUploaded: 0, chunksNew: 0, chunksReused: 0, chunksZero: 0, chunksUnchanged: 0, seconds: 0 };
  const meter = new ProgressMeter('backup', req.disks.reduce((n, d) => n + d.virtualSize, 0), req.onProgress);
  const lease = req.chunkPool?.() ?? ownPool(repo.workerInit());
  const pool = lease.pool;
  const inFlight = chunksInFlight(repo, req);
  const disks: DiskEntry[] = [];
  let known: Awaited<ReturnType<Repository['chunkIndex']>>;
  try {
    // A disk that will be read (in full, or where its bitmap says): the threads start while
    // the index loads and the disk's export starts, and make their slots ready (backupVm
    // may have had this done already, while the driver took the point in time). A disk the
    // driver found unchanged, or a raw image found unchanged, reads nothing for sure.
    if (req.disks.some((d) => !d.readsNothing && !(d.format === 'raw' && d.mode === 'incremental'))) void readySlots(repo, req, pool);
    // What storage has, from the chunk index, never by listing chunks/. Quarantined chunks
    // are left out: producing one uploads it again, which heals it (repo/health.ts).
    // The index never lists chunks under a lock that was lost (gc may have collected them since): checked before each write.
    known = await repo.chunkIndex({ beforeWrite: () => lock.check() });
    for (const disk of req.disks) {
      meter.disk = disk.name;
      const audit = disk.changes && disk.audit ? { unchanged: 0, differing: [] as number[] } : undefined;
      const chunks = await backupDisk(disk, {
        repo, pool, known, stats, meter, inFlight, startAt: startFor(req.vm, disk.name), ...(audit ? { audit } : {}), ...(req.signal ? { signal: req.signal } : {}),
      });
      disks.push({
        ...(audit ? { audit: { unchanged: audit.unchanged, differing: audit.differing.length, offsets: audit.differing.sort((a, b) => a - b).slice(0, MAX_AUDIT_OFFSETS) } } : {}),
        name: disk.name, format: disk.format, formatSource: disk.formatSource, ...(disk.chain.length ? { chain: disk.chain } : {}),
        mode: disk.mode, reason: disk.reason, ...(disk.bitmap ? { bitmap: disk.bitmap } : {}), ...(disk.fileStamp ? { fileStamp: disk.fileStamp } : {}), ...(disk.chainStamps?.length ? { chainStamps: disk.chainStamps } : {}),
        virtualSize: disk.virtualSize, sourcePath: disk.path, chunks,
      });
    }
  } catch (err) {
    await lease.release();
    throw err;
  }
  meter.finish();
  // Read in full: the point in time goes (a snapshot deleted), and the threads stop, while the backup commits.
  req.onRead?.();
  const released = lease.release();
  try {
    if (known.counts.missing) {
      repo.warn(`${known.counts.missing} chunk(s) the chunk index lists were missing from storage and were uploaded again: ` +
        'other backups may use them too; run "vmvault verify" to find and heal them');
    }
    if (known.counts.damaged) {
      repo.warn(`${known.counts.damaged} chunk object(s) in storage had a size no chunk has (cut short, or empty after a crash) and were replaced by the data just read, ` +
        'which heals the other backups that use them; run "vmvault verify" to find damaged chunks this backup did not meet');
    }
    stats.seconds = (Date.now() - started) / 1000;
    const manifest: Manifest = {
      version: 1, id, vm: req.vm, host: req.host ?? hostname(), time: new Date(started).toISOString(),
      labels: [...new Set(req.labels ?? [])], ...(req.policy ? { policy: req.policy } : {}),
      consistency: req.consistency,
      chunkSize: repo.chunkSize, disks, configs, stats,
    };
    req.signal?.throwIfAborted();
    await req.beforeCommit?.();
    // The chunks it stored or found go into the index before the manifest that uses them.
    await known.flush(true);
    await lock.confirm();
    await repo.saveManifest(manifest);
    return { manifest, stats };
  } finally {
    // The backup stands (or failed) on its own: threads that do not stop cleanly are only reported.
    await released.catch((err: unknown) => repo.warn(`the chunk threads did not stop cleanly: ${errorMessage(err)}`));
  }
}

/** Where a disk's reading starts (chunk-reader.ts): the same for every backup of that disk, different for other VMs' disks. */
function startFor(vm: string, disk: string): (n: number) => number {
  const seed = BigInt(`0x${createHash('sha256').update(`${vm}\0${disk}`).digest('hex').slice(0, 12)}`);
  return (n) => Number(seed % BigInt(n));
}

/**
 * The newest earlier backup of each of `vm`'s disks (by disk name): its format pins a
 * disk with no declared format (a guest that writes a qcow2 header onto its raw disk
 * cannot change how the host reads it), and its chunk list is what an incremental
 * read starts from.
 */
async function previousDisks(repo: Repository, vm: string): Promise<Map<string, NonNullable<NamedDisk['previous']>>> {
  // The VM's backups by their summaries (decrypted once per host); only the manifests
  // needed are read whole: the newest readable one of each disk (a damaged or just
  // pruned manifest costs only itself, as before).
  const history = await repo.vmBackups(vm);
  const loaded = new Map<string, Promise<Manifest | undefined>>();
  const load = (id: string) => {
    let p = loaded.get(id);
    if (!p) {
      loaded.set(id, p = repo.loadManifest(id).then((m) => {
        if (m.vm === vm) return m;
        repo.warn(`the host's cache listed backup ${id} as one of VM "${vm}", but it is of "${m.vm}": it was ignored; clear the cache (VMVAULT_CACHE_DIR) if this repeats`);
        return undefined;
      }, (err: unknown) => {
        if (err instanceof NotFoundError || err instanceof IntegrityError) return undefined;
        throw err;
      }));
    }
    return p;
  };
  const names = new Set(history.flatMap((m) => m.disks.map((d) => d.name)));
  const out = new Map<string, NonNullable<NamedDisk['previous']>>();
  for (const name of names) {
    for (let i = history.length - 1; i >= 0; i--) {
      if (!history[i]!.disks.some((d) => d.name === name)) continue;
      const m = await load(history[i]!.id);
      const entry = m?.disks.find((d) => d.name === name);
      if (!m || !entry) continue;
      // The last full read of this disk up to that backup, from the summaries.
      let full: string | undefined;
      for (let j = 0; j <= i; j++) {
        const d = history[j]!.disks.find((x) => x.name === name);
        if (d && d.mode !== 'incremental') full = history[j]!.time;
      }
      out.set(name, { backupId: m.id, chunkSize: m.chunkSize, entry, ...(full ? { lastFullRead: full } : {}) });
      break;
    }
  }
  return out;
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

/**
 * Reads one frozen disk (its snapshot when it has one) from its image file where
 * src/disk/direct-read.ts can, else through a read-only qemu-nbd export; opened only
 * once some chunk has to be read: a disk change tracking calls unchanged costs nothing.
 */
async function backupDisk(disk: FrozenDisk, o: Omit<ReadChunksOptions, 'client' | 'size' | 'changes'>): Promise<(string | null)[]> {
  let opened: Promise<BlockReader> | undefined;
  // A cancelled backup drops its NBD connections at once: requests to a server that
  // hangs would otherwise hold it (and its lock) until the reply timeout.
  const unlisten: (() => void)[] = [];
  const cancellable = (client: NbdClient): NbdClient => {
    unlisten.push(abortWith(client, o.signal));
    return client;
  };
  const viaQemu = async () => {
    const exp = await exportImage(disk.path, {
      format: disk.format, readOnly: true, allowBacking: disk.chain.length > 0, ...(disk.snapshot ? { snapshot: disk.snapshot } : {}),
    });
    cancellable(exp.client);
    return exp;
  };
  const open = async (): Promise<BlockReader> => {
    if (disk.connect) return cancellable(await disk.connect());
    if (disk.chain.length === 0) {
      const file = await openImageFile(disk.path, { format: disk.format, size: disk.virtualSize, viaQemu, ...(disk.snapshot ? { snapshot: disk.snapshot } : {}) });
      if ('reader' in file) return file.reader;
    }
    const exp = await viaQemu();
    return { extents: (at, n) => exp.client.extents(at, n), readInto: (at, into) => exp.client.readInto(at, into), close: () => exp.close() };
  };
  const checked = async (): Promise<BlockReader> => {
    const r = await open();
    const verify = disk.verifyRead;
    if (!verify) return r;
    return { extents: (at, n) => r.extents(at, n), readInto: async (at, into) => { await r.readInto(at, into); await verify(); }, close: () => r.close() };
  };
  const client = () => (opened ??= checked());
  try {
    const ids = await readChunks({ ...o, client, size: disk.virtualSize, ...(disk.changes ? { changes: disk.changes } : {}) });
    // Once more at the end: what was taken from the disk's allocation map (zeros) is covered too.
    if (opened && disk.verifyRead) await disk.verifyRead();
    return ids;
  } finally {
    if (opened) await (await opened.catch(() => undefined))?.close();
    for (const off of unlisten) off();
  }
}

/**
 * Restore of a backup into a directory: each disk is created empty in the requested
 * format (a raw one written directly as a sparse file, any other through qemu-nbd:
 * pipeline/disk-writer.ts), filled with the non-zero parts of every non-zero chunk
 * (zero chunks, and all-zero 64 KiB runs within a chunk, are skipped, so the result
 * is as sparse as its source), flushed to disk, and renamed into place only when
 * every disk and file has been written. A failed restore leaves nothing behind.
 * Configuration files come back beside the disks; a libvirt domain XML has its disk
 * paths and formats rewritten to the restored images.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { lstat, readdir, realpath, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { IntegrityError, NotFoundError, VmvaultError, errnoCode, errorMessage } from '../errors.js';
import type { ImageFormat } from '../disk/qemu.js';
import { createDiskWriter } from './disk-writer.js';
import type { Repository } from '../repo/repository.js';
import type { DiskEntry, Manifest } from '../repo/manifest.js';
import { openStoredChunk, ownPool, type ChunkPool, type PoolLease } from './pool.js';
import { TaskWindow } from './window.js';
import { ProgressMeter, type ProgressFn } from './progress.js';
import { FORMAT_EXT, assertSafeName, pathInside } from './names.js';
import { processGone, withReadLock } from '../repo/locks.js';
import { VM_NAME_RE, libvirtDisks, renameLibvirtDomain, rewriteLibvirtDiskPaths, type DiskTarget, type DomainIdentity } from './libvirt-xml.js';
import { dataRuns } from './sparse.js';
import { fsyncDir, mkdirs, writeNewFileSynced } from '../storage/local.js';
import { settleAll } from '../settle.js';

export interface RestoreRequest {
  backupId: string;
  to: string;
  /** Target format for every disk; each disk's own format by default. */
  format?: ImageFormat;
  /** Restore only these disks (by name); all by default. */
  disks?: string[];
  /**
   * Where a disk goes (disk name → path), instead of `to/NAME.EXT`: relative to `to`,
   * or absolute, and either way inside `to` once symlinks are resolved (and inside
   * `roots` when given). Only disks being restored may be named.
   */
  diskPaths?: Record<string, string>;
  /**
   * Restore as a new VM of this name: the libvirt domain XML gets this `<name>`, a fresh
   * random `<uuid>` and fresh MAC addresses, so the clone can run beside the original.
   */
  name?: string;
  /** Replace existing files. */
  force?: boolean;
  /**
   * How the caller asks for `force`, in its own words, for the error when files
   * exist: `pass --force` on the command line, `set "overwrite": true` in an API
   * request. The pipeline knows neither spelling.
   */
  forceHint?: string;
  /**
   * When set, `to` must lie inside one of these directories once every symlink is
   * resolved (a restore for a remote requester: the API's restore onto a host).
   */
  roots?: string[];
  onProgress?: ProgressFn;
  inFlight?: number;
  /** Where the chunk threads come from (the host worker keeps them: PoolKeeper); default a pool of its own. */
  chunkPool?: () => PoolLease;
  /**
   * Stops the restore (rejecting with the signal's reason) before its next chunk, and
   * drops a qemu-nbd connection at once; the temporary files are removed, nothing is renamed.
   */
  signal?: AbortSignal;
  /**
   * False: nothing is made durable (no fdatasync of the files, no fsync of their
   * directories). Every reader sees the restored files at once, but a crash of this
   * host before the kernel writes them back can lose them: for a restore that is
   * compared or tested and thrown away, as PostgreSQL's `--no-sync` is. Default true.
   */
  sync?: boolean;
}

export interface RestoredFile { kind: 'disk' | 'config'; name: string; path: string; format?: string; virtualSize?: number }
export interface RestoreResult {
  backup: string; vm: string; files: RestoredFile[]; stats: { bytesWritten: number; chunksWritten: number; seconds: number };
  /** Restored as a new VM (`name`): its name and UUID. */
  clone?: { name: string; uuid: string };
  /** Temporary files of an interrupted restore of the same files (killed before it could remove them), removed. */
  leftoversRemoved?: string[];
  /** False when asked not to sync (`sync: false`): the files may not have reached the device yet. */
  durable: boolean;
}

export function restore(repo: Repository, req: RestoreRequest): Promise<RestoreResult> {
  return withReadLock(repo, 'restore', () => run(repo, req));
}

async function run(repo: Repository, req: RestoreRequest): Promise<RestoreResult> {
  const started = Date.now();
  const manifest = await repo.loadManifest(req.backupId);
  const disks = selectDisks(manifest, req.disks);
  const dir = req.to;
  const targets = diskTargets(dir, disks, req.diskPaths);
  const planned: (RestoredFile & { tmp: string; disk?: DiskEntry })[] = [];
  for (const d of disks) {
    const format = req.format ?? (d.format as ImageFormat);
    const path = targets.get(d.name) ?? pathInside(dir, `${d.name}.${FORMAT_EXT[format]}`, 'disk name');
    planned.push({ kind: 'disk', name: d.name, path, format, virtualSize: d.virtualSize, tmp: tmpName(path), disk: d });
  }
  // The configuration describes the whole VM: it comes back when every disk does.
  const whole = new Set(disks.map((d) => d.name)).size === manifest.disks.length;
  for (const c of whole ? manifest.configs : []) {
    const path = pathInside(dir, c.name, 'config file name');
    planned.push({ kind: 'config', name: c.name, path, tmp: tmpName(path) });
  }
  const clone = req.name === undefined ? undefined : cloneIdentity(req.name, manifest, whole);
  // What a configuration file cannot become (a clone sharing a disk) is refused now, before any disk is written.
  for (const c of clone ? manifest.configs : []) adjustConfig(c.name, Buffer.from(c.data, 'base64'), planned, clone);
  const clash = planned.find((p, i) => planned.findIndex((q) => q.path === p.path) !== i);
  if (clash) throw new VmvaultError('BAD_INPUT', `two restored files would both be ${clash.path}: give each disk its own path; nothing was written`);
  const checkPlaces = async () => {
    if (req.roots) await assertInsideRoots(dir, req.roots);
    for (const p of targets.values()) {
      await assertInsideRoots(dirname(p), [dir], 'the restore directory');
      if (req.roots) await assertInsideRoots(dirname(p), req.roots);
    }
  };
  await checkPlaces();
  const taken = await existing(planned.map((p) => p.path));
  if (taken.length && !req.force) {
    throw new VmvaultError('ALREADY_EXISTS', `${taken.join(', ')} already exist${taken.length === 1 ? 's' : ''}: choose another directory or ${req.forceHint ?? 'ask for existing files to be replaced'}; nothing was written`);
  }
  // Directories this restore made: a failed one removes those still empty, leaving the target as it found it.
  const created: string[] = [];
  const removeCreated = async () => {
    for (const d of [...created].reverse()) await rmdir(d).catch(() => undefined);
  };
  try {
    // As mkdir -p with the umask's mode (the hypervisor's user may need to enter them), but with the real errno (EROFS, not ENOENT).
    await mkdirs(dir, created, 0o777);
    for (const p of targets.values()) await mkdirs(dirname(p), created, 0o777);
  } catch (err) {
    await removeCreated();
    throw targetError(err, dir, 'nothing was written');
  }
  await checkPlaces(); // Again: a symlink may have appeared meanwhile.
  const leftovers = await removeLeftovers(planned.map((p) => p.path), Date.now() - LEFTOVER_AGE_MS);

  const stats = { bytesWritten: 0, chunksWritten: 0, seconds: 0 };
  const durable = req.sync ?? true;
  const meter = new ProgressMeter('restore', disks.reduce((n, d) => n + d.chunks.filter(Boolean).length * manifest.chunkSize, 0), req.onProgress);
  const lease = req.chunkPool?.() ?? ownPool(repo.workerInit());
  const pool = lease.pool;
  try {
    for (const p of planned) {
      if (p.disk) {
        meter.disk = p.name;
        await restoreDisk(repo, pool, manifest, p.disk, p.tmp, p.format as ImageFormat, stats, meter, req.inFlight ?? 8, req.signal, durable);
      } else {
        const c = manifest.configs.find((x) => x.name === p.name)!;
        const data = adjustConfig(c.name, Buffer.from(c.data, 'base64'), planned, clone);
        await (durable ? writeNewFileSynced(p.tmp, data) : writeFile(p.tmp, data, { flag: 'wx', mode: 0o600 }));
      }
    }
    req.signal?.throwIfAborted();
    // Every file's data is on disk (disks flushed, configurations synced): now the names,
    // and the directories that hold them, so a crash after the restore loses nothing.
    for (const p of planned) await rename(p.tmp, p.path);
    if (durable) for (const d of new Set(planned.map((p) => dirname(p.path)))) await fsyncDir(d);
  } catch (err) {
    await Promise.all(planned.map((p) => rm(p.tmp, { force: true })));
    await removeCreated();
    throw targetError(err, dir, 'the partly written files were removed');
  } finally {
    await lease.release();
  }
  meter.finish();
  stats.seconds = (Date.now() - started) / 1000;
  return {
    backup: manifest.id,
    vm: manifest.vm,
    files: planned.map(({ tmp: _t, disk: _d, ...f }) => f),
    stats,
    durable,
    ...(leftovers.length ? { leftoversRemoved: leftovers } : {}),
    ...(clone ? { clone: { name: clone.name, uuid: clone.uuid } } : {}),
  };
}

/** errno codes of the restore's own target (not the repository) whose fix is the operator's, with what to tell them. */
const TARGET_ADVICE: Record<string, string> = {
  ENOSPC: 'its file system is full: free some space there, or restore into another directory',
  EDQUOT: 'the disk quota there is exhausted: free some space or raise the quota, or restore into another directory',
  EROFS: 'its file system is read-only: remount it read-write, or restore into another directory',
  EACCES: 'permission denied: fix the permissions of that directory, or restore into another one',
  EPERM: 'operation not permitted: fix the permissions (or attributes) of that directory, or restore into another one',
  ENOTDIR: 'a component of the path is a regular file, not a directory: choose another directory',
  EFBIG: 'its file system cannot hold a file this large: restore onto another file system',
};

/**
 * A file system error of the restore's target as an error that says what to do; anything
 * else as it is. The errno is the error's own (a file system call), or the one qemu-img
 * or an NBD error reply reported about the image being written (their cause); never one
 * along another error's causes, which may be the repository's.
 */
function targetError(err: unknown, dir: string, outcome: string): unknown {
  const ofImage = err instanceof VmvaultError && (err.code === 'NBD' || err.code === 'QEMU');
  const code = errnoCode(ofImage ? err.cause : err);
  const advice = code ? TARGET_ADVICE[code] : undefined;
  if (!advice) return err;
  return new VmvaultError('STORAGE', `cannot restore into ${dir}: ${advice} (${errorMessage(err)}); ${outcome}`, { cause: err });
}

function selectDisks(m: Manifest, wanted: string[] | undefined): DiskEntry[] {
  if (!wanted?.length) return m.disks;
  return wanted.map((name) => {
    const d = m.disks.find((x) => x.name === name);
    if (!d) throw new NotFoundError(`backup ${m.id.slice(0, 12)} has no disk "${name}"; its disks are: ${m.disks.map((x) => x.name).join(', ')}`);
    return d;
  });
}

/**
 * A configuration file as it goes to the new place: a libvirt domain XML gets its
 * disks' `<source file=…>` (and `<driver type=…>`) pointed at the restored images;
 * anything else is copied as it is.
 */
export function adjustConfig(name: string, data: Buffer, planned: readonly (RestoredFile & { disk?: DiskEntry })[], clone?: DomainIdentity): Buffer {
  if (!isDomainXml(name, data)) return data;
  const map = new Map<string, DiskTarget>();
  for (const p of planned) {
    if (p.disk) map.set(p.disk.sourcePath, { path: p.path, ...(p.format ? { format: p.format } : {}) });
  }
  let xml: string;
  try {
    xml = rewriteLibvirtDiskPaths(data.toString('utf8'), map);
  } catch (err) {
    // A clone must not come back under the original's name: better no restore than that.
    if (clone) throw new VmvaultError('BAD_INPUT', `${name} cannot be given the new name "${clone.name}": ${errorMessage(err)}; restore without --name, or rename by hand`, { cause: err });
    return data; // Not a domain after all (or not XML libvirt would read): the file as it was is the honest copy.
  }
  if (clone) {
    // A disk the backup does not hold would still point at the original's image: the clone would write into it.
    const restored = new Set(planned.filter((p) => p.disk).map((p) => p.path));
    const shared = libvirtDisks(xml).filter((d) => d.device === 'disk' && !restored.has(d.path));
    if (shared.length) {
      throw new VmvaultError('BAD_INPUT', `${name} uses disk(s) ${shared.map((d) => d.path).join(', ')} that the backup does not hold: a clone would share them with the original; back them up with the VM, or restore without --name and edit the configuration; nothing was written`);
    }
  }
  return Buffer.from(clone ? renameLibvirtDomain(xml, clone) : xml);
}

function isDomainXml(name: string, data: Buffer): boolean {
  return /\.xml$/i.test(name) && /<domain[\s>]/.test(data.toString('utf8', 0, Math.min(data.length, 4096)));
}

/** A fresh identity for a clone: new random UUID and MACs (52:54:00 is QEMU's prefix, as libvirt uses). */
function cloneIdentity(name: string, m: Manifest, whole: boolean): DomainIdentity {
  if (!VM_NAME_RE.test(name)) throw new VmvaultError('BAD_INPUT', `"${name}" is not a VM name: use letters, digits, ".", "_", "+" or "-" (at most 64, starting with a letter or digit); nothing was written`);
  const domains = m.configs.filter((c) => isDomainXml(c.name, Buffer.from(c.data, 'base64')));
  if (!domains.length) throw new VmvaultError('BAD_INPUT', `backup ${m.id.slice(0, 12)} has no libvirt domain XML to give the name "${name}": restore it without --name; nothing was written`);
  if (!whole) throw new VmvaultError('BAD_INPUT', `--name restores a whole VM, configuration included: restore every disk of backup ${m.id.slice(0, 12)} (${m.disks.map((d) => d.name).join(', ')}); nothing was written`);
  const macs = Array.from({ length: 64 }, () => `52:54:00:${[...randomBytes(3)].map((b) => b.toString(16).padStart(2, '0')).join(':')}`);
  return { name, uuid: randomUUID(), macs };
}

/**
 * The paths asked for disks (`diskPaths`), resolved against `dir` and refused unless
 * they lie inside it (lexically here; with symlinks resolved before anything is written).
 */
function diskTargets(dir: string, disks: readonly DiskEntry[], wanted: Record<string, string> | undefined): Map<string, string> {
  const out = new Map<string, string>();
  const root = resolve(dir);
  for (const [name, path] of Object.entries(wanted ?? {})) {
    if (!disks.some((d) => d.name === name)) {
      throw new NotFoundError(`no disk "${name}" is being restored, so it cannot be put at ${path}; the disks restored are: ${disks.map((d) => d.name).join(', ')}`);
    }
    if (path.includes('\0')) throw new VmvaultError('BAD_INPUT', `the path for disk "${name}" contains a NUL byte`);
    const full = resolve(root, path);
    if (!full.startsWith(root + sep)) {
      throw new VmvaultError('BAD_INPUT', `disk "${name}" cannot go to ${path}: it is outside the restore directory ${root}; give a path inside it (relative paths are taken from it); nothing was written`);
    }
    assertSafeName(basename(full), `the file name for disk "${name}"`);
    out.set(name, full);
  }
  return out;
}

/**
 * Throws BAD_INPUT unless `dir`, with every symlink resolved, is one of `roots` or
 * lies below one. Resolves the deepest part of `dir` that exists, so a directory
 * still to be created is judged by where its parent really is.
 */
export async function assertInsideRoots(dir: string, roots: readonly string[], what = "this host's restore roots"): Promise<void> {
  const wanted = resolve(dir);
  let existingPart = wanted;
  let rest = '';
  for (;;) {
    try {
      existingPart = await realpath(existingPart);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      const parent = dirname(existingPart);
      rest = join(basename(existingPart), rest);
      if (parent === existingPart) break;
      existingPart = parent;
    }
  }
  const real = join(existingPart, rest);
  for (const r of roots) {
    const root = await realpath(r).catch(() => resolve(r));
    if (real === root || real.startsWith(root.endsWith(sep) ? root : root + sep)) return;
  }
  throw new VmvaultError('BAD_INPUT', `${what.startsWith('this host') ? 'restore directory' : 'directory'} ${dir} ${real === wanted ? 'is' : `resolves to ${real}, which is`} outside ${what} (${roots.join(', ')}); nothing was written`);
}

/** `.NAME.vmvault-tmp-PID-RANDOM`: the process that writes it is named, so another restore can tell whether it is gone. */
function tmpName(path: string): string {
  return join(dirname(path), `${tmpPrefix(path)}${process.pid}-${randomBytes(4).toString('hex')}`);
}

const tmpPrefix = (path: string) => `.${path.slice(dirname(path).length + 1)}.vmvault-tmp-`;

/**
 * A restore killed (kill -9, a crash) leaves its hidden temporary files beside the files
 * it was restoring, as large as the disks. A later restore of the same files removes
 * those last written before `before` whose process is gone from this host (a restore
 * still under way may leave one disk's file untouched for hours while it writes the
 * next), and says which. Names without a process (older vmvault) go by age alone.
 */
const LEFTOVER_AGE_MS = 10 * 60 * 1000;

async function removeLeftovers(paths: readonly string[], before: number): Promise<string[]> {
  const removed: string[] = [];
  for (const p of paths) {
    let names: string[];
    try {
      names = await readdir(dirname(p));
    } catch {
      continue;
    }
    for (const n of names.filter((x) => x.startsWith(tmpPrefix(p)))) {
      const tail = /^(?:(\d+)-)?[0-9a-f]{8}$/.exec(n.slice(tmpPrefix(p).length));
      if (!tail || (tail[1] !== undefined && !processGone(Number(tail[1])))) continue;
      const file = join(dirname(p), n);
      const st = await lstat(file).catch(() => undefined);
      if (!st?.isFile() || st.mtimeMs >= before) continue;
      await rm(file, { force: true });
      removed.push(file);
    }
  }
  return removed;
}

async function existing(paths: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const p of paths) {
    try {
      await stat(p);
      out.push(p);
    } catch {
      /* does not exist */
    }
  }
  return out;
}

async function restoreDisk(
  repo: Repository, pool: ChunkPool, m: Manifest, disk: DiskEntry, tmp: string, format: ImageFormat,
  stats: RestoreResult['stats'], meter: ProgressMeter, inFlight: number, signal: AbortSignal | undefined, durable: boolean,
): Promise<void> {
  signal?.throwIfAborted();
  const out = await createDiskWriter(tmp, format, disk.virtualSize, { durable, ...(signal ? { signal } : {}) });
  const window = new TaskWindow(inFlight);
  try {
    for (const [index, id] of disk.chunks.entries()) {
      if (id === null) continue;
      signal?.throwIfAborted();
      await window.add(async () => {
        // Read into a slot of the pool and opened into another, which is given back once written.
        const { plain, release } = await openStoredChunk(repo, pool, id, signal).catch((err: unknown) => {
          if (!(err instanceof IntegrityError)) throw err;
          throw new IntegrityError(`${err.message}: disk "${disk.name}" of backup ${m.id.slice(0, 12)} cannot be restored whole. Restore another backup of it, ` +
            'or run "vmvault verify" (it quarantines the chunk, and the next backup that reads that data uploads it again, which heals every backup using it)', { cause: err });
        });
        let runs;
        try {
          const offset = index * m.chunkSize;
          const expected = Math.min(m.chunkSize, disk.virtualSize - offset);
          if (plain.length !== expected) {
            throw new VmvaultError('INTEGRITY', `chunk ${id.slice(0, 16)} of disk "${disk.name}" holds ${plain.length} bytes where ${expected} were expected`);
          }
          // The new image reads as zeros already: write only the runs that hold data.
          runs = dataRuns(plain);
          // Every write settles before the slot is given back, a failed one's siblings too.
          await settleAll(runs.map((r) => out.write(offset + r.start, plain.subarray(r.start, r.end))));
        } finally {
          release();
        }
        stats.bytesWritten += runs.reduce((n, r) => n + r.end - r.start, 0);
        stats.chunksWritten++;
        meter.add(m.chunkSize);
      });
    }
    await window.drain();
    await out.flush();
  } finally {
    await window.drain().catch(() => undefined); // after a failure too: no write may outlive the file
    await out.close();
  }
}

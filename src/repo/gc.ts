/**
 * Garbage collection: deletes the chunks no manifest references, and the temporary
 * files of writers that were killed mid-put. It runs under the repository's exclusive
 * lock, so no backup is running (backups hold shared locks) and every chunk a finished
 * backup uses is in its manifest.
 *
 * Damaged manifests. A manifest that cannot be read (damaged, swapped, of another
 * repository) may reference any chunk: nothing proves a chunk unreferenced while one
 * exists, and the backup it describes may still be saved by putting a good copy of the
 * object back. So gc then deletes no chunk at all (only temporary files), reports the
 * damaged manifests and how many unreferenced chunks it kept, and says what to do.
 * Refusing outright would also work, but would keep the temporary files of a full disk.
 * A storage error while reading a manifest (network, permissions) aborts gc: it says
 * nothing about the manifest.
 *
 * A full repository. Taking the lock writes an object; on a full disk that fails, and
 * gc is the tool that frees the space. When the lock's write fails for want of space,
 * gc frees room one step at a time and tries the lock again after each step: first
 * stale locks and temporary files, then unreferenced chunks, largest first. Deleting a
 * chunk without the lock is safe only because the disk is full: no backup can take its
 * lock or commit a manifest while nothing can be written, and before each step gc checks
 * that no live lock exists (a running backup: then it stops, the backup will fail and
 * release it). As soon as one lock fits, gc takes the exclusive lock and goes on as usual.
 */
import { VmvaultError } from '../errors.js';
import { writeRefusal } from '../storage/refusal.js';
import { chunkName, isChunkId } from './chunk.js';
import { removeOrphanHealth } from './health.js';
import { heldByDeadProcess, lockName, readLocks, withLock, withReadLock, type HeldLock } from './locks.js';
import { mapLimit, type DamagedObject, type Repository } from './repository.js';
import type { Manifest } from './manifest.js';

export interface GcReport {
  dryRun: boolean;
  backups: number;
  chunksTotal: number;
  chunksReferenced: number;
  chunksDeleted: number;
  bytesDeleted: number;
  /** Temporary files of unfinished writes (killed writers) removed, and their bytes. */
  tempFilesDeleted: number;
  tempBytesDeleted: number;
  /** Manifests that cannot be read: while there is one, no chunk is deleted. */
  damagedManifests: DamagedObject[];
  /** Chunks no readable manifest references, kept because of damagedManifests. */
  chunksKept: number;
  /** Objects of the rewritten chunk index (none on a dry run). */
  indexObjects: number;
  /** What the chunks left after this run weigh in storage (for a dry run: would weigh): the repository's size, reported by the metrics. */
  bytesStored: number;
}

export interface GcOptions {
  dryRun?: boolean;
  /**
   * Temporary files younger than this may belong to a put still under way (a lock being
   * written by a process about to find gc's lock): they are kept. Default 10 minutes.
   */
  tempAgeMs?: number;
  /** Clock, for tests. */
  now?: () => number;
}

export const DEFAULT_TEMP_AGE_MS = 10 * 60 * 1000;

interface Freed { chunks: number; chunkBytes: number; tempFiles: number; tempBytes: number }

export async function collectGarbage(repo: Repository, opts: GcOptions = {}): Promise<GcReport> {
  const freed: Freed = { chunks: 0, chunkBytes: 0, tempFiles: 0, tempBytes: 0 };
  // A dry run only reads: a shared lock (none on a repository that refuses writes, with a warning), as verify takes.
  if (opts.dryRun) return withReadLock(repo, 'garbage collection (dry run)', () => collect(repo, opts, freed, undefined));
  let room: RoomMaker | undefined;
  for (;;) {
    let locked = false;
    try {
      return await withLock(repo, 'exclusive', { purpose: 'garbage collection' }, (lock) => {
        locked = true;
        return collect(repo, opts, freed, lock);
      });
    } catch (err) {
      if (locked || opts.dryRun || writeRefusal(err) !== 'full') throw err;
      room ??= new RoomMaker(repo, freed);
      if (!(await room.step())) {
        throw new VmvaultError('STORAGE', `the repository at ${repo.storage.location} is full, and gc freed all it could without its lock ` +
          `(${freed.chunks} unused chunk(s), ${freed.tempFiles} temporary file(s)) without making room for it: ` +
          'free some space by other means (prune needs none), then run gc again', { cause: err });
      }
    }
  }
}

async function collect(repo: Repository, opts: GcOptions, freed: Freed, lock: HeldLock | undefined): Promise<GcReport> {
  const now = opts.now ?? Date.now;
  if (!opts.dryRun && repo.storage.removeTemporary) {
    const t = await repo.storage.removeTemporary(now() - (opts.tempAgeMs ?? DEFAULT_TEMP_AGE_MS));
    freed.tempFiles += t.files;
    freed.tempBytes += t.bytes;
  }
  const { manifests, damaged } = await repo.readManifests();
  const referenced = referencedChunks(manifests);
  const sizes = await chunkSizes(repo);
  const garbage = [...sizes.keys()].filter((name) => isGarbage(name, referenced));
  const deleting = damaged.length ? [] : garbage;
  let indexObjects = 0;
  if (!opts.dryRun) indexObjects = await deleteAndReindex(repo, [...sizes.keys()], deleting, () => lock!.check());
  const bytesDeleted = deleting.reduce((n, name) => n + sizes.get(name)!, 0);
  const bytesListed = [...sizes.values()].reduce((n, b) => n + b, 0);
  // Verification records of pruned backups, quarantine entries of chunks nothing uses
  // (kept while a manifest is damaged: they may be its).
  if (!opts.dryRun && !damaged.length) await removeOrphanHealth(repo, new Set(manifests.map((m) => m.id)), referenced);
  if (damaged.length) {
    repo.warn(`garbage collection deleted no chunk: ${damaged.length} backup manifest(s) cannot be read, and any chunk may be theirs ` +
      `(${damaged.map((d) => d.problem).join('; ')}). Put a good copy of each back, or delete it if that backup is lost, then run gc again`);
  }
  return {
    dryRun: !!opts.dryRun,
    backups: manifests.length,
    chunksTotal: sizes.size + freed.chunks,
    chunksReferenced: referenced.size,
    chunksDeleted: deleting.length + freed.chunks,
    bytesDeleted: bytesDeleted + freed.chunkBytes,
    tempFilesDeleted: freed.tempFiles,
    tempBytesDeleted: freed.tempBytes,
    damagedManifests: damaged,
    chunksKept: damaged.length ? garbage.length : 0,
    indexObjects,
    bytesStored: bytesListed - bytesDeleted,
  };
}

/**
 * Deletes `deleting` and replaces the chunk index by one listing exactly the chunks that
 * stay, in the order that keeps every index object true whatever point gc is killed at:
 * the old index objects go first, then the chunks, and the new objects are written last.
 * A crash in between leaves a repository with no index, which the next backup lists once
 * and indexes (Repository.chunkIndex); and nothing is written before space is freed, so
 * a nearly full repository gets its room first. Returns the number of objects written.
 */
async function deleteAndReindex(repo: Repository, stored: readonly string[], deleting: readonly string[], check: () => Promise<void>): Promise<number> {
  // What is garbage was decided under the exclusive lock: deleting it is safe only while that
  // lock is still ours. One that lapsed (not refreshed for its lifetime: storage refusing the
  // refreshes, a suspended process) may have been removed as stale, and a backup may since
  // have found one of these chunks stored and be about to commit a manifest that uses it.
  // A check writes nothing: on a full repository, nothing is written before space is freed.
  await check();
  await mapLimit(await repo.indexNames(), 16, (name) => repo.storage.delete(name));
  for (let at = 0; at < deleting.length; at += DELETE_BATCH) {
    if (at > 0) await check();
    await mapLimit(deleting.slice(at, at + DELETE_BATCH), 16, (name) => repo.storage.delete(name));
  }
  const gone = new Set(deleting);
  const staying: string[] = [];
  for (const name of stored) {
    const id = name.slice(name.lastIndexOf('/') + 1);
    if (!gone.has(name) && isChunkId(id) && chunkName(id) === name) staying.push(id);
  }
  return (await repo.writeIndex(staying)).length;
}

/** Chunks deleted between two checks of gc's lock (each a stat of the lock). */
const DELETE_BATCH = 1000;

function referencedChunks(manifests: readonly Manifest[]): Set<string> {
  const referenced = new Set<string>();
  for (const m of manifests) for (const d of m.disks) for (const id of d.chunks) if (id) referenced.add(id);
  return referenced;
}

async function chunkSizes(repo: Repository): Promise<Map<string, number>> {
  const sizes = new Map<string, number>();
  for await (const { name, size } of repo.storage.list('chunks/')) sizes.set(name, size);
  return sizes;
}

/** Unreferenced, or not where its id says it belongs. */
function isGarbage(name: string, referenced: ReadonlySet<string>): boolean {
  const id = name.slice(name.lastIndexOf('/') + 1);
  return !referenced.has(id) || chunkName(id) !== name;
}

/** Frees room on a full repository before gc can lock it: see the comment at the top. */
class RoomMaker {
  private tempSwept = false;
  private indexDropped = false;
  private garbage: Array<{ name: string; size: number }> | undefined;

  constructor(private readonly repo: Repository, private readonly freed: Freed) {}

  /** Frees something and returns true, or returns false when nothing more can be freed without the lock. */
  async step(): Promise<boolean> {
    const locks = await readLocks(this.repo);
    const live = locks.filter((l) => l.lock && !l.stale);
    if (live.length) {
      const who = live.map(({ lock }) => lock && `${lock.kind} lock for ${lock.purpose} by ${lock.host} pid ${lock.pid}`).join('; ');
      // A holder this host's process table proves gone (a backup killed by the full disk's
      // trouble, kill -9) will never release its lock: waiting for it is no advice.
      const dead = live.filter(({ lock }) => lock && heldByDeadProcess(lock)).map(({ lock }) => lock!.pid);
      const advice = !dead.length
        ? 'that work will fail for want of space and release its lock; run gc again then'
        : `process${dead.length === 1 ? ` ${dead[0]} is` : `es ${dead.join(', ')} are`} gone from this host (killed or crashed): ` +
          `run "vmvault unlock" to remove ${dead.length === 1 ? 'its lock' : 'their locks'}, then run gc again` +
          (dead.length < live.length ? ' once the other work has failed for want of space and released its lock' : '');
      throw new VmvaultError('LOCKED', `the repository is full and locked (${who}): ${advice}`, { retriable: true });
    }
    const damaged = locks.filter((l) => l.damaged !== undefined);
    if (damaged.length) {
      // The exclusive lock would refuse them anyway; and one may be a running backup's.
      throw new VmvaultError('LOCKED', `the repository is full and lock(s) ${damaged.map((l) => lockName(l.id)).join(', ')} cannot be read: ` +
        'remove them with "vmvault unlock" once no vmvault process is running, then run gc again');
    }
    const stale = locks.filter((l) => l.stale);
    if (stale.length) {
      await mapLimit(stale, 8, (l) => this.repo.storage.delete(lockName(l.id)));
      return true;
    }
    if (!this.tempSwept && this.repo.storage.removeTemporary) {
      this.tempSwept = true;
      // Any age: with the disk full, every write under way is failing anyway.
      const t = await this.repo.storage.removeTemporary(Number.POSITIVE_INFINITY);
      this.freed.tempFiles += t.files;
      this.freed.tempBytes += t.bytes;
      if (t.files) return true;
    }
    this.garbage ??= await this.unreferenced();
    const next = this.garbage.shift();
    if (!next) return false;
    // The index may list the chunks about to go, and gc may stop before it rewrites it:
    // with no index object left, the next backup lists the store once and indexes it.
    if (!this.indexDropped) {
      await mapLimit(await this.repo.indexNames(), 16, (name) => this.repo.storage.delete(name));
      this.indexDropped = true;
    }
    await this.repo.storage.delete(next.name);
    this.freed.chunks++;
    this.freed.chunkBytes += next.size;
    return true;
  }

  /** Unreferenced chunks, largest first; none when a manifest is damaged (they might be its). */
  private async unreferenced(): Promise<Array<{ name: string; size: number }>> {
    const { manifests, damaged } = await this.repo.readManifests();
    if (damaged.length) {
      throw new VmvaultError('STORAGE', `the repository at ${this.repo.storage.location} is full, and gc cannot free chunks before it can lock: ` +
        `${damaged.length} backup manifest(s) cannot be read (${damaged.map((d) => d.name).join(', ')}), so no chunk is proven unused. Free some space by other means, then run gc again`);
    }
    const referenced = referencedChunks(manifests);
    const sizes = await chunkSizes(this.repo);
    return [...sizes].filter(([name]) => isGarbage(name, referenced)).map(([name, size]) => ({ name, size })).sort((a, b) => b.size - a.size);
  }
}

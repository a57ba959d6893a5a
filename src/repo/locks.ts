/**
 * Repository locks, kept in the repository itself so that the CLI and the service
 * (on any host) honour the same ones. Backups hold shared locks; garbage collection
 * holds the exclusive lock, so it never deletes a chunk a running backup may use.
 *
 * A lock is a sealed object `locks/<random id>` holding its kind, holder and expiry.
 * Holders refresh it while they work; a lock not refreshed for its lifetime is stale
 * (its holder crashed) and is ignored and removed by the next acquirer. That is judged
 * on the storage's clock (when each lock was last written), never by comparing the
 * holder's clock with the acquirer's: hosts' clocks may disagree by hours.
 *
 * Acquisition writes the lock first and then looks for conflicts, backing off (and
 * deleting its own lock) when it finds one: two racing acquirers may both back off,
 * but can never both succeed. A repository opened with a lock wait (`--retry-lock`)
 * tries again, with growing and jittered delays (so that two that backed off together
 * do not meet again), until the wait is over; without one, a held lock fails at once.
 *
 * A lock that cannot be read (garbage, or sealed for another repository) is reported,
 * never trusted: shared lockers go on with a warning (they only need to know of an
 * exclusive lock, and a damaged one protects nothing anyway, since its holder's refresh
 * would have rewritten it), while the exclusive locker refuses, because such a lock may
 * be a running backup's, until `vmvault unlock` removes it.
 *
 * Work that only reads (restore, verify) runs under withReadLock: when the repository
 * refuses writes (read-only mount or credentials, full disk) or was opened with
 * `--no-lock`, it goes on without a lock, as restic's `--no-lock` does. Writers never do.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import * as z from 'zod';
import { IntegrityError, NotFoundError, VmvaultError, errorMessage } from '../errors.js';
import { writeRefusal } from '../storage/refusal.js';
import { additionalData, open, seal } from '../crypto/seal.js';
import type { LockWait, Repository } from './repository.js';
import { SMALL_OBJECT_MAX_BYTES } from './object-limits.js';

export type LockKind = 'shared' | 'exclusive';

const lockSchema = z.object({
  kind: z.enum(['shared', 'exclusive']),
  host: z.string(),
  pid: z.number(),
  purpose: z.string(),
  created: z.string(),
  expires: z.string(),
  /** Its lifetime without refresh (absent in locks of earlier versions: the default). */
  ttlMs: z.number().positive().optional(),
});
type LockBody = z.infer<typeof lockSchema>;

export interface LockOptions {
  purpose: string;
  /** How long a lock lives without refresh; a crashed holder blocks others at most this long. */
  ttlMs?: number;
  /** Clock, for tests. */
  now?: () => number;
  /** How long to wait for a lock another process holds; default the repository's (OpenOptions.lockWait). */
  wait?: LockWait;
}

export interface HeldLock {
  readonly id: string;
  /**
   * Extends the expiry of a lock that is still ours (see `check`); called automatically
   * every ttl/4 until release. A lock found lapsed or gone is lost for good: it is
   * never written again, since another process may have removed it as stale and gone
   * on (a gc deleting, a backup committing) on the strength of that.
   */
  refresh(): Promise<void>;
  /**
   * Throws (LOCKED, retriable) unless the lock is still ours and live: refreshed within
   * its lifetime and not removed as stale by another process. Writes nothing (a full
   * repository's gc checks before it frees anything).
   */
  check(): Promise<void>;
  /**
   * Before a commit: `check`, then refresh. A backup whose lock lapsed may have had
   * chunks collected under it, so it must not write its manifest.
   */
  confirm(): Promise<void>;
  release(): Promise<void>;
}

export const DEFAULT_LOCK_TTL_MS = 30 * 60 * 1000;

export const lockName = (id: string) => `locks/${id}`;

/** A lock as found in the repository: readable (`lock`), or not (`damaged` says why). */
export type FoundLock =
  | { id: string; lock: LockBody; stale: boolean; damaged?: undefined }
  | { id: string; lock?: undefined; stale: false; damaged: string };

/**
 * The repository's locks. `own` is the id of a lock the caller has just written: its
 * write time, on the storage's clock, is then the "now" that the others' last writes
 * are compared with (isStale).
 */
export async function readLocks(repo: Repository, now = Date.now(), own?: string): Promise<FoundLock[]> {
  const out: FoundLock[] = [];
  const listed: { name: string; modified?: number }[] = [];
  for await (const { name, modified } of repo.storage.list('locks/')) listed.push({ name, ...(modified !== undefined ? { modified } : {}) });
  const reference = own === undefined ? undefined : listed.find((l) => l.name === lockName(own))?.modified;
  for (const { name, modified } of listed) {
    const id = name.slice('locks/'.length);
    let sealed: Uint8Array;
    try {
      sealed = await repo.storage.get(name, { maxBytes: SMALL_OBJECT_MAX_BYTES });
    } catch (err) {
      if (err instanceof NotFoundError) continue; // released meanwhile
      if (err instanceof IntegrityError) { // far too large to be a lock: not read
        out.push({ id, stale: false, damaged: errorMessage(err) });
        continue;
      }
      throw err; // the storage failed, not the lock: say so
    }
    try {
      const plain = open(repo.keys.encKey, 'lock', sealed, additionalData(repo.id, 'lock', id), name);
      const lock = lockSchema.parse(JSON.parse(plain.toString('utf8')));
      out.push({ id, lock, stale: isStale(lock, { now, modified, reference }) });
    } catch (err) {
      out.push({ id, stale: false, damaged: errorMessage(err) });
    }
  }
  return out;
}

/** Writes lock `id` of this process, written at `at` (this host's clock) and living `ttl` from then. */
async function putLock(repo: Repository, id: string, l: { kind: LockKind; purpose: string; created: string; at: number; ttl: number }): Promise<void> {
  const body: LockBody = { kind: l.kind, host: hostname(), pid: process.pid, purpose: l.purpose, created: l.created, expires: new Date(l.at + l.ttl).toISOString(), ttlMs: l.ttl };
  await repo.storage.put(lockName(id), seal(repo.keys.encKey, 'lock', Buffer.from(JSON.stringify(body)), additionalData(repo.id, 'lock', id)));
}

/**
 * The repository's locks, judged on the storage's clock by a reader that holds no lock
 * (`vmvault unlock`): it writes a lock of its own for the time of one listing, to learn
 * the storage's time, then removes it. A repository that refuses the write (full,
 * read-only) gets readLocks' judgement without a reference.
 */
export async function readLocksNow(repo: Repository, purpose: string): Promise<FoundLock[]> {
  const id = randomBytes(16).toString('hex');
  const at = Date.now();
  try {
    await putLock(repo, id, { kind: 'shared', purpose, created: new Date(at).toISOString(), at, ttl: DEFAULT_LOCK_TTL_MS });
  } catch (err) {
    if (!writeRefusal(err)) throw err;
    return readLocks(repo);
  }
  try {
    return (await readLocks(repo, Date.now(), id)).filter((l) => l.id !== id);
  } finally {
    await repo.storage.delete(lockName(id));
  }
}

/**
 * Whether a lock's holder has not refreshed it for its lifetime. With the storage's time
 * of its last write (`modified`) and of the reader's own lock just written (`reference`),
 * on that one clock only: a holder whose clock runs an hour behind writes expiries an
 * hour early, and judged by them, a gc's live exclusive lock would be removed by the next
 * backup, which would then commit chunks the gc goes on deleting. Without a reference (a
 * reader that wrote no lock: unlock, a full repository's gc), the expiry the holder wrote
 * must have passed on this host's clock and the last write be a lifetime old on it too,
 * so that one wrong clock alone, the holder's, makes no lock stale.
 */
function isStale(lock: LockBody, at: { now: number; modified: number | undefined; reference: number | undefined }): boolean {
  const ttl = lock.ttlMs ?? DEFAULT_LOCK_TTL_MS;
  if (at.modified === undefined) return Date.parse(lock.expires) < at.now;
  if (at.reference !== undefined) return at.reference - at.modified > ttl;
  return Date.parse(lock.expires) < at.now && at.now - at.modified > ttl;
}

/** A lock this host's process table proves dead: same host name, no such pid (restic's rule). */
export function heldByDeadProcess(lock: LockBody, host = hostname()): boolean {
  return lock.host === host && lock.pid !== process.pid && processGone(lock.pid);
}

/** Whether this host's process table proves process `pid` gone (EPERM: alive, someone else's). */
export function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

const damagedAdvice = (ids: string[]) =>
  `lock ${ids.map(lockName).join(', ')} cannot be read (damaged, or of another repository): remove ${ids.length === 1 ? 'it' : 'them'} with "vmvault unlock"`;

/** The first delay before trying again for a held lock, and the longest (each is jittered ±50%). */
export const LOCK_RETRY_FIRST_MS = 500;
export const LOCK_RETRY_MAX_MS = 15_000;

/** Another live process holds a lock this one excludes (not damage: worth waiting for). */
class HeldElsewhere extends VmvaultError {
  /** `gone`: every holder is a process this host's process table proves dead: its lock stays until unlock or expiry, not worth waiting for. */
  constructor(message: string, readonly who: string, readonly gone: boolean) {
    super('LOCKED', message, { retriable: true });
  }
}

/**
 * Takes a lock of `kind`. When another process holds one it excludes: LOCKED at once, or,
 * with a lock wait (opts.wait, else the repository's), once that wait is over, having
 * tried again meanwhile. A damaged lock, a lock whose holder this host proves gone (it
 * needs unlock), a refused write or a storage failure is never waited for.
 */
export async function acquireLock(repo: Repository, kind: LockKind, opts: LockOptions): Promise<HeldLock> {
  const wait = opts.wait ?? repo.lockWait;
  if (!wait || wait.ms <= 0) return tryLock(repo, kind, opts);
  const started = Date.now();
  let delay = LOCK_RETRY_FIRST_MS;
  let waitingFor: string | undefined;
  for (;;) {
    try {
      return await tryLock(repo, kind, opts);
    } catch (err) {
      if (!(err instanceof HeldElsewhere) || err.gone) throw err;
      const left = started + wait.ms - Date.now();
      const waited = `${Math.round((Date.now() - started) / 1000)} s`;
      if (left <= 0) {
        throw new VmvaultError('LOCKED', `${err.message} (waited ${waited} for it, as --retry-lock allows: a longer wait may be enough)`, { retriable: true });
      }
      if (err.who !== waitingFor) repo.warn(`${opts.purpose} is waiting for the repository's lock (${err.who}), up to ${Math.ceil(left / 1000)} s more`);
      waitingFor = err.who;
      await pause(Math.min(left, delay * (0.5 + Math.random())), wait);
      delay = Math.min(delay * 2, LOCK_RETRY_MAX_MS);
    }
  }
}

/** Waits `ms`, or until the wait's signal aborts (then throws its reason). */
async function pause(ms: number, wait: LockWait): Promise<void> {
  await sleep(ms, undefined, wait.signal ? { signal: wait.signal } : {}).catch((err: unknown) => {
    throw wait.signal?.aborted ? wait.signal.reason : err;
  });
}

async function tryLock(repo: Repository, kind: LockKind, opts: LockOptions): Promise<HeldLock> {
  const ttl = opts.ttlMs ?? DEFAULT_LOCK_TTL_MS;
  const now = opts.now ?? Date.now;
  const id = randomBytes(16).toString('hex');
  const created = new Date(now()).toISOString();
  let lastWritten = 0;
  const write = async () => {
    const at = now();
    await putLock(repo, id, { kind, purpose: opts.purpose, created, at, ttl });
    lastWritten = at;
  };
  await write();
  let conflicts: Array<FoundLock & { lock: LockBody }>;
  let damaged: string[];
  try {
    const all = await readLocks(repo, now(), id);
    for (const s of all.filter((l) => l.stale)) await repo.storage.delete(lockName(s.id));
    damaged = all.filter((l) => l.damaged !== undefined).map((l) => l.id);
    conflicts = all.filter((l): l is FoundLock & { lock: LockBody } =>
      l.lock !== undefined && l.id !== id && !l.stale && (kind === 'exclusive' || l.lock.kind === 'exclusive'));
  } catch (err) {
    await repo.storage.delete(lockName(id));
    throw err;
  }
  if (conflicts.length) {
    await repo.storage.delete(lockName(id));
    const who = conflicts.map((c) => `${c.lock.kind} lock for ${c.lock.purpose} by ${c.lock.host} pid ${c.lock.pid} since ${c.lock.created}`).join('; ');
    // A holder this host's process table proves gone (killed, crashed) is not coming back: say how to clear it now.
    const dead = conflicts.filter((c) => heldByDeadProcess(c.lock));
    const advice = dead.length === conflicts.length
      ? `process${dead.length === 1 ? ` ${dead[0]!.lock.pid} is` : `es ${dead.map((c) => c.lock.pid).join(', ')} are`} gone from this host (killed or crashed): run "vmvault unlock" to remove ${dead.length === 1 ? 'its lock' : 'their locks'}, then try again (or wait: a lock expires ${Math.round(ttl / 60_000)} minutes after its last refresh)`
      : 'try again when that finishes; a lock whose holder crashed expires by itself';
    throw new HeldElsewhere(`the repository is locked (${who}): ${advice}`, who, dead.length === conflicts.length);
  }
  if (damaged.length && kind === 'exclusive') {
    await repo.storage.delete(lockName(id));
    throw new VmvaultError('LOCKED', `${opts.purpose} needs the exclusive lock, and ${damagedAdvice(damaged)} once no vmvault process is running`);
  }
  if (damaged.length) repo.warn(`${damagedAdvice(damaged)}; ${opts.purpose} goes on`);
  let released = false;
  let lostWhy: string | undefined;
  const lost = (why: string) => new VmvaultError('LOCKED', `the ${kind} lock for ${opts.purpose} was lost (${why}): nothing was committed; run it again`, { retriable: true });
  const check = async () => {
    if (lostWhy === undefined && now() - lastWritten >= ttl) lostWhy = `not refreshed for ${Math.round((now() - lastWritten) / 1000)} s`;
    if (lostWhy === undefined && !(await repo.storage.stat(lockName(id)))) lostWhy = 'another process removed it as stale';
    if (lostWhy !== undefined) {
      clearInterval(timer);
      throw lost(lostWhy);
    }
  };
  const refresh = async () => {
    await check();
    await write();
  };
  // A refresh that finds the lock lost stops the timer: a process that was suspended, or
  // whose storage refused the refreshes for a whole lifetime, never writes back a lock
  // that another process removed as stale.
  const timer = setInterval(() => void refresh().catch(() => undefined), Math.max(1000, ttl / 4));
  timer.unref();
  const remove = () => repo.storage.delete(lockName(id));
  heldHere.add(remove);
  return {
    id,
    refresh,
    check,
    confirm: refresh,
    release: async () => {
      if (released) return;
      released = true;
      clearInterval(timer);
      heldHere.delete(remove);
      await remove();
    },
  };
}

/** How to remove each lock this process holds and has not released. */
const heldHere = new Set<() => Promise<void>>();

/**
 * Removes every lock this process holds, for a forced exit that cannot wait for their
 * holders to release them (src/cli/interrupt.ts): nothing is listed or read.
 */
export async function removeHeldLocks(): Promise<void> {
  for (const remove of [...heldHere]) {
    await remove();
    heldHere.delete(remove);
  }
}

/**
 * Runs `fn` under a lock, releasing it whatever happens. A repository that refuses
 * writes gets an error that says so: writers need their lock, they never go without.
 */
export async function withLock<T>(repo: Repository, kind: LockKind, opts: LockOptions, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
  let lock: HeldLock;
  try {
    lock = await acquireLock(repo, kind, opts);
  } catch (err) {
    const refusal = writeRefusal(err);
    if (!refusal) throw err;
    const state = refusal === 'full' ? 'is full' : 'is read-only for this process';
    throw new VmvaultError('STORAGE', `${opts.purpose} cannot run: the repository at ${repo.storage.location} ${state}, and ${opts.purpose} writes (${errorMessage(err)})`, { cause: err });
  }
  return withHeld(repo, lock, opts, fn);
}

/**
 * For work that only reads the repository (restore, verify): a shared lock, so that
 * gc does not delete chunks under it; but none when the repository was opened with
 * `--no-lock`, or refuses writes (read-only mount or credentials, full disk), with a
 * warning: reading stays possible, and a chunk deleted meanwhile by a gc elsewhere
 * shows as a missing chunk, never as wrong data (chunks are authenticated).
 */
export async function withReadLock<T>(repo: Repository, purpose: string, fn: () => Promise<T>): Promise<T> {
  if (repo.noLock) return fn();
  let lock: HeldLock;
  try {
    lock = await acquireLock(repo, 'shared', { purpose });
  } catch (err) {
    const refusal = writeRefusal(err);
    if (!refusal) throw err;
    repo.warn(`no lock was taken for ${purpose}: the repository at ${repo.storage.location} refuses writes (${refusal === 'full' ? 'it is full' : 'read-only'}: ${errorMessage(err)}); ` +
      'going on without one, as --no-lock does: a gc running meanwhile could make this fail (never return wrong data)');
    return fn();
  }
  return withHeld(repo, lock, { purpose }, fn);
}

/**
 * Runs `fn` and releases `lock`. A release that fails (the storage went down) is only a
 * warning: when `fn` failed, its error says what went wrong and must be the one shown;
 * when it succeeded, its work is done. The lock left behind expires by itself.
 */
async function withHeld<T>(repo: Repository, lock: HeldLock, opts: LockOptions, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
  const release = () => lock.release().catch((err: unknown) => repo.warn(
    `the lock ${lockName(lock.id)} of ${opts.purpose} could not be removed (${errorMessage(err)}): it expires by itself within ` +
    `${Math.round((opts.ttlMs ?? DEFAULT_LOCK_TTL_MS) / 60_000)} minutes, or remove it with "vmvault unlock --all" once nothing runs`));
  try {
    return await fn(lock);
  } finally {
    await release();
  }
}

/**
 * Repository locks, kept in the repository itself so that the CLI and the service
 * (on any host) honour the same ones. Backups hold shared locks; garbage collection
 * holds the exclusive lock, so it never deletes a chunk a running backup may use.
 *
 * A lock is a sealed object `locks/<random id>` holding its kind, holder and expiry.
 * Holders refresh it while they work; a lock past its expiry is stale (its holder
 * crashed) and is ignored and removed by the next acquirer.
 *
 * Acquisition writes the lock first and then looks for conflicts, backing off (and
 * deleting its own lock) when it finds one: two racing acquirers may both back off,
 * but can never both succeed.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { z } from 'zod';
import { VmvaultError, errorMessage } from '../errors.js';
import { additionalData, open, seal } from '../crypto/seal.js';
import type { Repository } from './repository.js';

export type LockKind = 'shared' | 'exclusive';

const lockSchema = z.object({
  kind: z.enum(['shared', 'exclusive']),
  host: z.string(),
  pid: z.number(),
  purpose: z.string(),
  created: z.string(),
  expires: z.string(),
});
type LockBody = z.infer<typeof lockSchema>;

export interface LockOptions {
  purpose: string;
  /** How long a lock lives without refresh; a crashed holder blocks others at most this long. */
  ttlMs?: number;
  /** Clock, for tests. */
  now?: () => number;
}

export interface HeldLock {
  readonly id: string;
  /** Extends the expiry; called automatically every ttl/4 until release. */
  refresh(): Promise<void>;
  /**
   * Before a commit: throws (LOCKED, retriable) unless the lock is still ours and
   * live — refreshed within its lifetime and not removed as stale by another
   * process — then refreshes it. A backup whose lock lapsed may have had chunks
   * collected under it, so it must not write its manifest.
   */
  confirm(): Promise<void>;
  release(): Promise<void>;
}

export const DEFAULT_LOCK_TTL_MS = 30 * 60 * 1000;

const lockName = (id: string) => `locks/${id}`;

export async function readLocks(repo: Repository, now = Date.now()): Promise<{ id: string; lock: LockBody; stale: boolean }[]> {
  const out: { id: string; lock: LockBody; stale: boolean }[] = [];
  for await (const { name } of repo.storage.list('locks/')) {
    const id = name.slice('locks/'.length);
    try {
      const plain = open(repo.keys.encKey, 'lock', await repo.storage.get(name), additionalData(repo.id, 'lock', id), name);
      const lock = lockSchema.parse(JSON.parse(plain.toString('utf8')));
      out.push({ id, lock, stale: Date.parse(lock.expires) < now });
    } catch (err) {
      if ((err as { code?: string }).code === 'NOT_FOUND') continue; // released meanwhile
      throw new VmvaultError('INTEGRITY', `lock ${name} cannot be read (${errorMessage(err)}): remove it if no vmvault process is running`);
    }
  }
  return out;
}

export async function acquireLock(repo: Repository, kind: LockKind, opts: LockOptions): Promise<HeldLock> {
  const ttl = opts.ttlMs ?? DEFAULT_LOCK_TTL_MS;
  const now = opts.now ?? Date.now;
  const id = randomBytes(16).toString('hex');
  const created = new Date(now()).toISOString();
  let lastWritten = 0;
  const write = async () => {
    const at = now();
    const body: LockBody = { kind, host: hostname(), pid: process.pid, purpose: opts.purpose, created, expires: new Date(at + ttl).toISOString() };
    await repo.storage.put(lockName(id), seal(repo.keys.encKey, 'lock', Buffer.from(JSON.stringify(body)), additionalData(repo.id, 'lock', id)));
    lastWritten = at;
  };
  await write();
  let conflicts: Awaited<ReturnType<typeof readLocks>>;
  try {
    const all = await readLocks(repo, now());
    for (const s of all.filter((l) => l.stale)) await repo.storage.delete(lockName(s.id));
    conflicts = all.filter((l) => l.id !== id && !l.stale && (kind === 'exclusive' || l.lock.kind === 'exclusive'));
  } catch (err) {
    await repo.storage.delete(lockName(id));
    throw err;
  }
  if (conflicts.length) {
    await repo.storage.delete(lockName(id));
    const who = conflicts.map((c) => `${c.lock.kind} lock for ${c.lock.purpose} by ${c.lock.host} pid ${c.lock.pid} since ${c.lock.created}`).join('; ');
    throw new VmvaultError('LOCKED', `the repository is locked (${who}): try again when that finishes; a lock whose holder crashed expires by itself`, { retriable: true });
  }
  let released = false;
  const timer = setInterval(() => void write().catch(() => undefined), Math.max(1000, ttl / 4));
  timer.unref();
  const lost = (why: string) => new VmvaultError('LOCKED', `the ${kind} lock for ${opts.purpose} was lost (${why}): nothing was committed; run it again`, { retriable: true });
  return {
    id,
    refresh: write,
    confirm: async () => {
      if (now() - lastWritten >= ttl) throw lost(`not refreshed for ${Math.round((now() - lastWritten) / 1000)} s`);
      if (!(await repo.storage.stat(lockName(id)))) throw lost('another process removed it as stale');
      await write();
    },
    release: async () => {
      if (released) return;
      released = true;
      clearInterval(timer);
      await repo.storage.delete(lockName(id));
    },
  };
}

/** Runs `fn` under a lock, releasing it whatever happens. */
export async function withLock<T>(repo: Repository, kind: LockKind, opts: LockOptions, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
  const lock = await acquireLock(repo, kind, opts);
  try {
    return await fn(lock);
  } finally {
    await lock.release();
  }
}

/**
 * A per-VM lock in Redis, so that two jobs never work on one VM at once, whichever
 * host or worker runs them. SET key token NX PX ttl takes it; the holder refreshes
 * it every ttl/3 while it works; release and refresh compare the token first (Lua),
 * so a holder whose lock expired can never remove or extend its successor's. A
 * holder that crashes stops refreshing and its lock expires after at most `ttlMs`.
 */
import { randomBytes } from 'node:crypto';
import type { RedisConnection } from './connection.js';

export const DEFAULT_VM_LOCK_TTL_MS = 60_000;
const KEY_PREFIX = 'vmvault:vm-lock:';

const RELEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end`;
const REFRESH = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end`;

export interface VmLockOptions {
  /** Lifetime without refresh: how long a crashed holder blocks the VM. */
  ttlMs?: number;
  /** Refresh period (default ttl/3); 0 disables refreshing (tests simulate a dead holder). */
  refreshMs?: number;
  /** Who holds it, for people reading Redis (e.g. `host/jobId`); a random suffix is added. */
  holder?: string;
  /** Called once when the lock is found lost (expired or taken over) while held. */
  onLost?: (why: string) => void;
}

export interface VmLock {
  readonly vm: string;
  readonly token: string;
  /** False once the lock is known lost; a holder must then not commit anything. */
  readonly held: boolean;
  /** Extends the lock now; false (and held becomes false) when it was lost. */
  refresh(): Promise<boolean>;
  /** Stops refreshing and deletes the lock if it is still ours. */
  release(): Promise<void>;
}

export function vmLockKey(vm: string): string {
  return KEY_PREFIX + vm;
}

/** The token of the current holder, or null. */
export async function vmLockHolder(redis: RedisConnection, vm: string): Promise<string | null> {
  return redis.get(vmLockKey(vm));
}

/** Milliseconds until the current lock expires (−2 when there is none). */
export async function vmLockRemainingMs(redis: RedisConnection, vm: string): Promise<number> {
  return redis.pttl(vmLockKey(vm));
}

/** Takes the lock, or resolves null when another holder has it. */
export async function tryAcquireVmLock(redis: RedisConnection, vm: string, opts: VmLockOptions = {}): Promise<VmLock | null> {
  const ttl = opts.ttlMs ?? DEFAULT_VM_LOCK_TTL_MS;
  const key = vmLockKey(vm);
  const token = `${opts.holder ?? 'vmvault'}/${randomBytes(8).toString('hex')}`;
  if ((await redis.set(key, token, 'PX', ttl, 'NX')) !== 'OK') return null;

  let held = true;
  let lastOk = Date.now();
  let timer: NodeJS.Timeout | undefined;
  const lost = (why: string) => {
    if (!held) return;
    held = false;
    if (timer) clearInterval(timer);
    opts.onLost?.(why);
  };
  const refresh = async (): Promise<boolean> => {
    if (!held) return false;
    try {
      const r = await redis.eval(REFRESH, 1, key, token, String(ttl));
      if (r === 1) {
        lastOk = Date.now();
        return held;
      }
      lost(`the lock of VM "${vm}" expired or was taken by another holder`);
    } catch (err) {
      // Redis unreachable: the lock may still be ours until its ttl has passed.
      if (Date.now() - lastOk >= ttl) lost(`the lock of VM "${vm}" could not be refreshed for ${ttl} ms (${(err as Error).message})`);
    }
    return held;
  };
  const every = opts.refreshMs ?? Math.max(10, Math.floor(ttl / 3));
  if (every > 0) {
    timer = setInterval(() => void refresh(), every);
    timer.unref();
  }
  return {
    vm,
    token,
    get held() { return held; },
    refresh,
    async release() {
      if (timer) clearInterval(timer);
      held = false;
      await redis.eval(RELEASE, 1, key, token);
    },
  };
}

/**
 * Retries as a wrapper around any Storage (kopia's retrying_storage.go), so backends
 * stay free of retry loops and tests can drive it with faulty.ts.
 */
import { NotFoundError, VmvaultError, errorMessage, isRetriable, isThrottling } from '../errors.js';
import { type Storage, getInto, sameBackend, type StoredObject } from './storage.js';

export interface RetryOptions {
  /** Total attempts per operation, the first included. Default 6. */
  attempts?: number;
  /**
   * Total attempts when the service answers "slow down" (isThrottling): that is load,
   * not failure, and the adaptive limiter (throttle.ts) needs time to bring the rate
   * down. Default 12 (about a minute of waiting with the default delays).
   */
  throttledAttempts?: number;
  /** Delay before the first retry, doubled each time. Default 200 ms. */
  baseDelayMs?: number;
  /** Upper bound of one delay. Default 10 s. */
  maxDelayMs?: number;
  /** Injected by tests; defaults to setTimeout and Math.random. */
  sleep?: (ms: number) => Promise<void>;
  random?: () => number;
  /** Called before each retry, e.g. to log it. */
  onRetry?: (event: RetryEvent) => void;
  /**
   * Once aborted, no operation is retried: a failure is thrown as it is, and a wait for
   * the next attempt ends with the signal's reason. A cancelled backup does not sit out
   * a minute of backoff on a storage that is down (its cleanup still gets one attempt).
   */
  signal?: AbortSignal;
}

export interface RetryEvent {
  op: string;
  name: string;
  /** The attempt that just failed, from 1. */
  attempt: number;
  delayMs: number;
  error: unknown;
}

const defaultSleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Wraps `storage` so that every operation is retried on errors `isRetriable` accepts,
 * with exponential backoff and jitter: the n-th retry waits between half and all of
 * min(maxDelayMs, baseDelayMs · 2^(n-1)).
 *
 * - A throttling answer (SlowDown, 503, 429) gets up to `throttledAttempts` attempts.
 * - NotFoundError and non-retriable errors are thrown at once; a VmvaultError as is,
 *   anything else wrapped in VmvaultError('STORAGE').
 * - After the last attempt fails, throws VmvaultError('STORAGE') naming the location,
 *   the operation, the object and the number of attempts, with the last error as cause.
 * - `list` restarts from the beginning after a retriable error and skips the names it
 *   has already yielded, so the caller sees each object once. This costs memory for
 *   the names yielded so far (a caller listing everything holds them anyway). A restart
 *   that brought new names resets the attempt count: the listing is progressing.
 * - `close` is not retried.
 */
export function withRetry(storage: Storage, opts: RetryOptions = {}): Storage {
  const attempts = Math.max(1, opts.attempts ?? 6);
  const throttledAttempts = Math.max(attempts, opts.throttledAttempts ?? 12);
  const base = opts.baseDelayMs ?? 200;
  const cap = opts.maxDelayMs ?? 10_000;
  const sleep = opts.sleep ?? defaultSleep;
  const random = opts.random ?? Math.random;

  const delayFor = (attempt: number): number => {
    const ceiling = Math.min(cap, base * 2 ** (attempt - 1));
    return Math.round(ceiling * (0.5 + random() / 2));
  };

  /** Decides after a failed attempt: returns the delay to wait, or throws the final error. */
  const onFailure = (op: string, name: string, attempt: number, err: unknown): number => {
    if (err instanceof NotFoundError) throw err;
    if (!isRetriable(err)) throw asStorageError(storage.location, op, name, attempt, err, false);
    if (attempt >= (isThrottling(err) ? throttledAttempts : attempts)) throw asStorageError(storage.location, op, name, attempt, err, true);
    const delayMs = delayFor(attempt);
    opts.onRetry?.({ op, name, attempt, delayMs, error: err });
    return delayMs;
  };

  /** Waits before attempt `attempt` + 1 of `op`, which failed with `err`; cut short when `opts.signal` aborts. */
  const pause = async (op: string, name: string, attempt: number, err: unknown): Promise<void> => {
    const signal = opts.signal;
    // Aborted: the failure is final, and no retry is announced (onRetry) that will not happen.
    if (signal?.aborted) {
      if (err instanceof NotFoundError) throw err;
      throw asStorageError(storage.location, op, name, attempt, err, false);
    }
    const ms = onFailure(op, name, attempt, err);
    if (!signal) return sleep(ms);
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<never>((_, reject) => signal.addEventListener('abort', onAbort = () => reject(signal.reason), { once: true }));
    try {
      await Promise.race([sleep(ms), aborted]);
    } finally {
      signal.removeEventListener('abort', onAbort!);
    }
  };

  /** `call`: the request's own signal (RequestOptions): once it aborts, its reason is the outcome, never retried or wrapped. */
  async function run<T>(op: string, name: string, fn: () => Promise<T>, call?: AbortSignal): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        if (call?.aborted) throw call.reason;
        await pause(op, name, attempt, err);
      }
    }
  }

  async function* list(prefix: string): AsyncGenerator<StoredObject> {
    const seen = new Set<string>();
    for (let attempt = 1; ; attempt++) {
      const before = seen.size;
      try {
        for await (const item of storage.list(prefix)) {
          if (seen.has(item.name)) continue;
          seen.add(item.name);
          yield item;
        }
        return;
      } catch (err) {
        if (seen.size > before) attempt = 1; // progress since the last failure
        await pause('list', prefix, attempt, err);
      }
    }
  }

  const sweep = storage.removeTemporary?.bind(storage);
  return {
    ...sameBackend(storage),
    get: (name, opts) => run('get', name, () => storage.get(name, opts)),
    getInto: (name, into, opts) => run('get', name, () => getInto(storage, name, into, opts), opts?.signal),
    put: (name, data, opts) => run('put', name, () => storage.put(name, data, opts), opts?.signal),
    stat: (name) => run('stat', name, () => storage.stat(name)),
    delete: (name) => run('delete', name, () => storage.delete(name)),
    list,
    ...(sweep ? { removeTemporary: (before: number) => run('sweep', '(temporary files)', () => sweep(before)) } : {}),
    close: () => storage.close(),
  };
}

function asStorageError(location: string, op: string, name: string, attempts: number, err: unknown, exhausted: boolean): VmvaultError {
  // A non-retriable VmvaultError already says what went wrong (bad name, missing bucket…).
  if (!exhausted && err instanceof VmvaultError) return err;
  const what = op === 'list' ? `list of prefix ${JSON.stringify(name)}` : `${op} of object ${JSON.stringify(name)}`;
  const tries = attempts === 1 ? '1 attempt' : `${attempts} attempts`;
  const hint = exhausted ? '; the storage may be down or unreachable, try again later' : '';
  return new VmvaultError('STORAGE', `storage ${location}: ${what} failed after ${tries}: ${errorMessage(err)}${hint}`, { cause: err });
}

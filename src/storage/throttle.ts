/**
 * Adaptive concurrency as a wrapper around any Storage: how many requests may be in
 * flight at once follows what the service tolerates (AIMD, as TCP's congestion window).
 * S3 answers `SlowDown` (HTTP 503) when a prefix gets more requests than it can take, and
 * a backup from many hosts into one bucket meets it; answering with the same number of
 * requests only makes more of them fail. So:
 * - a throttling answer (isThrottling) halves the number of requests in flight (not the
 *   limit, which may be far above what callers use, as TCP halves its flight size), at
 *   most once per round: answers to requests sent before the last decrease do not halve
 *   it again, or ten requests refused together would take the limit from 16 to 1;
 * - a run of successes as long as the limit (one round at that rate), each sent while the
 *   limit was reached, raises it by one: a limit callers do not reach is not raised;
 * - the throttled request itself fails with its error: the retry wrapper outside this one
 *   (withRetry) waits a jittered, growing delay, without holding a slot, and sends it again.
 *
 * It sits inside withRetry (openStorage: withRetry(withAdaptiveConcurrency(s3))), so that
 * every attempt takes a slot and no slot is held while a retry waits. Every caller of the
 * storage shares its limits. Writes (put, delete) and reads (get, stat, list pages) have
 * one limit each, as S3 has one request budget each per prefix (3,500 and 5,500 a second):
 * quick HEADs that succeed must not raise the limit of uploads that are being refused.
 */
import { isThrottling } from '../errors.js';
import { type Storage, getInto, sameBackend, type StoredObject } from './storage.js';

export interface ConcurrencyOptions {
  /** Upper bound, and the start. Default 32 (S3Storage's sockets). */
  max?: number;
  /** Lower bound. Default 1. */
  min?: number;
  /** Told of each change of the limit, e.g. to log it. */
  onChange?: (event: ConcurrencyEvent) => void;
}

export interface ConcurrencyEvent { limit: number; previous: number; reason: 'throttled' | 'recovered' }

/** What the limiter did so far: for logs, tests and benchmarks. */
export interface ConcurrencyStats {
  limit: number;
  inFlight: number;
  /** Largest number of requests in flight at once. */
  peak: number;
  /** Lowest limit reached. */
  lowest: number;
  /** Throttling answers seen, and how many of them halved the limit. */
  throttled: number;
  decreases: number;
  increases: number;
}

export interface AdaptiveStorage extends Storage {
  concurrency(): { reads: ConcurrencyStats; writes: ConcurrencyStats };
}

/** The AIMD limiter itself, apart from storage: `run` holds a slot while `fn` runs. */
export class AimdLimiter {
  private limit: number;
  private inFlight = 0;
  private successes = 0;
  /** Counts the times the limit was reached (a request took the last slot or had to wait). */
  private saturations = 0;
  /** Bumped at each decrease; a request remembers the round it was sent in. */
  private round = 0;
  private readonly waiting: Array<() => void> = [];
  private readonly stats: Omit<ConcurrencyStats, 'limit' | 'inFlight'>;

  constructor(private readonly opts: { max: number; min: number; onChange?: (e: ConcurrencyEvent) => void }) {
    this.limit = opts.max;
    this.stats = { peak: 0, lowest: opts.max, throttled: 0, decreases: 0, increases: 0 };
  }

  snapshot(): ConcurrencyStats {
    return { limit: this.limit, inFlight: this.inFlight, ...this.stats };
  }

  /**
   * Runs `fn` holding a slot. `countSuccess: false` for calls whose success says
   * nothing about the service's load (a list item served from a page already fetched).
   */
  async run<T>(fn: () => Promise<T>, countSuccess = true): Promise<T> {
    const mark = this.saturations;
    if (this.inFlight < this.limit) this.inFlight++;
    else {
      this.saturations++;
      await new Promise<void>((resolve) => this.waiting.push(resolve)); // wake() took the slot for us
    }
    if (this.inFlight >= this.limit) this.saturations++;
    this.stats.peak = Math.max(this.stats.peak, this.inFlight);
    const round = this.round;
    try {
      const out = await fn();
      // Only a success while the limit was reached says the service takes that rate.
      if (countSuccess && this.saturations > mark) this.onSuccess();
      return out;
    } catch (err) {
      if (isThrottling(err)) this.onThrottled(round, this.inFlight);
      throw err;
    } finally {
      this.inFlight--;
      this.wake();
    }
  }

  private onSuccess(): void {
    if (++this.successes < this.limit || this.limit >= this.opts.max) return;
    this.successes = 0;
    this.set(this.limit + 1, 'recovered');
    this.stats.increases++;
  }

  /** `inFlight`: requests in flight when the answer came, the throttled one included. */
  private onThrottled(round: number, inFlight: number): void {
    this.stats.throttled++;
    this.successes = 0;
    if (round !== this.round) return; // sent before the last decrease: already accounted for
    this.round++;
    this.stats.decreases++;
    this.set(Math.max(this.opts.min, Math.floor(Math.min(this.limit, inFlight) / 2)), 'throttled');
  }

  private set(limit: number, reason: ConcurrencyEvent['reason']): void {
    if (limit === this.limit) return;
    const previous = this.limit;
    this.limit = limit;
    this.stats.lowest = Math.min(this.stats.lowest, limit);
    this.opts.onChange?.({ limit, previous, reason });
    this.wake();
  }

  /** Hands free slots to waiting requests, in order. */
  private wake(): void {
    while (this.waiting.length && this.inFlight < this.limit) {
      this.inFlight++;
      this.waiting.shift()!();
    }
  }
}
/** Wraps `storage` with two AimdLimiters, one for writes and one for reads; see the file comment. */
export function withAdaptiveConcurrency(storage: Storage, opts: ConcurrencyOptions = {}): AdaptiveStorage {
  const max = Math.max(1, opts.max ?? 32);
  const limits = { max, min: Math.min(max, Math.max(1, opts.min ?? 1)), ...(opts.onChange ? { onChange: opts.onChange } : {}) };
  const writes = new AimdLimiter(limits);
  const limiter = new AimdLimiter(limits); // reads

  // A listing holds a slot while it waits for its next item (a page request, mostly);
  // not between items, so a slow consumer does not starve the uploads.
  async function* list(prefix: string): AsyncGenerator<StoredObject> {
    const it = storage.list(prefix)[Symbol.asyncIterator]();
    try {
      for (;;) {
        const step = await limiter.run(() => it.next(), false);
        if (step.done) return;
        yield step.value;
      }
    } finally {
      await it.return?.();
    }
  }

  const sweep = storage.removeTemporary?.bind(storage);
  return {
    ...sameBackend(storage),
    get: (name, opts) => limiter.run(() => storage.get(name, opts)),
    getInto: (name, into, opts) => limiter.run(() => getInto(storage, name, into, opts)),
    put: (name, data, opts) => writes.run(() => storage.put(name, data, opts)),
    stat: (name) => limiter.run(() => storage.stat(name)),
    delete: (name) => writes.run(() => storage.delete(name)),
    list,
    ...(sweep ? { removeTemporary: (before: number) => sweep(before) } : {}),
    close: () => storage.close(),
    concurrency: () => ({ reads: limiter.snapshot(), writes: writes.snapshot() }),
  };
}

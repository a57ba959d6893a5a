import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { ThrottledError, VmvaultError, isRetriable, isThrottling } from '../../src/errors.js';
import { faulty, httpError, networkError } from '../../src/storage/faulty.js';
import { LocalStorage } from '../../src/storage/local.js';
import { withRetry } from '../../src/storage/retry.js';
import { AimdLimiter, withAdaptiveConcurrency, type ConcurrencyEvent } from '../../src/storage/throttle.js';

/** A request the test finishes by hand: `ok()` or `fail(err)`. */
function manual(): { promise: Promise<void>; ok(): void; fail(err: unknown): void } {
  let ok!: () => void;
  let fail!: (err: unknown) => void;
  const promise = new Promise<void>((resolve, reject) => { ok = resolve; fail = reject; });
  return { promise, ok, fail };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

describe('AimdLimiter', () => {
  test('never more in flight than the limit; a throttled round halves it once, not once per refusal', async () => {
    const events: ConcurrencyEvent[] = [];
    const limiter = new AimdLimiter({ max: 8, min: 1, onChange: (e) => events.push(e) });
    const reqs = Array.from({ length: 12 }, () => manual());
    let running = 0;
    let peak = 0;
    const results = reqs.map((r) => limiter.run(async () => {
      peak = Math.max(peak, ++running);
      try { await r.promise; } finally { running--; }
    }).catch((err: unknown) => err));
    await tick();
    assert.equal(limiter.snapshot().inFlight, 8);
    // All 8 sent in the same round are refused: one halving, 8 → 4.
    for (const r of reqs.slice(0, 8)) r.fail(httpError(503, 'SlowDown'));
    await tick();
    const s = limiter.snapshot();
    assert.equal(s.limit, 4);
    assert.equal(s.decreases, 1);
    assert.equal(s.throttled, 8);
    assert.equal(s.inFlight, 4, 'the 4 waiting requests start, no more');
    // Sent after the decrease: a refusal now halves again.
    reqs[8]!.fail(new ThrottledError('slow down'));
    await tick();
    assert.equal(limiter.snapshot().limit, 2);
    for (const r of reqs.slice(9)) r.ok();
    await Promise.all(results);
    assert.equal(peak, 8);
    // Then 3 successes at limit 2: a run, so 2 → 3.
    assert.deepEqual(events.map((e) => [e.previous, e.limit, e.reason]), [[8, 4, 'throttled'], [4, 2, 'throttled'], [2, 3, 'recovered']]);
  });

  test('a run of successes as long as the limit, sent at the limit, raises it by one, up to the maximum', async () => {
    const limiter = new AimdLimiter({ max: 4, min: 1 });
    const r = Array.from({ length: 4 }, () => manual());
    const ps = r.map((x) => limiter.run(() => x.promise).catch(() => {}));
    r[0]!.fail(httpError(429, 'SlowDown'));
    await ps[0];
    assert.equal(limiter.snapshot().limit, 2, 'halved from the 4 in flight');
    r[1]!.ok();
    await ps[1];
    assert.equal(limiter.snapshot().limit, 2, 'one success is not yet a run of 2');
    for (const x of r.slice(2)) x.ok();
    await Promise.all(ps);
    assert.equal(limiter.snapshot().limit, 3, 'the others were sent at the limit: a run of 2 (and one more)');
    const at = (n: number) => Promise.all(Array.from({ length: n }, () => limiter.run(async () => {})));
    for (let i = 0; i < 5; i++) await limiter.run(async () => {});
    assert.equal(limiter.snapshot().limit, 3, 'requests one at a time do not reach the limit: no growth');
    await at(3);
    assert.equal(limiter.snapshot().limit, 4);
    for (let i = 0; i < 5; i++) await at(8);
    assert.equal(limiter.snapshot().limit, 4, 'never above max');
  });

  test('a refusal halves what is in flight, not a limit far above it', async () => {
    const limiter = new AimdLimiter({ max: 32, min: 1 });
    const r = Array.from({ length: 6 }, () => manual());
    const ps = r.map((x) => limiter.run(() => x.promise).catch(() => {}));
    r[0]!.fail(httpError(503, 'SlowDown'));
    await ps[0];
    assert.equal(limiter.snapshot().limit, 3);
    for (const x of r.slice(1)) x.ok();
    await Promise.all(ps);
  });

  test('other errors neither lower nor raise the limit; the minimum holds', async () => {
    const limiter = new AimdLimiter({ max: 2, min: 2 });
    await assert.rejects(limiter.run(async () => { throw networkError('ECONNRESET'); }));
    await assert.rejects(limiter.run(async () => { throw httpError(500, 'InternalError'); }));
    assert.equal(limiter.snapshot().decreases, 0);
    await assert.rejects(limiter.run(async () => { throw httpError(503, 'SlowDown'); }));
    assert.equal(limiter.snapshot().limit, 2);
  });
});

describe('throttling errors', () => {
  test('SlowDown, 503 and 429 are throttling and retriable; 500 and other VmvaultErrors are not throttling', () => {
    for (const e of [httpError(503, 'SlowDown'), httpError(503), httpError(429), httpError(400, 'Throttling'), new ThrottledError('x')]) {
      assert.equal(isThrottling(e), true, e.message);
      assert.equal(isRetriable(e), true, e.message);
    }
    assert.equal(isThrottling(httpError(500, 'InternalError')), false);
    assert.equal(isThrottling(new VmvaultError('STORAGE', 'x', { retriable: true })), false);
  });
});

describe('withRetry(withAdaptiveConcurrency(storage))', () => {
  test('throttled puts are retried after a delay and lower the limit; the data arrives', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'vmvault-throttle-'));
    try {
      const f = faulty(new LocalStorage(dir), { put: [{ error: httpError(503, 'SlowDown'), times: 10 }] });
      const adaptive = withAdaptiveConcurrency(f, { max: 16 });
      const delays: number[] = [];
      // 10 throttled answers in a row: more than the 6 attempts other errors get.
      const s = withRetry(adaptive, { sleep: async (ms) => void delays.push(ms), random: () => 0 });
      await s.put('keys/a', new Uint8Array([1]));
      assert.deepEqual([...(await s.get('keys/a'))], [1]);
      assert.equal(f.calls.put, 11);
      assert.equal(delays.length, 10);
      const c = adaptive.concurrency().writes;
      assert.equal(c.throttled, 10);
      assert.equal(adaptive.concurrency().reads.throttled, 0, 'reads have their own limit');
      assert.equal(c.lowest, 1, 'one request in flight, refused: halved to the minimum');

      const g = faulty(new LocalStorage(dir), { put: [{ error: httpError(503, 'SlowDown'), times: Infinity }] });
      const err = await withRetry(withAdaptiveConcurrency(g), { sleep: async () => {}, attempts: 2, throttledAttempts: 3 }).put('keys/b', new Uint8Array([2])).catch((e: unknown) => e);
      assert.ok(err instanceof VmvaultError);
      assert.match(err.message, /put of object "keys\/b" failed after 3 attempts: simulated HTTP 503 SlowDown/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { NotFoundError, VmvaultError } from '../../src/errors.js';
import { faulty, httpError, networkError } from '../../src/storage/faulty.js';
import { LocalStorage } from '../../src/storage/local.js';
import { type RetryOptions, withRetry } from '../../src/storage/retry.js';
import { collect } from './conformance.js';

describe('withRetry', () => {
  let dir: string;
  let inner: LocalStorage;
  let delays: number[];
  /** Records the delays instead of waiting them. */
  const fast = (extra: RetryOptions = {}): RetryOptions => ({
    sleep: async (ms) => void delays.push(ms),
    random: () => 1,
    ...extra,
  });

  beforeEach(async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'vmvault-retry-'));
    inner = new LocalStorage(dir);
    delays = [];
    await inner.put('config', new Uint8Array([7]));
  });
  afterEach(() => rm(dir, { recursive: true, force: true }));

  test('transient network errors and 5xx/429 are retried until the call succeeds', async () => {
    const f = faulty(inner, {
      put: [networkError('ECONNRESET'), httpError(503, 'ServiceUnavailable')],
      get: [httpError(500, 'InternalError'), httpError(429, 'SlowDown'), networkError('ETIMEDOUT')],
      stat: [networkError('EPIPE')],
      delete: [httpError(503)],
    });
    const s = withRetry(f, fast());
    await s.put('keys/a', new Uint8Array([1, 2]));
    assert.equal(f.calls.put, 3);
    assert.deepEqual([...(await s.get('keys/a'))], [1, 2]);
    assert.equal(f.calls.get, 4);
    assert.equal((await s.stat('keys/a'))?.size, 2);
    assert.equal(f.calls.stat, 2);
    await s.delete('keys/a');
    assert.equal(f.calls.delete, 2);
    assert.equal(await inner.stat('keys/a'), undefined);
  });

  test('delays grow exponentially with jitter and are capped', async () => {
    const f = faulty(inner, { get: [{ error: networkError(), times: 5 }] });
    await withRetry(f, fast({ baseDelayMs: 100, maxDelayMs: 500 })).get('config');
    assert.deepEqual(delays, [100, 200, 400, 500, 500]);

    delays = [];
    const g = faulty(inner, { get: [{ error: networkError(), times: 3 }] });
    await withRetry(g, fast({ baseDelayMs: 100, random: () => 0 })).get('config');
    assert.deepEqual(delays, [50, 100, 200], 'jitter never goes below half the delay');
  });

  test('the defaults are 6 attempts, 200 ms base, 10 s cap', async () => {
    const f = faulty(inner, { get: [{ error: networkError(), times: Infinity }] });
    await assert.rejects(withRetry(f, { sleep: async (ms) => void delays.push(ms), random: () => 1 }).get('config'), VmvaultError);
    assert.equal(f.calls.get, 6);
    assert.deepEqual(delays, [200, 400, 800, 1600, 3200]);
    const g = faulty(inner, { get: [{ error: networkError(), times: Infinity }] });
    delays = [];
    await assert.rejects(withRetry(g, { attempts: 9, sleep: async (ms) => void delays.push(ms), random: () => 1 }).get('config'));
    assert.deepEqual(delays.slice(5), [6400, 10_000, 10_000]);
  });

  test('NotFoundError is never retried', async () => {
    const f = faulty(inner);
    await assert.rejects(withRetry(f, fast()).get('missing'), NotFoundError);
    assert.equal(f.calls.get, 1);
    const g = faulty(inner, { get: [{ error: Object.assign(new NotFoundError('gone'), { retriable: true }), times: 3 }] });
    await assert.rejects(withRetry(g, fast()).get('config'), NotFoundError);
    assert.equal(g.calls.get, 1);
    assert.deepEqual(delays, []);
  });

  test('4xx and other permanent errors are not retried and come back as STORAGE errors', async () => {
    const f = faulty(inner, { put: [httpError(403, 'AccessDenied')], get: [new Error('boom')] });
    const s = withRetry(f, fast());
    await assert.rejects(s.put('config', new Uint8Array(1)), (err: unknown) => {
      assert.ok(err instanceof VmvaultError && err.code === 'STORAGE', String(err));
      assert.match(err.message, /put of object "config" failed after 1 attempt: /);
      assert.ok(err.message.includes(inner.location));
      return true;
    });
    await assert.rejects(s.get('config'), /boom/);
    assert.equal(f.calls.put, 1);
    assert.equal(f.calls.get, 1);
    assert.deepEqual(delays, []);
  });

  test('a permanent VmvaultError passes through unchanged', async () => {
    const original = new VmvaultError('NO_REPOSITORY', 'bucket missing');
    const f = faulty(inner, { stat: [original] });
    await assert.rejects(withRetry(f, fast()).stat('config'), (err: unknown) => err === original);
  });

  test('exhaustion gives a STORAGE error naming location, operation, object and attempts', async () => {
    const cause = networkError('ECONNREFUSED');
    const f = faulty(inner, { put: [{ error: cause, times: Infinity }] });
    const events: number[] = [];
    const s = withRetry(f, fast({ attempts: 4, onRetry: (e) => events.push(e.attempt) }));
    await assert.rejects(s.put('chunks/ab/abcd', new Uint8Array(1)), (err: unknown) => {
      assert.ok(err instanceof VmvaultError);
      assert.equal(err.code, 'STORAGE');
      assert.equal(err.cause, cause);
      assert.ok(err.message.includes(inner.location), err.message);
      assert.match(err.message, /put of object "chunks\/ab\/abcd" failed after 4 attempts: simulated ECONNREFUSED/);
      return true;
    });
    assert.equal(f.calls.put, 4);
    assert.deepEqual(events, [1, 2, 3]);
  });

  test('a put whose response was lost is retried and the object is whole', async () => {
    const f = faulty(inner, { put: [{ error: networkError(), after: true }] });
    await withRetry(f, fast()).put('backups/b1', new Uint8Array([4, 5]));
    assert.equal(f.calls.put, 2);
    assert.deepEqual([...(await inner.get('backups/b1'))], [4, 5]);
  });

  test('faults can target names with a predicate', async () => {
    const f = faulty(inner, { get: [{ error: networkError(), when: (n) => n.startsWith('keys/'), times: 2 }] });
    const s = withRetry(f, fast());
    await s.get('config');
    assert.equal(f.calls.get, 1, 'config did not match the predicate');
    await inner.put('keys/k', new Uint8Array(1));
    await s.get('keys/k');
    assert.equal(f.calls.get, 4);
    assert.equal(f.pending('get'), 0);
  });

  test('list restarts after a mid-listing failure without yielding duplicates', async () => {
    for (let i = 0; i < 20; i++) await inner.put(`chunks/00/${i}`, new Uint8Array(1));
    const f = faulty(inner, { list: [{ error: networkError(), after: 5 }, { error: httpError(503), after: 12 }, networkError()] });
    const names = (await collect(withRetry(f, fast()).list('chunks/'))).map((i) => i.name);
    assert.equal(f.calls.list, 4);
    assert.equal(names.length, 20);
    assert.equal(new Set(names).size, 20);
  });

  test('list gives up when restarts make no progress, and does not retry permanent errors', async () => {
    const f = faulty(inner, { list: [{ error: networkError(), times: Infinity }] });
    await assert.rejects(collect(withRetry(f, fast({ attempts: 3 })).list('keys/')), /list of prefix "keys\/" failed after 3 attempts/);
    assert.equal(f.calls.list, 3);
    const g = faulty(inner, { list: [httpError(400, 'InvalidArgument')] });
    await assert.rejects(collect(withRetry(g, fast()).list('')), VmvaultError);
    assert.equal(g.calls.list, 1);
  });

  test('an aborted signal ends the wait for the next attempt, and stops retrying', async () => {
    const stop = new AbortController();
    const reason = new VmvaultError('BAD_INPUT', 'interrupted');
    const f = faulty(inner, { get: [{ error: networkError(), times: 10 }] });
    const notices: number[] = [];
    const s = withRetry(f, { baseDelayMs: 60_000, signal: stop.signal, onRetry: (e) => notices.push(e.attempt) });
    const started = Date.now();
    const got = s.get('config');
    setTimeout(() => stop.abort(reason), 50);
    await assert.rejects(got, (err) => err === reason);
    assert.ok(Date.now() - started < 5000, 'the minute of backoff was not waited');
    assert.equal(f.calls.get, 1);
    // Once aborted, an operation (the cleanup's) gets one attempt, and fails with its own error.
    await assert.rejects(s.get('config'), (err) => err instanceof VmvaultError && err.code === 'STORAGE' && /after 1 attempt/.test(err.message));
    assert.equal(f.calls.get, 2);
    assert.deepEqual(notices, [1], 'no retry is announced once aborted');
  });

  test('close and location pass through', async () => {
    const s = withRetry(inner);
    assert.equal(s.location, inner.location);
    await s.close();
  });
});

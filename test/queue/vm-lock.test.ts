/** The per-VM lock against a real Redis: exclusion, expiry when the holder dies, safe release. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Redis } from 'ioredis';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { tryAcquireVmLock, vmLockHolder } from '../../src/queue/vm-lock.js';
import { uniqueHost } from './setup.js';

let redis: TestRedis;
let a: Redis;
let b: Redis;
before(async () => {
  redis = await startRedis();
  a = createRedis(redis.url, 'producer');
  b = createRedis(redis.url, 'producer');
});
after(async () => {
  await closeRedis(a);
  await closeRedis(b);
  await redis.stop();
});

test('one holder at a time; release lets the next one in', async () => {
  const vm = uniqueHost('vm');
  const first = await tryAcquireVmLock(a, vm, { holder: 'one' });
  assert.ok(first);
  assert.equal(await tryAcquireVmLock(b, vm), null);
  assert.equal(await vmLockHolder(b, vm), first.token);
  await first.release();
  const second = await tryAcquireVmLock(b, vm);
  assert.ok(second);
  await second.release();
});

test('a holder that dies stops refreshing and its lock expires', async () => {
  const vm = uniqueHost('vm');
  const dying = createRedis(redis.url, 'producer');
  const ttlMs = 300;
  const since = Date.now(); // before the lock is taken: it cannot expire sooner than ttlMs after this
  const held = await tryAcquireVmLock(dying, vm, { ttlMs });
  assert.ok(held);
  dying.disconnect(); // The holder's process is gone: no refresh, no release.
  assert.equal(await tryAcquireVmLock(b, vm, { ttlMs }), null);
  let next = null;
  while (!next && Date.now() - since < 5000) {
    await sleep(25); // Expiry is a matter of time: poll for it.
    next = await tryAcquireVmLock(b, vm, { ttlMs });
  }
  assert.ok(next, 'the lock never expired');
  assert.ok(Date.now() - since >= ttlMs, 'the lock expired before its ttl');
  await next.release();
});

test('a live holder keeps its lock past the ttl by refreshing it', async () => {
  const vm = uniqueHost('vm');
  // A lifetime of 1 s (refreshed every third of it) and five times that: a loaded machine's pauses do not lose it.
  const held = await tryAcquireVmLock(a, vm, { ttlMs: 1000 });
  assert.ok(held);
  await sleep(2500);
  assert.equal(held.held, true);
  assert.equal(await tryAcquireVmLock(b, vm), null);
  await held.release();
});

test('an expired holder can neither release nor refresh its successor\'s lock', async () => {
  const vm = uniqueHost('vm');
  let lostWhy = '';
  const old = await tryAcquireVmLock(a, vm, { ttlMs: 100, refreshMs: 0, onLost: (why) => { lostWhy = why; } });
  assert.ok(old);
  let successor = null;
  while (!successor) {
    await sleep(20);
    successor = await tryAcquireVmLock(b, vm, { ttlMs: 10_000 });
  }
  assert.equal(await old.refresh(), false);
  assert.match(lostWhy, /expired or was taken/);
  await old.release();
  assert.equal(await vmLockHolder(b, vm), successor.token);
  await successor.release();
  assert.equal(await vmLockHolder(b, vm), null);
});

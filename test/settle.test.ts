/**
 * settleAll: parallel reads into one buffer (a pool slot) all settle before a failure is
 * reported, so that no read lands in the buffer after its owner has given it back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { settleAll } from '../src/settle.js';

test('a failed read is reported only once its siblings have landed, and the first failure in order is the one thrown', async () => {
  const slot = Buffer.alloc(8);
  const late = (async () => { await sleep(30); slot.fill(0xab, 0, 4); })();
  const early = Promise.reject(new Error('range 2 failed'));
  const later = (async () => { await sleep(5); throw new Error('range 3 failed'); })();
  await assert.rejects(settleAll([late, early, later]), /range 2 failed/);
  assert.deepEqual([...slot.subarray(0, 4)], [0xab, 0xab, 0xab, 0xab], 'the slow read had landed when the failure was reported');
  // Promise.all, for comparison, reports before the slow read lands.
  const slot2 = Buffer.alloc(4);
  const late2 = (async () => { await sleep(30); slot2.fill(1); })();
  await assert.rejects(Promise.all([late2, Promise.reject(new Error('x'))]));
  assert.equal(slot2[0], 0);
  await late2;
  await settleAll([]);
  await settleAll([Promise.resolve(1)]);
});

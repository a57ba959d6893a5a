/**
 * ByteBudget (src/byte-budget.ts), pure logic: reads in flight never add up past
 * the budget, except one alone; waiters go in order; a failing read gives its bytes back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { ByteBudget } from '../src/byte-budget.js';

test('reads in flight stay within the budget, one larger than it goes alone, and all finish', async () => {
  const budget = new ByteBudget(100);
  let running = 0;
  let bytes = 0;
  let most = 0;
  const sizes = [30, 30, 30, 30, 250, 10, 60, 60, 0, 0];
  const order: number[] = [];
  await Promise.all(sizes.map((n, i) => budget.run(n, async () => {
    running++;
    bytes += n;
    most = Math.max(most, running);
    order.push(i);
    assert.ok(running === 1 || bytes <= 100, `${bytes} bytes in ${running} reads at once`);
    await sleep(5);
    running--;
    bytes -= n;
  })));
  assert.ok(most >= 3, 'small reads do run together');
  assert.deepEqual(order, [...order].sort((a, b) => a - b), 'in the order asked');
  assert.equal(budget.taken, 0);
});

test('a read that fails gives its bytes back', async () => {
  const budget = new ByteBudget(10);
  await assert.rejects(budget.run(8, async () => { throw new Error('damaged'); }), /damaged/);
  assert.equal(budget.taken, 0);
  assert.equal(await budget.run(10, async () => 'next'), 'next');
});

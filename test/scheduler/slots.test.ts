import { test } from 'node:test';
import assert from 'node:assert/strict';
import { missedSlot, previousSlot, scheduledJobId } from '../../src/scheduler/slots.js';

test('job ids are stable per policy, VM and slot, and never contain ":"', () => {
  const slot = new Date('2026-11-22T01:30:00Z');
  assert.equal(scheduledJobId('nightly', 'web1', slot), scheduledJobId('nightly', 'web1', new Date(slot)));
  assert.notEqual(scheduledJobId('nightly', 'web1', slot), scheduledJobId('nightly', 'web2', slot));
  assert.doesNotMatch(scheduledJobId('nightly', 'web1', slot), /:/);
});

test('previous slot and period, for 5- and 6-field expressions and time zones', () => {
  const now = new Date('2026-11-22T10:00:00Z');
  assert.deepEqual(previousSlot('30 1 * * *', now), { slot: new Date('2026-11-22T01:30:00Z'), periodMs: 24 * 3600e3 });
  assert.deepEqual(previousSlot('*/5 * * * * *', new Date('2026-11-22T10:00:07Z')), { slot: new Date('2026-11-22T10:00:05Z'), periodMs: 5000 });
  assert.deepEqual(previousSlot('0 10 * * *', now).slot, now, 'a slot exactly now counts');
  assert.deepEqual(previousSlot('30 1 * * *', now, 'Europe/Paris').slot, new Date('2026-11-22T00:30:00Z'));
});

test('a missed slot is caught up only when the last backup is more than a period old', () => {
  const now = new Date('2026-11-22T10:00:00Z');
  assert.deepEqual(missedSlot('30 1 * * *', now, undefined), new Date('2026-11-22T01:30:00Z'));
  assert.equal(missedSlot('30 1 * * *', now, new Date('2026-11-22T01:31:00Z')), undefined);
  assert.equal(missedSlot('30 1 * * *', now, new Date('2026-11-21T01:31:00Z')), undefined, 'last slot taken one period ago: not missed');
  assert.deepEqual(missedSlot('30 1 * * *', now, new Date('2026-11-20T01:31:00Z')), new Date('2026-11-22T01:30:00Z'));
});

test('missedSlot: a slot before the policy was first seen is not missed', () => {
  const now = new Date('2024-05-10T12:00:00Z');
  assert.equal(missedSlot('0 30 1 * * *', now, undefined, 'UTC', new Date('2024-05-10T02:00:00Z')), undefined);
  assert.equal(missedSlot('0 30 1 * * *', now, undefined, 'UTC', new Date('2024-05-10T01:00:00Z'))?.toISOString(), '2024-05-10T01:30:00.000Z');
  assert.equal(missedSlot('0 30 1 * * *', now, undefined, 'UTC')?.toISOString(), '2024-05-10T01:30:00.000Z');
});

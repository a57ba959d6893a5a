/** The pure decisions behind status, metrics and alerts: overdue, next run, dedup ratio, intervals. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseInterval } from '../../src/config/alerts.js';
import { dedupRatio } from '../../src/ops/metrics.js';
import { isOverdue, nextSlot } from '../../src/scheduler/slots.js';

const at = (s: string) => new Date(s);
const DAILY = '0 2 * * *';

test('a VM is overdue once a whole slot passed after its newest backup, counted from the policy\'s first sighting', () => {
  const now = at('2026-01-10T03:00:00Z');
  assert.equal(isOverdue(DAILY, now, at('2026-01-09T02:10:00Z'), 'UTC', at('2026-01-01T00:00:00Z')), false, 'last night\'s backup');
  assert.equal(isOverdue(DAILY, now, at('2026-01-08T02:10:00Z'), 'UTC', at('2026-01-01T00:00:00Z')), true, 'last night\'s slot was missed');
  assert.equal(isOverdue(DAILY, at('2026-01-10T02:05:00Z'), at('2026-01-09T02:10:00Z'), 'UTC'), false, 'tonight\'s backup still running');
  assert.equal(isOverdue(DAILY, now, undefined, 'UTC', at('2026-01-10T01:00:00Z')), false, 'a policy an hour old');
  assert.equal(isOverdue(DAILY, now, undefined, 'UTC', at('2026-01-07T00:00:00Z')), true, 'never backed up in three days');
  assert.equal(isOverdue(DAILY, now, at('2025-12-01T00:00:00Z'), 'UTC', at('2026-01-10T01:00:00Z')), false, 'an old backup, a new policy');
  assert.equal(isOverdue(DAILY, now, undefined, 'UTC', undefined), false, 'no backup and no scheduler ever saw the policy');
  assert.equal(isOverdue(DAILY, now, at('2026-01-09T02:10:00Z'), 'Asia/Tokyo', at('2026-01-01T00:00:00Z')), false);
  assert.equal(isOverdue(DAILY, now, at('2026-01-08T16:00:00Z'), 'Asia/Tokyo', at('2026-01-01T00:00:00Z')), true, '02:00 in Tokyo is 17:00 UTC: the slot of 01-09 17:00 UTC came 25 h after');
});

test('next run, dedup ratio and alert intervals', () => {
  assert.deepEqual(nextSlot(DAILY, at('2026-01-10T03:00:00Z'), 'UTC'), at('2026-01-11T02:00:00Z'));
  assert.deepEqual(nextSlot(DAILY, at('2026-01-10T01:00:00Z'), 'Europe/Paris'), at('2026-01-11T01:00:00Z'));
  const s = { bytesRead: 0, bytesUploaded: 0, chunksZero: 5, seconds: 1 };
  assert.equal(dedupRatio({ ...s, chunksNew: 1, chunksReused: 3 }), 0.75);
  assert.equal(dedupRatio({ ...s, chunksNew: 1, chunksReused: 1, chunksUnchanged: 2 }), 0.75);
  assert.equal(dedupRatio({ ...s, chunksNew: 4, chunksReused: 0 }), 0);
  assert.equal(dedupRatio({ ...s, chunksNew: 0, chunksReused: 0 }), 1, 'an all-zero disk uploads nothing');
  assert.equal(parseInterval('500ms'), 500);
  assert.equal(parseInterval('90s'), 90_000);
  assert.equal(parseInterval('5m'), 300_000);
  assert.equal(parseInterval('2h'), 7_200_000);
  for (const bad of ['5', '5 m', '1.5s', '-1s', 's', '1d']) assert.equal(parseInterval(bad), undefined, bad);
});

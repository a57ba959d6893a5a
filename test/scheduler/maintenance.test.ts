/** The maintenance schedule: which job each slot gets (pure), and the scheduler enqueuing them. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CronExpressionParser } from 'cron-parser';
import { Scheduler, type SchedulerLog } from '../../src/scheduler/scheduler.js';
import { maintenanceJob, rotationSlice, type MaintenanceJobRequest } from '../../src/scheduler/maintenance.js';
import { assertJobId } from '../../src/queue/names.js';

const log: SchedulerLog = { info: () => {}, warn: () => {}, error: () => {} };

/** `count` consecutive slots of `schedule` from `from`. */
function slots(schedule: string, from: string, count: number, tz?: string): Date[] {
  const expr = CronExpressionParser.parse(schedule, { currentDate: new Date(from), ...(tz ? { tz } : {}) });
  return Array.from({ length: count }, () => expr.next().toDate());
}

test('rotate N: consecutive slots of a regular schedule read slices 1…N in turn, across a daylight-saving change', () => {
  for (const [schedule, tz, n] of [['0 4 * * *', 'Europe/Paris', 7], ['0 4 * * *', undefined, 5], ['15 * * * *', undefined, 24], ['0 3 * * 0', 'America/New_York', 4]] as const) {
    // Late March: Europe moves its clocks on the last Sunday, America two weeks before.
    const ks = slots(schedule, '2025-03-01T00:00:00Z', 3 * n, tz).map((s) => rotationSlice(schedule, s, n));
    for (let i = 1; i < ks.length; i++) assert.equal(ks[i], (ks[i - 1]! % n) + 1, `${schedule} ${tz}: ${ks.join(',')}`);
    const counts = new Map<number, number>();
    for (const k of ks) counts.set(k, (counts.get(k) ?? 0) + 1);
    assert.deepEqual([...counts.keys()].sort((a, b) => a - b), Array.from({ length: n }, (_, i) => i + 1));
    assert.ok([...counts.values()].every((c) => c === 3));
  }
});

test('a slot\'s job: id from kind and slot, payload from readData', () => {
  const slot = new Date('2025-06-01T04:00:00.250Z');
  const s = (readData: string) => ({ verify: { schedule: '0 4 * * *', readData }, gc: { schedule: '0 5 * * 0' } });
  assert.deepEqual(maintenanceJob('gc', s('none'), slot), { jobId: 'maintenance+gc+1748750400', slot: new Date('2025-06-01T04:00:00Z'), payload: { kind: 'gc', dryRun: false } });
  assert.deepEqual(maintenanceJob('verify', s('none'), slot).payload, { kind: 'verify', readData: false });
  assert.deepEqual(maintenanceJob('verify', s('all'), slot).payload, { kind: 'verify', readData: true });
  assert.deepEqual(maintenanceJob('verify', s('10%'), slot).payload, { kind: 'verify', readData: false, readDataSubset: '10%' });
  const rotating = maintenanceJob('verify', s('rotate 7'), slot);
  assert.deepEqual(rotating.payload, { kind: 'verify', readData: false, readDataSubset: `${rotationSlice('0 4 * * *', slot, 7)}/7` });
  assert.equal(rotating.jobId, 'maintenance+verify+1748750400');
  assertJobId(rotating.jobId);
  const copy = maintenanceJob('copy', { copy: { schedule: '0 6 * * *' } }, slot);
  assert.deepEqual(copy, { jobId: 'maintenance+copy+1748750400', slot: new Date('2025-06-01T04:00:00Z'), payload: { kind: 'copy' } });
  assertJobId(copy.jobId);
});

test('the scheduler enqueues verify and gc on their schedules, under the same ids from two replicas, and stops', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-sched-'));
  const jobs = new Map<string, MaintenanceJobRequest[]>();
  const enqueueMaintenance = async (j: MaintenanceJobRequest) => void jobs.set(j.jobId, [...(jobs.get(j.jobId) ?? []), j]);
  const maintenance = { verify: { schedule: '* * * * * *', readData: 'rotate 3' }, gc: { schedule: '*/2 * * * * *' } };
  const s1 = new Scheduler({ policiesDir: dir, select: () => ({ vms: [], unknown: [] }), enqueueBackup: async () => {}, maintenance, enqueueMaintenance, log });
  const s2 = new Scheduler({ policiesDir: dir, select: () => ({ vms: [], unknown: [] }), enqueueBackup: async () => {}, maintenance, enqueueMaintenance, log });
  let bothFrom = Infinity;
  let bothTo = 0;
  try {
    await s1.start();
    await s2.start();
    bothFrom = Date.now();
    await sleep(3300);
  } finally {
    bothTo = Date.now();
    await s1.stop();
    await s2.stop();
    await rm(dir, { recursive: true, force: true });
  }
  const verifies = [...jobs.values()].filter((r) => r[0]!.payload.kind === 'verify');
  const gcs = [...jobs.values()].filter((r) => r[0]!.payload.kind === 'gc');
  assert.ok(verifies.length >= 3, [...jobs.keys()].join(' '));
  assert.ok(gcs.length >= 1 && gcs.length < verifies.length);
  let bothSaw = 0;
  for (const [id, reqs] of jobs) {
    assert.match(id, /^maintenance\+(verify|gc)\+\d+$/);
    // A slot while both ran (not one that came between the two starts or the two stops).
    const t = reqs[0]!.slot.getTime();
    if (t < bothFrom || t + 500 > bothTo) continue;
    bothSaw++;
    assert.equal(reqs.length, 2, `${id}: one per replica, same id`);
    assert.deepEqual(reqs[0]!.payload, reqs[1]!.payload);
  }
  assert.ok(bothSaw >= 2, `${bothSaw} slot(s) came while both replicas ran`);
  const subsets = verifies.map((r) => r[0]!).sort((a, b) => a.slot.getTime() - b.slot.getTime()).map((j) => j.payload.kind === 'verify' ? j.payload.readDataSubset : '');
  assert.ok(subsets.every((x) => /^[123]\/3$/.test(x ?? '')), subsets.join(','));
  assert.notEqual(subsets[0], subsets[1], 'consecutive runs read different slices');
  const count = jobs.size;
  await sleep(1200);
  assert.equal(jobs.size, count, 'nothing is enqueued after stop');
});

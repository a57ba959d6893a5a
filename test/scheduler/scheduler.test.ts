import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Scheduler, type BackupJobRequest, type SchedulerLog } from '../../src/scheduler/scheduler.js';
import type { Policy } from '../../src/policy/schema.js';

const inventory: Record<string, string> = { a: 'host1', b: 'host2' };
const select = (p: Policy) => {
  const names = p.select.vms ?? [];
  return { vms: names.filter((n) => inventory[n]).map((n) => ({ name: n, host: inventory[n]! })), unknown: names.filter((n) => !inventory[n]) };
};

function recorder() {
  const lines: { level: string; msg: string; obj: object }[] = [];
  const log: SchedulerLog = {
    info: (obj, msg) => lines.push({ level: 'info', msg, obj }),
    warn: (obj, msg) => lines.push({ level: 'warn', msg, obj }),
    error: (obj, msg) => lines.push({ level: 'error', msg, obj }),
  };
  return { lines, log };
}

test('per-second policy: two schedulers enqueue the same job ids; bad files and unknown VMs are reported, the rest runs; edits reload', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-sched-'));
  await writeFile(join(dir, 'every-second.yaml'), 'name: every-second\nschedule: "* * * * * *"\nselect:\n  vms: [a, b, ghost]\nretention:\n  keepLast: 3\n');
  await writeFile(join(dir, 'broken.yaml'), 'name: broken\nschedule: "* * * * * *"\nselect: [\n');
  await writeFile(join(dir, 'badcron.yaml'), 'name: badcron\nschedule: "61 * * * *"\nselect:\n  vms: [a]\nretention:\n  keepLast: 1\n');
  const jobs = new Map<string, BackupJobRequest[]>();
  const enqueueBackup = async (j: BackupJobRequest) => void jobs.set(j.jobId, [...(jobs.get(j.jobId) ?? []), j]);
  const r1 = recorder();
  const r2 = recorder();
  const s1 = new Scheduler({ policiesDir: dir, select, enqueueBackup, log: r1.log });
  const s2 = new Scheduler({ policiesDir: dir, select, enqueueBackup, log: r2.log });
  try {
    await s1.start();
    await s2.start();
    // Slots before this may have fired in the first scheduler while the second was still starting.
    const bothRunning = Date.now();
    assert.deepEqual(s1.scheduled().map((p) => p.name), ['every-second']);
    await sleep(2600);
    const all = [...jobs.values()];
    assert.ok(all.length >= 4, `jobs: ${[...jobs.keys()].join(' ')}`);
    // The newest slot may have fired in one scheduler and not yet in the other: each
    // scheduler's count is checked on the slots at least a second old.
    const settledBefore = Date.now() - 1000;
    const bothShouldHave = (r: BackupJobRequest[]) => r[0]!.slot.getTime() >= bothRunning && r[0]!.slot.getTime() <= settledBefore;
    for (const [id, reqs] of jobs) {
      assert.match(id, /^every-second\+(a|b)\+\d+$/);
      if (bothShouldHave(reqs)) assert.equal(reqs.length, 2, `${id} enqueued by each scheduler under the same id`);
      assert.ok(reqs.length <= 2, `${id} enqueued at most once by each scheduler`);
      assert.equal(reqs[0]!.host, inventory[reqs[0]!.vm]);
    }
    assert.ok(all.filter(bothShouldHave).length >= 2, 'slots old enough to have been enqueued by both');
    const slotsA = all.filter((r) => r[0]!.vm === 'a').map((r) => r[0]!.slot.getTime());
    assert.equal(new Set(slotsA).size, slotsA.length, 'one job per VM per slot');
    assert.ok(r1.lines.some((l) => l.level === 'warn' && /unknown VM or tag "ghost"/.test(l.msg)));
    assert.ok(r1.lines.some((l) => l.level === 'error' && /broken\.yaml:\d+:\d+/.test(l.msg)));
    assert.ok(r1.lines.some((l) => l.level === 'error' && /badcron\.yaml:2:\d+: schedule/.test(l.msg)));

    await writeFile(join(dir, 'badcron.yaml'), 'name: badcron\nschedule: "0 3 * * *"\nselect:\n  vms: [a]\nretention:\n  keepLast: 1\n');
    for (let i = 0; i < 50 && s1.scheduled().length < 2; i++) await sleep(100);
    assert.deepEqual(s1.scheduled().map((p) => p.name).sort(), ['badcron', 'every-second']);
  } finally {
    await s1.stop();
    await s2.stop();
    await rm(dir, { recursive: true, force: true });
  }
  const count = jobs.size;
  await sleep(1200);
  assert.equal(jobs.size, count, 'nothing is enqueued after stop');
});

test('catch-up enqueues a missed slot once, only for VMs whose last backup is more than a period old', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-sched-'));
  await writeFile(join(dir, 'nightly.yaml'), 'name: nightly\nschedule: "30 1 * * *"\nselect:\n  vms: [a, b]\nretention:\n  keepDaily: 7\n');
  const jobs: BackupJobRequest[] = [];
  const last: Record<string, Date | undefined> = { a: new Date(Date.now() - 3 * 86400e3), b: new Date() };
  const s = new Scheduler({
    policiesDir: dir, select, log: recorder().log,
    enqueueBackup: async (j) => void jobs.push(j),
    lastBackup: async (_p, vm) => last[vm],
  });
  try {
    await s.start();
    assert.deepEqual(jobs.map((j) => j.vm), ['a']);
    assert.match(jobs[0]!.jobId, /^nightly\+a\+\d+$/);
  } finally {
    await s.stop();
    await rm(dir, { recursive: true, force: true });
  }
  // With catch-up switched off, nothing is enqueued at start.
  const dir2 = await mkdtemp(join(tmpdir(), 'vmvault-sched-'));
  await writeFile(join(dir2, 'nightly.yaml'), 'name: nightly\nschedule: "30 1 * * *"\nselect:\n  vms: [a]\nretention:\n  keepDaily: 7\n');
  const none: BackupJobRequest[] = [];
  const off = new Scheduler({ policiesDir: dir2, select, log: recorder().log, enqueueBackup: async (j) => void none.push(j), lastBackup: async () => undefined, catchUp: false });
  await off.start();
  await off.stop();
  await rm(dir2, { recursive: true, force: true });
  assert.deepEqual(none, []);
});

test('catch-up at the very first start skips a slot from before the policy was first seen, in Redis', async () => {
  const { startRedis } = await import('../helpers/redis.js');
  const { createRedis, closeRedis } = await import('../../src/queue/connection.js');
  const { policyFirstSeen } = await import('../../src/queue/first-seen.js');
  const redis = await startRedis();
  const conn = createRedis(redis.url, 'producer');
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-sched-'));
  // Every day at 01:30 UTC: the last slot is always in the past, and there is no backup at all.
  await writeFile(join(dir, 'new.yaml'), 'name: new\nschedule: "30 1 * * *"\nselect:\n  vms: [a]\nretention:\n  keepDaily: 7\n');
  const run = async () => {
    const jobs: BackupJobRequest[] = [];
    const s = new Scheduler({
      policiesDir: dir, select, log: recorder().log, enqueueBackup: async (j) => void jobs.push(j),
      lastBackup: async () => undefined, firstSeen: (p) => policyFirstSeen(conn, p),
    });
    await s.start();
    await s.stop();
    return jobs;
  };
  try {
    assert.deepEqual(await run(), [], 'a policy seen for the first time has missed nothing');
    const first = await policyFirstSeen(conn, 'new');
    assert.ok(Date.now() - first.getTime() < 60_000);
    assert.deepEqual((await policyFirstSeen(conn, 'new', new Date(0))).getTime(), first.getTime(), 'the first sighting is kept');
    // Seen three days ago (a scheduler ran then): the last slot is the policy's and was missed.
    await conn.set('vmvault:policy-first-seen:new', String(Date.now() - 3 * 86400e3));
    assert.deepEqual((await run()).map((j) => j.vm), ['a']);
  } finally {
    await closeRedis(conn);
    await redis.stop();
    await rm(dir, { recursive: true, force: true });
  }
});

/**
 * Scheduled restore drills: the policy's `drill:` option (validated), the scheduler's
 * drill jobs (one per VM and slot, on the VM's host queue), and the host agent running
 * them against a real redis-server and real qemu-system-x86_64 (TCG): a bootable
 * backup's drill completes boot-verified, an unbootable one's fails its job at once
 * (not retried) with the reason, and both results are recorded in the repository.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { policySchema, type Policy } from '../../src/policy/schema.js';
import { drillPayloadFor, drillPayloadSchema } from '../../src/queue/payloads.js';
import { enqueueDrill } from '../../src/queue/enqueue.js';
import { verificationStates } from '../../src/repo/health.js';
import { Scheduler, type DrillJobRequest, type SchedulerLog } from '../../src/scheduler/scheduler.js';
import { backupVm } from '../../src/vm/drivers.js';
import { startHostWorker } from '../../workers/host-agent.js';
import { BOOT_MARKER, makeBootImage } from '../helpers/boot-image.js';
import { PASSWORD, queueHarness, silent, uniqueHost, watchQueue } from './setup.js';

const base = { name: 'nightly', schedule: '30 1 * * *', select: { vms: ['a', 'b'] }, retention: { keepDaily: 7 } };
const quiet: SchedulerLog = { info: () => {}, warn: () => {}, error: () => {} };

describe('the policy drill option', () => {
  test('drill: weekly, or { every, one probe, timeout }; anything else is refused with what is expected', () => {
    assert.deepEqual(policySchema.parse({ ...base, drill: 'weekly' }).drill, { every: 'weekly' });
    assert.deepEqual(policySchema.parse({ ...base, drill: { every: 'daily', tcp: 22, timeout: '10min' } }).drill, { every: 'daily', tcp: 22, timeout: '10min' });
    const bad = (drill: unknown) => JSON.stringify(policySchema.safeParse({ ...base, drill }).error?.issues);
    assert.match(bad('hourly'), /expected daily, weekly, monthly/);
    assert.match(bad({ every: 'weekly', tcp: 22, serial: 'login:' }), /give one probe: serial, guestAgent or tcp/);
    assert.match(bad({ every: 'weekly', tcp: 70000 }), /a TCP port is 1-65535/);
    assert.match(bad({ every: 'weekly', timeout: 'soon' }), /duration|soon/);
  });

  test('the scheduler enqueues one drill per selected VM and slot on its host; the payload carries the probe and timeout', async () => {
    const policy: Policy = policySchema.parse({ ...base, drill: { every: 'weekly', serial: 'ready', timeout: '2min' } });
    const got: DrillJobRequest[] = [];
    const s = new Scheduler({
      policiesDir: '/nonexistent', log: quiet,
      select: () => ({ vms: [{ name: 'a', host: 'h1' }, { name: 'b', host: 'h2' }], unknown: [] }),
      enqueueBackup: async () => {}, enqueueDrill: async (j) => void got.push(j),
    });
    const slot = new Date('2026-11-29T04:15:00.400Z');
    await s.fireDrill(policy, slot);
    await s.fireDrill(policy, slot);
    assert.deepEqual(got.map((j) => [j.jobId, j.host, j.vm]), [
      ['nightly+drill+a+1795925700', 'h1', 'a'], ['nightly+drill+b+1795925700', 'h2', 'b'],
      ['nightly+drill+a+1795925700', 'h1', 'a'], ['nightly+drill+b+1795925700', 'h2', 'b'],
    ], 'deterministic ids: a second firing of the slot is the same job');
    assert.deepEqual(drillPayloadSchema.parse(drillPayloadFor('a', policy, slot)), {
      vm: 'a', policy: 'nightly', slot: slot.toISOString(), probe: { kind: 'serial', text: 'ready' }, timeoutSeconds: 120,
    });
    assert.equal(drillPayloadSchema.safeParse({ timeoutSeconds: 5 }).success, false, 'a drill needs a backup or a VM');
  });
});

describe('drill jobs on the host agent', () => {
  const h = queueHarness();

  test('a bootable backup: completed, boot-verified; an unbootable one: failed at once with the reason, boot-failed recorded', async () => {
    const host = uniqueHost('drill');
    const stateDir = join(h.fx.dir, 'state');
    const goodDisk = await makeBootImage(h.fx.dir, 'good.raw');
    const badDisk = await makeBootImage(h.fx.dir, 'bad.raw', { bootable: false });
    const good = (await backupVm(h.fx.repo, { vm: 'good', driver: 'image', disks: [{ path: goodDisk, format: 'raw' }] })).manifest.id;
    const bad = (await backupVm(h.fx.repo, { vm: 'bad', driver: 'image', disks: [{ path: badDisk, format: 'raw' }] })).manifest.id;
    const worker = await startHostWorker({ host, redisUrl: h.redis.url, repoUrl: h.fx.repoUrl, passphrase: PASSWORD, logger: silent, stateDir });
    h.cleanup(() => worker.close());
    const q = await watchQueue(h.redis.url, host);
    h.cleanup(() => q.close());

    const ok = await q.finished(await enqueueDrill(q.queue, { vm: 'good', probe: { kind: 'serial', text: BOOT_MARKER }, timeoutSeconds: 60 }, { jobId: 'drill-good' }));
    assert.equal(await ok.getState(), 'completed', ok.failedReason);
    assert.equal(ok.returnvalue.status, 'boot-verified');
    assert.equal(ok.returnvalue.backup, good);
    assert.ok(existsSync(join(stateDir, 'drills', good, 'screen.ppm')));

    const failed = await q.finished(await enqueueDrill(q.queue, { backupId: bad.slice(0, 12), probe: { kind: 'serial', text: BOOT_MARKER }, timeoutSeconds: 6 }, { jobId: 'drill-bad' }));
    assert.equal(await failed.getState(), 'failed');
    assert.equal(failed.attemptsMade, 1, 'a failed boot is not retried');
    assert.match(failed.failedReason, new RegExp(`the drill of backup ${bad.slice(0, 12)} of bad failed: "${BOOT_MARKER}" did not appear on the serial console within 6 s; recorded as boot-failed; serial log .*serial\\.log, screenshot .*screen\\.ppm`));

    const states = await verificationStates(h.fx.repo);
    assert.equal(states.get(good)?.status, 'boot-verified');
    assert.equal(states.get(bad)?.status, 'boot-failed');
    assert.equal(states.get(bad)?.boot?.host, host);
  });
});

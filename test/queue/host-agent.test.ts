/**
 * The host agent against a real redis-server and a real directory repository:
 * routing by host, permanent failures, deduplication, the per-VM lock, progress.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { startHostWorker, type BackupJobResult, type HostWorker } from '../../workers/host-agent.js';
import { enqueueBackup } from '../../src/queue/enqueue.js';
import { deterministicJobId } from '../../src/queue/names.js';
import { queueHarness, silent, uniqueHost, watchQueue, PASSWORD } from './setup.js';

describe('host agent', () => {
  const h = queueHarness();
  const cleanups = { push: h.cleanup };

  async function worker(host: string, extra: { concurrency?: number; busyRetryMs?: number } = {}): Promise<HostWorker> {
    const w = await startHostWorker({ host, redisUrl: h.redis.url, repoUrl: h.fx.repoUrl, passphrase: PASSWORD, logger: silent, progressIntervalMs: 0, ...extra });
    cleanups.push(() => w.close());
    return w;
  }
  async function watch(host: string) {
    const q = await watchQueue(h.redis.url, host);
    cleanups.push(() => q.close());
    return q;
  }

  test('two workers take only their own host\'s jobs; results are real backups', async () => {
    const [hostA, hostB] = [uniqueHost('a'), uniqueHost('b')];
    const [qa, qb] = await Promise.all([watch(hostA), watch(hostB)]);
    await Promise.all([worker(hostA), worker(hostB)]);
    const jobs = await Promise.all([
      ...['a1', 'a2'].map(async (vm) => ({ host: hostA, vm: `${hostA}-${vm}`, q: qa, job: await enqueueBackup(qa.queue, { vm: `${hostA}-${vm}`, disks: [{ path: await h.fx.image(`${hostA}-${vm}`) }], labels: ['test'] }) })),
      ...['b1', 'b2'].map(async (vm) => ({ host: hostB, vm: `${hostB}-${vm}`, q: qb, job: await enqueueBackup(qb.queue, { vm: `${hostB}-${vm}`, disks: [{ path: await h.fx.image(`${hostB}-${vm}`) }] }) })),
    ]);
    for (const j of jobs) {
      const done = await j.q.finished(j.job);
      assert.equal(done.finishedOn !== undefined && done.failedReason === undefined, true, `job failed: ${done.failedReason}`);
      const r = done.returnvalue as BackupJobResult;
      assert.equal(r.host, j.host);
      assert.equal(r.vm, j.vm);
      assert.match(r.id, /^[0-9a-f]{64}$/);
      assert.equal(done.progress && (done.progress as { phase: string }).phase, 'backup');
    }
    const manifests = await h.fx.repo.manifests();
    for (const j of jobs) {
      const mine = manifests.filter((m) => m.vm === j.vm);
      assert.equal(mine.length, 1);
      assert.equal(mine[0]!.host, j.host, `${j.vm} was backed up by the worker of ${mine[0]!.host}`);
    }
  });

  test('a missing disk fails once, without retries, naming the path', async () => {
    const host = uniqueHost();
    const q = await watch(host);
    await worker(host);
    const missing = `${h.fx.dir}/no-such-disk.qcow2`;
    const job = await enqueueBackup(q.queue, { vm: 'ghost', disks: [{ path: missing }] }, { backoffMs: 10 });
    const done = await q.finished(job);
    assert.equal(await done.getState(), 'failed');
    assert.equal(done.attemptsMade, 1);
    assert.match(done.failedReason, new RegExp(`${missing.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} does not exist`));
  });

  test('an invalid payload or an unknown job fails as unrecoverable', async () => {
    const host = uniqueHost();
    const q = await watch(host);
    await worker(host);
    // Straight to BullMQ, past enqueue's validation: what a buggy or old producer could leave in Redis.
    const bad = await q.queue.add('backup', { vm: 42, disks: 'x' }, { attempts: 5, backoff: { type: 'fixed', delay: 10 } });
    const unknown = await q.queue.add('format-disk', { vm: 'x' }, { attempts: 5, backoff: { type: 'fixed', delay: 10 } });
    const [b, u] = await Promise.all([q.finished(bad), q.finished(unknown)]);
    assert.equal(await b.getState(), 'failed');
    assert.equal(b.attemptsMade, 1);
    assert.match(b.failedReason, /invalid backup job payload: vm: .*; disks: /);
    assert.equal(u.attemptsMade, 1);
    assert.match(u.failedReason, /unknown job "format-disk"/);
  });

  test('the same deterministic id twice makes one job and one backup', async () => {
    const host = uniqueHost();
    const q = await watch(host);
    const vm = `dedup-${host}`;
    const disk = await h.fx.image(vm);
    const jobId = deterministicJobId(['nightly', vm, '2025-01-01T02:00:00.000Z']);
    const payload = { vm, disks: [{ path: disk }], policy: 'nightly', slot: '2025-01-01T02:00:00.000Z' };
    const [j1, j2] = await Promise.all([enqueueBackup(q.queue, payload, { jobId }), enqueueBackup(q.queue, payload, { jobId })]);
    assert.equal(j1.id, jobId);
    assert.equal(j2.id, jobId);
    assert.equal((await q.queue.getJobCounts('waiting')).waiting, 1);
    await worker(host);
    const done = await q.finished(j1);
    assert.equal(await done.getState(), 'completed', done.failedReason);
    // Enqueued again after it ran (a retried enqueue, a second scheduler): still one.
    const j3 = await enqueueBackup(q.queue, payload, { jobId });
    assert.equal(j3.id, jobId);
    const counts = await q.queue.getJobCounts('waiting', 'active', 'delayed', 'completed');
    assert.deepEqual(counts, { waiting: 0, active: 0, delayed: 0, completed: 1 });
    const mine = (await h.fx.repo.manifests()).filter((m) => m.vm === vm);
    assert.equal(mine.length, 1);
    assert.equal(mine[0]!.policy, 'nightly');
  });

  test('two jobs on one VM never run at once, even with concurrency 2', async () => {
    const host = uniqueHost();
    const q = await watch(host);
    const vm = `busy-${host}`;
    const disk = await h.fx.image(vm);
    const other = await h.fx.image(`other-${host}`);
    const jobs = [];
    for (let i = 0; i < 3; i++) jobs.push(await enqueueBackup(q.queue, { vm, disks: [{ path: disk }], labels: [`run-${i}`] }));
    jobs.push(await enqueueBackup(q.queue, { vm: `other-${host}`, disks: [{ path: other }] }));
    await worker(host, { concurrency: 2, busyRetryMs: 50 });
    const done = await Promise.all(jobs.map((j) => q.finished(j)));
    for (const d of done) assert.equal(await d.getState(), 'completed', d.failedReason);
    const spans = done.slice(0, 3).map((d) => d.returnvalue as BackupJobResult).sort((a, b) => a.startedAt - b.startedAt);
    for (let i = 1; i < spans.length; i++) {
      assert.ok(spans[i]!.startedAt >= spans[i - 1]!.finishedAt, `backups of ${vm} overlapped: ${JSON.stringify(spans.map((s) => [s.startedAt, s.finishedAt]))}`);
    }
    // Postponing a busy VM does not spend attempts.
    for (const d of done) assert.equal(d.attemptsMade, 1);
    assert.ok(done.slice(0, 3).some((d) => d.attemptsStarted > 1), 'no job found its VM busy: the test did not exercise the lock');
    assert.equal((await h.fx.repo.manifests()).filter((m) => m.vm === vm).length, 3);
  });
});

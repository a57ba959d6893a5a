/**
 * The maintenance schedule against a real redis-server and a real directory
 * repository: the scheduler enqueues verify runs that read the next slice of the
 * chunks each time, the maintenance worker runs them and records each backup's state.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { startMaintenanceWorker } from '../../workers/maintenance.js';
import { enqueueMaintenance } from '../../src/queue/enqueue.js';
import { backupVm } from '../../src/vm/drivers.js';
import { verificationStates } from '../../src/repo/health.js';
import { Scheduler } from '../../src/scheduler/scheduler.js';
import { VmvaultError } from '../../src/errors.js';
import { queueHarness, silent, watchMaintenance, PASSWORD } from './setup.js';

const h = queueHarness();

test('scheduled verifies rotate through the slices of the chunks and record each backup\'s state; a bad subset is refused at enqueue', async () => {
  const { redis, fx } = h;
  const made = await backupVm(fx.repo, { vm: 'v1', driver: 'image', disks: [{ path: await fx.image('v1', 0x33) }] });
  const mw = await startMaintenanceWorker({ redisUrl: redis.url, repoUrl: fx.repoUrl, passphrase: PASSWORD, policiesDir: fx.dir, logger: silent });
  h.cleanup(() => mw.close());
  const mq = await watchMaintenance(redis.url);
  h.cleanup(() => mq.close());

  await assert.rejects(async () => enqueueMaintenance(mq.queue, { kind: 'verify', readDataSubset: '9/2' }), (e: unknown) => e instanceof VmvaultError && e.code === 'BAD_INPUT' && /readDataSubset/.test(e.message));
  await assert.rejects(async () => enqueueMaintenance(mq.queue, { kind: 'verify', readData: true, readDataSubset: '1/2' }), /readData reads every chunk/);

  const scheduler = new Scheduler({
    policiesDir: fx.dir, select: () => ({ vms: [], unknown: [] }), enqueueBackup: async () => {}, log: silent,
    maintenance: { verify: { schedule: '* * * * * *', readData: 'rotate 2' } },
    enqueueMaintenance: async ({ jobId, payload }) => { await enqueueMaintenance(mq.queue, payload, { jobId }); },
  });
  // Two consecutive slots (a loaded machine's timer may skip one: then the next pair).
  const slotOf = (j: { id?: string }) => Number(/\+(\d+)$/.exec(j.id ?? '')?.[1]);
  const consecutive = async () => {
    const all = (await mq.queue.getCompleted()).sort((a, b) => slotOf(a) - slotOf(b));
    const i = all.findIndex((j, k) => k > 0 && slotOf(j) - slotOf(all[k - 1]!) === 1);
    return i > 0 ? { all, pair: [all[i - 1]!, all[i]!] } : undefined;
  };
  await scheduler.start();
  let found: Awaited<ReturnType<typeof consecutive>>;
  try {
    for (let i = 0; i < 600 && !(found = await consecutive()); i++) await sleep(50);
  } finally {
    await scheduler.stop();
  }
  assert.ok(found, `no two consecutive slots completed; failed: ${(await mq.queue.getFailed()).map((j) => j.failedReason).join('; ')}`);
  const { all: done, pair } = found;
  assert.ok(done.every((j) => /^maintenance\+verify\+\d+$/.test(j.id!) && (j.returnvalue as { recorded: boolean }).recorded));
  assert.ok(done.every((j) => ['1/2', '2/2'].includes((j.returnvalue as { readDataSubset?: string }).readDataSubset!)));
  // Two consecutive slots read the two halves: together every chunk once.
  const subsets = pair.map((j) => (j.returnvalue as { readDataSubset?: string }).readDataSubset);
  assert.notEqual(subsets[0], subsets[1]);
  const read = pair.reduce((n, j) => n + (j.returnvalue as { chunksRead: number }).chunksRead, 0);
  assert.equal(read, made.manifest.disks[0]!.chunks.filter(Boolean).length);
  const state = (await verificationStates(fx.repo)).get(made.manifest.id);
  assert.equal(state?.status, 'ok');
  assert.match(state?.readData ?? '', /^[12]\/2$/);
});

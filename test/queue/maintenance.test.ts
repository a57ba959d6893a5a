/**
 * The maintenance queue against a real redis-server and a real directory
 * repository: a policy's backup enqueues that VM's prune, then gc and verify run as
 * jobs; a damaged chunk fails verify with its name, a damaged manifest fails gc (which
 * deletes nothing); an unknown policy fails at once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startHostWorker } from '../../workers/host-agent.js';
import { startMaintenanceWorker } from '../../workers/maintenance.js';
import { enqueueBackup, enqueueMaintenance } from '../../src/queue/enqueue.js';
import { LocalStorage } from '../../src/storage/local.js';
import { queueHarness, silent, uniqueHost, watchMaintenance, watchQueue, PASSWORD } from './setup.js';

const h = queueHarness();

test('backups under a policy are pruned by maintenance jobs; gc and verify run as jobs and fail clearly', async () => {
  const { redis, fx } = h;
  const cleanups = { push: h.cleanup };
  const policies = join(fx.dir, 'policies');
  await mkdir(policies);
  await writeFile(join(policies, 'keep1.yaml'), 'name: keep1\nschedule: "0 3 * * *"\nselect:\n  vms: [m1]\nretention:\n  keepLast: 1\n');
  const host = uniqueHost('m');
  const hw = await startHostWorker({ host, redisUrl: redis.url, repoUrl: fx.repoUrl, passphrase: PASSWORD, logger: silent, progressIntervalMs: 0 });
  cleanups.push(() => hw.close());
  const mw = await startMaintenanceWorker({ redisUrl: redis.url, repoUrl: fx.repoUrl, passphrase: PASSWORD, policiesDir: policies, logger: silent });
  cleanups.push(() => mw.close());
  const hq = await watchQueue(redis.url, host);
  cleanups.push(() => hq.close());
  const mq = await watchMaintenance(redis.url);
  cleanups.push(() => mq.close());

  for (const pattern of [0x11, 0x22]) {
    // One disk, named alike in both backups: prune keeps the last backup of each disk name.
    const job = await enqueueBackup(hq.queue, { vm: 'm1', disks: [{ path: await fx.image(`m1-${pattern}`, pattern), name: 'root' }], policy: 'keep1' });
    const done = await hq.finished(job);
    assert.equal(done.failedReason, undefined);
  }
  // Each backup enqueued a prune of m1; wait for both to complete.
  for (let i = 0; i < 200 && (await mq.queue.getCompletedCount()) < 2; i++) await sleep(50);
  const prunes = await mq.queue.getCompleted();
  assert.equal(prunes.length, 2, `failed: ${(await mq.queue.getFailed()).map((j) => j.failedReason).join('; ')}`);
  assert.ok(prunes.every((j) => j.name === 'prune'));
  const left = await fx.repo.manifests();
  assert.deepEqual(left.map((m) => m.disks[0]!.sourcePath.endsWith('m1-34.qcow2')), [true], 'only the newest backup is kept');

  const gc = await mq.finished(await enqueueMaintenance(mq.queue, { kind: 'gc' }));
  assert.equal(gc.failedReason, undefined);
  assert.equal((gc.returnvalue as { chunksDeleted: number }).chunksDeleted, 1);
  const ok = await mq.finished(await enqueueMaintenance(mq.queue, { kind: 'verify', readData: true }));
  assert.equal((ok.returnvalue as { ok: boolean }).ok, true);

  const storage = new LocalStorage(fx.repoUrl);
  let chunk: string | undefined;
  for await (const o of storage.list('chunks/')) chunk ??= o.name;
  const bytes = Buffer.from(await storage.get(chunk!));
  bytes[bytes.length - 1]! ^= 1;
  await storage.put(chunk!, bytes);
  const bad = await mq.finished(await enqueueMaintenance(mq.queue, { kind: 'verify', readData: true }));
  assert.equal(bad.attemptsMade, 1);
  assert.match(bad.failedReason ?? '', new RegExp(`verify found 1 problem.*${chunk}`));

  // A damaged manifest: gc deletes nothing, and its job says so instead of looking done.
  let manifest: string | undefined;
  for await (const o of storage.list('backups/')) manifest ??= o.name;
  const sealed = Buffer.from(await storage.get(manifest!));
  sealed[sealed.length - 1]! ^= 1;
  await storage.put(manifest!, sealed);
  const blocked = await mq.finished(await enqueueMaintenance(mq.queue, { kind: 'gc' }));
  assert.equal(blocked.attemptsMade, 1);
  assert.match(blocked.failedReason ?? '', /gc deleted no chunk: 1 backup manifest\(s\) cannot be read/);

  const unknown = await mq.finished(await enqueueMaintenance(mq.queue, { kind: 'prune', policy: 'nope' }));
  assert.equal(unknown.attemptsMade, 1);
  assert.match(unknown.failedReason ?? '', /policy "nope" is not among the valid policies/);

  // A copy job on a worker whose configuration has no maintenance.copy.to: failed at once, saying so.
  const nowhere = await mq.finished(await enqueueMaintenance(mq.queue, { kind: 'copy' }));
  assert.equal(nowhere.attemptsMade, 1);
  assert.match(nowhere.failedReason ?? '', /a copy job reached a worker whose configuration has no maintenance\.copy\.to/);
});

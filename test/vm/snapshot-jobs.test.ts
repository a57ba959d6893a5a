/**
 * Snapshots as host-queue jobs (what the API builds on) and the service's expiry
 * sweep, on a real redis-server, a real repository and real qcow2 images.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { parseConfig } from '../../src/config/load.js';
import { snapshotList } from '../../src/disk/qemu.js';
import { enqueueSnapshot } from '../../src/queue/enqueue.js';
import { parseHostJob, snapshotPayloadFor } from '../../src/queue/payloads.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { tryAcquireVmLock } from '../../src/queue/vm-lock.js';
import { runWorker } from '../../src/service/service.js';
import { startSnapshotSweep } from '../../src/service/snapshot-sweep.js';
import { createSnapshot, snapshotTargetOf } from '../../src/vm/snapshots.js';
import { startHostWorker } from '../../workers/host-agent.js';
import type { SnapshotJobResult } from '../../workers/snapshot-job.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { verifyPatterns, writePattern } from '../helpers/images.js';
import { queueHarness, silent, uniqueHost, watchQueue, PASSWORD } from '../queue/setup.js';

describe('snapshot jobs and the expiry sweep', () => {
  const h = queueHarness();

  async function inventory(host: string) {
    const a = await h.fx.image(`${host}-a`, 0x5a);
    const b = await h.fx.image(`${host}-b`, 0x5b);
    const yaml = `host: ${host}\nstateDir: ${join(h.fx.dir, host, 'state')}\nvms:\n  - { name: web, disks: [{ path: ${a} }, { path: ${b} }] }\n`;
    const config = parseConfig(yaml, join(h.fx.dir, `${host}.yaml`));
    return { a, b, config, vm: config.vms[0]! };
  }

  test('create (with export), list, revert and delete run on the host\'s worker', async () => {
    const host = uniqueHost('snap');
    const { a, b, config, vm } = await inventory(host);
    const q = await watchQueue(h.redis.url, host);
    h.cleanup(() => q.close());
    const w = await startHostWorker({ host, redisUrl: h.redis.url, repoUrl: h.fx.repoUrl, passphrase: PASSWORD, logger: silent, stateDir: config.stateDir });
    h.cleanup(() => w.close());
    const run = async (req: Parameters<typeof snapshotPayloadFor>[1]) => {
      const done = await q.finished(await enqueueSnapshot(q.queue, snapshotPayloadFor(vm, req)));
      return { state: await done.getState(), result: done.returnvalue as SnapshotJobResult, failedReason: done.failedReason, attempts: done.attemptsMade };
    };

    const created = await run({ op: 'create', name: 'pre', label: 'pre-update', expireIn: '2d', export: true });
    assert.equal(created.state, 'completed', created.failedReason);
    assert.equal(created.result.op, 'create');
    const snap = created.result.op === 'create' ? created.result.snapshot : undefined;
    assert.deepEqual([snap?.name, snap?.label, snap?.disks], ['pre', 'pre-update', [`${host}-a`, `${host}-b`]]);
    const manifest = (await h.fx.repo.manifests()).find((m) => m.id === snap?.backup);
    assert.ok(manifest, 'the export is a backup in the worker\'s repository');
    assert.deepEqual([manifest.vm, manifest.host, manifest.labels], ['web', host, ['pre-update']]);

    const dup = await run({ op: 'create', name: 'pre' });
    assert.equal(dup.state, 'failed');
    assert.equal(dup.attempts, 1, 'a duplicate name fails once, without retries');
    assert.match(dup.failedReason, /already has a snapshot "pre"/);

    await writePattern(a, 'qcow2', 0, 64 * 1024, 0xee);
    await writePattern(b, 'qcow2', 0, 64 * 1024, 0xef);
    const reverted = await run({ op: 'revert', name: 'pre' });
    assert.equal(reverted.state, 'completed', reverted.failedReason);
    await verifyPatterns(a, 'qcow2', [{ offset: 0, length: 256 * 1024, pattern: 0x5a }]);
    await verifyPatterns(b, 'qcow2', [{ offset: 0, length: 256 * 1024, pattern: 0x5b }]);

    const listed = await run({ op: 'list' });
    assert.equal(listed.result.op === 'list' && listed.result.snapshots.map((s) => [s.name, s.backup]).join(), ['pre', snap?.backup].join());
    const deleted = await run({ op: 'delete', name: 'pre' });
    assert.equal(deleted.state, 'completed', deleted.failedReason);
    assert.deepEqual(await snapshotList(a), []);
  });

  test('snapshot payloads are checked when enqueued and when taken', async () => {
    const { vm } = await inventory(uniqueHost('p'));
    assert.throws(() => parseHostJob('snapshot', { ...snapshotPayloadFor(vm, { op: 'revert' }) }), /name: a snapshot name is needed to revert/);
    assert.throws(() => parseHostJob('snapshot', { ...snapshotPayloadFor(vm, { op: 'list', label: 'x' }) }), /apply to create only/);
    assert.throws(() => parseHostJob('snapshot', { ...snapshotPayloadFor(vm, { op: 'list' }), op: 'rollback' }), /op: /);
    const ok = parseHostJob('snapshot', snapshotPayloadFor(vm, { op: 'create', name: 'x' }));
    assert.equal(ok.name, 'snapshot');
    const q = await watchQueue(h.redis.url, uniqueHost('p'));
    h.cleanup(() => q.close());
    assert.throws(() => enqueueSnapshot(q.queue, { ...snapshotPayloadFor(vm, { op: 'delete' }) }), /invalid snapshot request: name: /);
  });

  test('the sweep deletes expired snapshots, keeps the others, and leaves a busy VM for the next run', async () => {
    const host = uniqueHost('sweep');
    const { a, config, vm } = await inventory(host);
    const target = snapshotTargetOf(vm);
    const t0 = new Date('2026-03-01T00:00:00Z');
    await createSnapshot(target, { name: 'old', expireIn: '1h' }, { stateDir: config.stateDir, now: () => t0 });
    await createSnapshot(target, { name: 'young', expireIn: '1y' }, { stateDir: config.stateDir, now: () => t0 });
    const now = () => new Date('2026-03-02T00:00:00Z');

    // A backup holds the VM: the sweep leaves it alone.
    const redis = createRedis(h.redis.url, 'producer');
    h.cleanup(() => closeRedis(redis));
    const lock = await tryAcquireVmLock(redis, 'web', { holder: 'test/backup' });
    assert.ok(lock);
    const sweep = startSnapshotSweep(config, host, { redisUrl: h.redis.url, logger: silent, intervalMs: 3_600_000, now });
    try {
      const busy = await sweep.runNow();
      assert.deepEqual([busy.deleted, busy.busy], [[], ['web']]);
      assert.deepEqual((await snapshotList(a)).map((s) => s.name).sort(), ['old', 'young']);
      await lock.release();
      const r = await sweep.runNow();
      assert.deepEqual(r.deleted.map((s) => s.name), ['old']);
      assert.deepEqual((await snapshotList(a)).map((s) => s.name), ['young']);
    } finally {
      await sweep.stop();
    }
  });

  test('the worker service sweeps at start and then periodically', async () => {
    const host = uniqueHost('svc');
    const { a, config, vm } = await inventory(host);
    const target = snapshotTargetOf(vm);
    const past = new Date(Date.now() - 3 * 3600_000);
    await createSnapshot(target, { name: 'stale', expireIn: '1h' }, { stateDir: config.stateDir, now: () => past });
    await createSnapshot(target, { name: 'kept', expireIn: '1d' }, { stateDir: config.stateDir });
    const service = await runWorker(config, {
      logger: silent, redisUrl: h.redis.url, repository: { url: h.fx.repoUrl, passphrase: PASSWORD },
      env: { VMVAULT_SNAPSHOT_SWEEP_MS: '200' },
    });
    try {
      // The sweep's qemu-img may hold the image for a moment: then look again.
      const names = async () => (await snapshotList(a).catch(() => [{ name: '(busy)' }])).map((s) => s.name).sort().join(',');
      const until = async (want: string) => {
        const deadline = Date.now() + 15_000;
        while ((await names()) !== want && Date.now() < deadline) await sleep(50);
        assert.equal(await names(), want);
      };
      await until('kept');
      // Expired while the worker runs: the next periodic sweep takes it.
      await createSnapshot(target, { name: 'later', expireIn: '1h' }, { stateDir: config.stateDir, now: () => past });
      await until('kept');
    } finally {
      await service.stop();
    }
  });
});

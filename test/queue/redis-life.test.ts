/**
 * Redis as it really runs: a worker refuses an evicting Redis, and queued work
 * survives a Redis restart (AOF) while workers reconnect.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startRedis } from '../helpers/redis.js';
import { startHostWorker, type BackupJobResult } from '../../workers/host-agent.js';
import { enqueueBackup } from '../../src/queue/enqueue.js';
import { createRedis, closeRedis, checkNoEviction } from '../../src/queue/connection.js';
import { fixture, silent, uniqueHost, watchQueue, PASSWORD } from './setup.js';

test('a worker refuses to start when Redis may evict keys', async () => {
  const redis = await startRedis({ maxmemoryPolicy: 'allkeys-lru' });
  const fx = await fixture();
  try {
    await assert.rejects(
      startHostWorker({ host: uniqueHost(), redisUrl: redis.url, repoUrl: fx.repoUrl, passphrase: PASSWORD, logger: silent }),
      (err: Error & { code?: string }) => {
        assert.equal(err.code, 'BAD_INPUT');
        assert.match(err.message, /maxmemory-policy allkeys-lru/);
        assert.match(err.message, /noeviction/);
        return true;
      },
    );
    const conn = createRedis(redis.url, 'producer');
    await assert.rejects(checkNoEviction(conn), /allkeys-lru/);
    await conn.config('SET', 'maxmemory-policy', 'noeviction');
    await checkNoEviction(conn);
    await closeRedis(conn);
  } finally {
    await redis.stop();
    await fx.cleanup();
  }
});

test('restarting Redis, idle and while a job waits, loses nothing and the worker reconnects', async () => {
  const redis = await startRedis();
  const fx = await fixture();
  const host = uniqueHost();
  const q = await watchQueue(redis.url, host);
  const worker = await startHostWorker({ host, redisUrl: redis.url, repoUrl: fx.repoUrl, passphrase: PASSWORD, logger: silent });
  try {
    await redis.restart(); // idle
    // Paused (state kept in Redis), so the job waits across the restart instead of being taken at once.
    await q.queue.pause();
    const vm = `survivor-${host}`;
    const job = await enqueueBackup(q.queue, { vm, disks: [{ path: await fx.image(vm) }] }, { jobId: `keep-${host}` });
    await redis.restart(); // with a job waiting
    assert.equal(await q.queue.getWaitingCount(), 1, 'the waiting job did not survive the restart');
    await q.queue.resume();
    const done = await q.finished(job);
    assert.equal(await done.getState(), 'completed', done.failedReason);
    assert.equal((done.returnvalue as BackupJobResult).vm, vm);
    assert.deepEqual((await fx.repo.manifests()).map((m) => m.vm), [vm]);
  } finally {
    await worker.close();
    await q.close();
    await redis.stop();
    await fx.cleanup();
  }
});

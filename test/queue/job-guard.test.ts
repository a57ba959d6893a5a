/**
 * A worker that has lost its job lock never commits: the guarded repository checks
 * ownership of the BullMQ job (and of the VM lock) right before the manifest write.
 * A restore through it stops at its next chunk read once the job is aborted (cancelled,
 * lost, shutting down). Real Redis, real BullMQ lock, real backup and restore pipeline.
 */
import { after, before, test } from 'node:test';
import { existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { Queue, Worker, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { tryAcquireVmLock } from '../../src/queue/vm-lock.js';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { JobAbortedError, JobGuard } from '../../workers/job-guard.js';
import { fixture, uniqueHost, type Fixture } from './setup.js';

let redis: TestRedis;
let conn: Redis;
let fx: Fixture;
before(async () => {
  redis = await startRedis();
  conn = createRedis(redis.url, 'worker');
  fx = await fixture();
});
after(async () => {
  await closeRedis(conn);
  await redis.stop();
  await fx.cleanup();
});

/** A job taken by hand (no processor), so the test holds its lock token. */
async function takeJob(name: string): Promise<{ queue: Queue; worker: Worker; job: Job; token: string }> {
  const queue = new Queue(name, { connection: conn });
  await queue.add('backup', {});
  const worker = new Worker(name, null, { connection: conn, autorun: false, lockDuration: 30_000 });
  const token = `test-${name}`;
  const job = (await worker.getNextJob(token)) as Job;
  assert.ok(job);
  return { queue, worker, job, token };
}

for (const lose of ['nothing', 'the job lock', 'the VM lock'] as const) {
  test(`losing ${lose} before the commit ${lose === 'nothing' ? 'lets it commit' : 'means no backup'}`, async () => {
    const name = uniqueHost('guard');
    const vm = `vm-${name}`;
    const { queue, worker, job, token } = await takeJob(name);
    const lock = await tryAcquireVmLock(conn, vm, { ttlMs: 10_000 });
    assert.ok(lock);
    try {
      const guard = new JobGuard(job, token, lock, 30_000);
      let committed = 0;
      const repo = guard.wrap(fx.repo, async () => { committed++; });
      // Lost while the backup runs (expired, or taken by another worker): the guard must notice at the commit.
      if (lose === 'the job lock') await conn.del(`bull:${name}:${job.id}:lock`);
      if (lose === 'the VM lock') await conn.set(`vmvault:vm-lock:${vm}`, 'someone-else');
      const count0 = (await fx.repo.backupIds()).length;
      const run = backupVm(repo, { vm, driver: 'image', disks: [{ path: await fx.image(vm), format: 'qcow2' }] });
      if (lose === 'nothing') {
        const { manifest } = await run;
        assert.equal((await fx.repo.backupIds()).includes(manifest.id), true);
        assert.equal(committed, 1);
      } else {
        await assert.rejects(run, (err: Error) => err instanceof JobAbortedError && /stopped before commit/.test(err.message));
        assert.equal((await fx.repo.backupIds()).length, count0, 'a backup was committed without owning its job');
      }
    } finally {
      await lock.release();
      await worker.close();
      await queue.obliterate({ force: true });
      await queue.close();
    }
  });
}

test('a restore through a guarded repository stops at its next chunk once the job is aborted, and leaves nothing', async () => {
  const name = uniqueHost('guard-restore');
  const vm = `vm-${name}`;
  const made = await backupVm(fx.repo, { vm, driver: 'image', disks: [{ path: await fx.image(vm), format: 'qcow2' }] });
  const { queue, worker, job, token } = await takeJob(name);
  const lock = await tryAcquireVmLock(conn, vm, { ttlMs: 10_000 });
  assert.ok(lock);
  try {
    const guard = new JobGuard(job, token, lock, 30_000);
    const repo = guard.wrap(fx.repo, async () => {});
    // Not aborted: the guarded repository restores as the plain one does.
    const ok = await restore(repo, { backupId: made.manifest.id, to: join(fx.dir, `${name}-ok`), format: 'qcow2' });
    assert.equal(ok.stats.chunksWritten, 1);
    guard.abort({ kind: 'cancelled', message: 'cancelled by the test' });
    const to = join(fx.dir, `${name}-cancelled`);
    await assert.rejects(restore(repo, { backupId: made.manifest.id, to, format: 'raw' }), (err: Error) => err instanceof JobAbortedError && /cancelled by the test/.test(err.message));
    assert.deepEqual(existsSync(to) ? await readdir(to) : [], [], 'nothing left behind');
  } finally {
    await lock.release();
    await worker.close();
    await queue.obliterate({ force: true });
    await queue.close();
  }
});

/**
 * A worker that shuts down while a backup job uploads to S3 over a slow link hands the
 * job back at once: the chunk uploads in flight are cut (the job's abort signal reaches
 * the pipeline), not waited for. A proxy in front of the S3 test server holds every chunk
 * PUT for a minute; the worker (closeTimeoutMs 300) is closed once uploads are under way.
 * It must close within seconds, commit nothing, and leave the job waiting for another
 * worker, which then completes it: the backup restores identical.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compareImages } from '../../src/disk/qemu.js';
import { enqueueBackup } from '../../src/queue/enqueue.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { openStorage } from '../../src/storage/open.js';
import { startHostWorker, type BackupJobResult } from '../../workers/host-agent.js';
import { makeImage } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startS3Server, type S3Server } from '../helpers/s3.js';
import { startS3Proxy, type ProxiedRequest } from '../helpers/s3-proxy.js';
import { PASSWORD, silent, uniqueHost, watchQueue } from './setup.js';

const KiB = 1024;
const CHUNK = 256 * KiB;
const CHUNKS = 24;
const HELD_MS = 60_000;

let s3: S3Server;
let redis: TestRedis;
let work: string;
before(async () => {
  [s3, redis] = await Promise.all([startS3Server(), startRedis()]);
  work = await mkdtemp(join(tmpdir(), 'vmvault-worker-shutdown-'));
});
after(async () => {
  await s3?.stop();
  await redis?.stop();
  await rm(work, { recursive: true, force: true });
});

const isChunkPut = (r: ProxiedRequest) => r.method === 'PUT' && r.path.includes('/chunks/');

test('a worker shutting down during a backup to S3 cuts its chunk uploads, hands the job back, and another worker completes it', async () => {
  const proxy = await startS3Proxy(s3.endpoint);
  const host = uniqueHost('shutdown');
  const q = await watchQueue(redis.url, host);
  try {
    const repoUrl = proxy.via(s3.repoUrl('worker-shutdown'));
    const init = await Repository.init(openStorage(repoUrl), PASSWORD, { kdf: 'weak', chunkSize: CHUNK });
    await init.storage.close();
    const src = await makeImage(work, 'slow.qcow2', 'qcow2', CHUNKS * CHUNK,
      Array.from({ length: CHUNKS }, (_, i) => ({ offset: i * CHUNK, length: CHUNK, pattern: i + 1 })));

    proxy.delayFor = (method, path) => (method === 'PUT' && path.includes('/chunks/') ? HELD_MS : 0);
    const first = await startHostWorker({ host, redisUrl: redis.url, repoUrl, passphrase: PASSWORD, logger: silent, progressIntervalMs: 0, closeTimeoutMs: 300 });
    const job = await enqueueBackup(q.queue, { vm: 'slow', disks: [{ path: src, format: 'qcow2' }] });
    await waitFor('chunk uploads to be under way', () => proxy.log.filter(isChunkPut).length >= 2, 60_000).catch(async (err: unknown) => {
      await first.close(); // not left running past the test
      throw err;
    });
    const at = Date.now();
    await first.close();
    const took = Date.now() - at;
    const held = proxy.log.filter(isChunkPut);
    console.log(`# worker shutdown: closed ${took} ms after close(), ${held.length} chunk upload(s) were held`);
    assert.ok(took < 15_000, `the worker took ${took} ms to close (chunk uploads are held ${HELD_MS} ms)`);
    await waitFor('the held uploads to be closed by the client', () => held.every((h) => h.end !== undefined && h.end - h.start < HELD_MS / 2), 5000);
    assert.ok(held.every((h) => h.status === undefined), 'no held upload was answered');
    const state = await job.getState();
    assert.ok(state === 'delayed' || state === 'waiting', `the job is handed back, not ${state}`);
    const storage = openStorage(repoUrl);
    try {
      for await (const o of storage.list('backups/')) assert.fail(`committed ${o.name}`);
    } finally {
      await storage.close();
    }

    proxy.delayFor = undefined;
    const second = await startHostWorker({ host, redisUrl: redis.url, repoUrl, passphrase: PASSWORD, logger: silent, progressIntervalMs: 0 });
    try {
      const done = await q.finished(job);
      assert.equal(done.failedReason, undefined, done.failedReason);
      const r = done.returnvalue as BackupJobResult;
      const repo = await Repository.open(openStorage(repoUrl), PASSWORD);
      try {
        const out = await restore(repo, { backupId: r.id, to: join(work, 'out'), format: 'qcow2' });
        const cmp = await compareImages(src, out.files[0]!.path, 'qcow2', 'qcow2');
        assert.ok(cmp.identical, cmp.output);
      } finally {
        await repo.storage.close();
      }
    } finally {
      await second.close();
    }
  } finally {
    await q.close();
    await proxy.down();
  }
});

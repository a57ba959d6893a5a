/**
 * Redis that survives a machine: the service configured with Redis Sentinel (a primary,
 * a replica, one Sentinel, all real redis-server processes), a real `vmvault worker`
 * process running a backup, and the primary killed (SIGKILL, as when its machine is
 * lost) in the middle of that backup. The Sentinel promotes the replica; the worker finds
 * it through the Sentinel and carries on: the job completes once, the backup exists once
 * in the repository and restores identical.
 *
 * The backup is made slow on purpose, without depending on the machine's speed: its
 * repository is on the S3 test server behind a proxy that holds every upload 400 ms.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Job } from 'bullmq';
import { compareImages } from '../../src/disk/qemu.js';
import { closeRedis, createConnection } from '../../src/queue/connection.js';
import { enqueueBackup, hostQueue } from '../../src/queue/enqueue.js';
import { Repository } from '../../src/repo/repository.js';
import { openStorage } from '../../src/storage/open.js';
import { cliJson } from '../helpers/cli.js';
import { makeImage } from '../helpers/images.js';
import { start, stopProc, waitFor } from '../helpers/procs.js';
import { startS3Server, type S3Server } from '../helpers/s3.js';
import { startS3Proxy, type S3Proxy } from '../helpers/s3-proxy.js';
import { startSentinelSetup, type SentinelSetup } from '../helpers/redis-sentinel.js';

const PASSWORD = 'sentinel test passphrase';
const KiB = 1024;
const CHUNK = 256 * KiB;
const CHUNKS = 96;

let s3: S3Server;
let proxy: S3Proxy;
let sentinel: SentinelSetup;
let work: string;
before(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmvault-sentinel-test-'));
  s3 = await startS3Server();
  proxy = await startS3Proxy(s3.endpoint);
  sentinel = await startSentinelSetup();
});
after(async () => {
  await sentinel?.stop();
  await proxy?.down();
  await s3?.stop();
  await rm(work, { recursive: true, force: true });
});

test('the primary Redis is lost during a backup: the Sentinel fails over, the job completes once and restores identical', async () => {
  const repoUrl = proxy.via(s3.repoUrl('sentinel'));
  const repo = await Repository.init(openStorage(repoUrl), PASSWORD, { kdf: 'weak', chunkSize: CHUNK });
  const src = await makeImage(work, 'web.qcow2', 'qcow2', CHUNKS * CHUNK,
    Array.from({ length: CHUNKS }, (_, i) => ({ offset: i * CHUNK, length: CHUNK, pattern: i + 1 })));
  const passFile = join(work, 'password');
  await writeFile(passFile, `${PASSWORD}\n`, { mode: 0o600 });
  await mkdir(join(work, 'policies'));
  const configFile = join(work, 'vmvault.yaml');
  await writeFile(configFile, [
    `repository: { url: ${JSON.stringify(repoUrl)}, passwordFile: ${JSON.stringify(passFile)} }`,
    `redis: ${sentinel.yaml}`,
    'host: hosts',
    `policiesDir: ${JSON.stringify(join(work, 'policies'))}`,
    `stateDir: ${JSON.stringify(join(work, 'state'))}`,
    'vms:',
    `  - { name: web, disks: [{ path: ${JSON.stringify(src)}, format: qcow2 }] }`,
    '',
  ].join('\n'));
  // A short stalled-job check, so that a job wrongly given up for lost would run again within the test.
  const worker = start(['worker', '--host', 'hosts'], {
    ...s3.env, VMVAULT_CONFIG: configFile, VMVAULT_JOB_LOCK_MS: '10000', VMVAULT_STALLED_INTERVAL_MS: '3000',
  });
  const producer = createConnection(sentinel.url, 'producer');
  producer.on('error', () => {});
  const queue = hostQueue(producer, 'hosts');
  queue.on('error', () => {}); // the failover's connection errors, expected here
  try {
    await waitFor('the worker', () => /worker started/.test(worker.output()), 30_000, worker.output);
    const firstPrimary = await sentinel.currentPrimary();
    assert.equal(firstPrimary, sentinel.ports.primary);

    proxy.putDelayMs = 400;
    let chunkPuts = 0;
    proxy.onRequest = (method, path) => { if (method === 'PUT' && path.includes('/chunks/')) chunkPuts++; };
    const job = await enqueueBackup(queue, { vm: 'web', disks: [{ path: src, format: 'qcow2' }] }, { jobId: 'web-failover' });
    await waitFor('the backup to upload', () => chunkPuts >= 10, 60_000, worker.output);
    const killedAt = Date.now();
    const killed = await sentinel.killPrimary();
    const uploadedBefore = chunkPuts;
    await waitFor('the Sentinel to promote the replica', async () => (await sentinel.currentPrimary().catch(() => killed)) !== killed, 30_000, sentinel.output);
    const promotedAfterMs = Date.now() - killedAt;

    let finished: Job | undefined;
    await waitFor('the job to finish', async () => {
      const j = await Job.fromId(queue, job.id!).catch(() => undefined);
      const state = await j?.getState().catch(() => undefined);
      // Read again once finished: the copy read before the state may predate the result.
      if (state === 'completed' || state === 'failed') finished = await Job.fromId(queue, job.id!).catch(() => undefined);
      return finished !== undefined;
    }, 120_000, worker.output, 250);
    assert.equal(await finished!.getState(), 'completed', `${finished!.failedReason}\n${worker.output()}`);
    assert.ok(finished!.finishedOn! > killedAt, 'the job finished after the primary was lost');
    assert.ok(uploadedBefore < CHUNKS, 'the primary was lost while chunks were still to upload');
    // Give a wrongly stalled copy of the job time to run (stalled check every 3 s).
    await new Promise((r) => setTimeout(r, 7000));
    const manifests = (await repo.manifests()).filter((m) => m.vm === 'web');
    assert.equal(manifests.length, 1, `the backup exists exactly once: ${manifests.map((m) => m.id).join(', ')}`);
    assert.equal(finished!.attemptsMade, 1, 'one run');
    assert.match(worker.output(), /redis connection error/, 'the worker lost its connection to the primary (and found the new one)');
    console.log(`# sentinel: primary :${killed} killed after ${uploadedBefore}/${CHUNKS} chunk uploads; replica :${await sentinel.currentPrimary()} promoted `
      + `${(promotedAfterMs / 1000).toFixed(1)} s later; job completed ${((finished!.finishedOn! - killedAt) / 1000).toFixed(1)} s after the loss, attempts ${finished!.attemptsMade}, backups 1`);

    proxy.putDelayMs = 0;
    const out = join(work, 'out');
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, ...s3.env, VMVAULT_REPOSITORY: repoUrl, VMVAULT_PASSWORD: PASSWORD };
    const restored = await cliJson(['restore', manifests[0]!.id, '--to', out], env);
    const disk = restored.files.find((f: { kind: string }) => f.kind === 'disk');
    assert.equal((await compareImages(src, disk.path, 'qcow2', 'qcow2')).identical, true);
  } finally {
    await stopProc(worker).catch(() => {});
    await queue.close().catch(() => {});
    await closeRedis(producer);
    await repo.storage.close();
  }
});

/**
 * Redis Cluster: a real redis-server in cluster mode (one node holding all 16384 slots,
 * the smallest real cluster; it refuses a script whose keys are in different slots just
 * as a larger one does). BullMQ with its default prefix fails there (CROSSSLOT); the
 * service's connections from a redis-cluster:// URL use the `{vmvault}` hash-tag prefix,
 * and a host worker runs a backup job to completion on it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Job, Queue } from 'bullmq';
import { Cluster, Redis } from 'ioredis';
import { closeRedis, createConnection } from '../../src/queue/connection.js';
import { enqueueBackup, hostQueue } from '../../src/queue/enqueue.js';
import { startHostWorker, type BackupJobResult } from '../../workers/host-agent.js';
import { freePort } from '../helpers/ports.js';
import { waitFor } from '../helpers/procs.js';
import { fixture, silent, uniqueHost, PASSWORD, type Fixture } from './setup.js';

let dir: string;
let port: number;
let server: ChildProcess;
let log = '';
let fx: Fixture;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmvault-cluster-'));
  port = await freePort();
  server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--cluster-enabled', 'yes',
    '--cluster-config-file', join(dir, 'nodes.conf'), '--cluster-announce-ip', '127.0.0.1', '--appendonly', 'yes', '--save', '', '--maxmemory-policy', 'noeviction', '--loglevel', 'warning'],
  { stdio: ['ignore', 'pipe', 'pipe'] });
  server.stdout?.on('data', (d: Buffer) => { log += d.toString(); });
  server.stderr?.on('data', (d: Buffer) => { log += d.toString(); });
  const admin = new Redis({ port, host: '127.0.0.1', maxRetriesPerRequest: 1, retryStrategy: (n) => (n > 50 ? null : 100) });
  admin.on('error', () => {});
  try {
    await waitFor('redis-server to answer', async () => (await admin.ping().catch(() => '')) === 'PONG', 10_000, () => log);
    await admin.call('CLUSTER', 'ADDSLOTSRANGE', '0', '16383');
    await waitFor('the cluster to be ok', async () => /cluster_state:ok/.test(String(await admin.call('CLUSTER', 'INFO'))), 20_000, () => log);
  } finally {
    admin.disconnect();
  }
  fx = await fixture();
});
after(async () => {
  if (server && server.exitCode === null) {
    const exited = once(server, 'exit');
    server.kill('SIGKILL');
    await exited;
  }
  await rm(dir, { recursive: true, force: true });
  await fx?.cleanup();
});

test("BullMQ's default prefix fails on a cluster (CROSSSLOT); the service's prefix works", async () => {
  const raw = new Cluster([{ host: '127.0.0.1', port }], { redisOptions: { maxRetriesPerRequest: 1 } });
  raw.on('error', () => {});
  const q = new Queue('plain', { connection: raw });
  q.on('error', () => {});
  try {
    await assert.rejects(q.add('x', {}), /CROSSSLOT/);
  } finally {
    await q.close().catch(() => {});
    await closeRedis(raw);
  }
});

test('a host worker on a Redis Cluster runs a backup job to completion', async () => {
  const url = `redis-cluster://127.0.0.1:${port}`;
  const host = uniqueHost();
  const producer = createConnection(url, 'producer');
  producer.on('error', () => {});
  const queue = hostQueue(producer, host);
  queue.on('error', () => {});
  const worker = await startHostWorker({ host, redisUrl: url, repoUrl: fx.repoUrl, passphrase: PASSWORD, logger: silent });
  try {
    const vm = `clustered-${host}`;
    const job = await enqueueBackup(queue, { vm, disks: [{ path: await fx.image(vm), format: 'qcow2' }] }, { jobId: `c-${host}` });
    let done: Job | undefined;
    await waitFor('the job', async () => {
      const state = await (await Job.fromId(queue, job.id!))?.getState();
      // Read again once finished: the copy read before the state may predate the result.
      if (state === 'completed' || state === 'failed') done = await Job.fromId(queue, job.id!);
      return done !== undefined;
    }, 60_000, () => log, 200);
    assert.equal(await done!.getState(), 'completed', done!.failedReason);
    assert.equal((done!.returnvalue as BackupJobResult).vm, vm);
    assert.deepEqual((await fx.repo.manifests()).filter((m) => m.vm === vm).length, 1);
    // BullMQ's keys of this queue carry the hash tag; vmvault's own keys (vmvault:…) are single keys.
    const keys = (await (producer as Cluster).keys('*')).filter((k) => k.includes(host) && !k.startsWith('vmvault:'));
    assert.ok(keys.length > 0 && keys.every((k) => k.startsWith(`{vmvault}:vmvault-host-${host}:`)), `queue keys use the hash tag: ${keys.join(', ')}`);
  } finally {
    await worker.close();
    await queue.close().catch(() => {});
    await closeRedis(producer);
  }
});

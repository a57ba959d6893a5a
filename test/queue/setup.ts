/**
 * Shared pieces of the queue tests: a real directory repository (weak KDF), real
 * qcow2 images, unique host names, and waiting for a job through QueueEvents.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before } from 'node:test';
import { Job, Queue, QueueEvents } from 'bullmq';
import type { Redis } from 'ioredis';
import { pino } from 'pino';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { hostQueue, maintenanceQueue } from '../../src/queue/enqueue.js';
import { makeImage } from '../helpers/images.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

export const PASSWORD = 'queue test passphrase';
export const silent = pino({ level: process.env.VMVAULT_TEST_LOG ?? 'silent' });

export function uniqueHost(prefix = 'h'): string {
  return `${prefix}-${randomBytes(4).toString('hex')}`;
}

export interface Fixture {
  dir: string;
  repoUrl: string;
  repo: Repository;
  /** A small qcow2 image with some data, named `name`.qcow2. */
  image(name: string, pattern?: number): Promise<string>;
  cleanup(): Promise<void>;
}

export async function fixture(): Promise<Fixture> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-queue-'));
  const repoUrl = join(dir, 'repo');
  const repo = await Repository.init(new LocalStorage(repoUrl), PASSWORD, { kdf: 'weak' });
  return {
    dir, repoUrl, repo,
    image: (name, pattern = 0x5a) => makeImage(dir, `${name}.qcow2`, 'qcow2', 2 * 1024 * 1024, [{ offset: 0, length: 256 * 1024, pattern }]),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

/** A host queue with its QueueEvents, ready before anything is added (events are read from "now"). */
export interface Watched {
  queue: Queue;
  events: QueueEvents;
  connection: Redis;
  /** Resolves with the finished job (completed or failed), re-read from Redis. */
  finished(job: Job): Promise<Job>;
  close(): Promise<void>;
}

export function watchQueue(redisUrl: string, host: string): Promise<Watched> {
  return watch(redisUrl, (connection) => hostQueue(connection, host));
}

export function watchMaintenance(redisUrl: string): Promise<Watched> {
  return watch(redisUrl, maintenanceQueue);
}

async function watch(redisUrl: string, open: (connection: Redis) => Queue): Promise<Watched> {
  const connection = createRedis(redisUrl, 'producer');
  const eventsConnection = createRedis(redisUrl, 'worker');
  connection.on('error', () => {});
  eventsConnection.on('error', () => {});
  const queue = open(connection);
  const events = new QueueEvents(queue.name, { connection: eventsConnection });
  await events.waitUntilReady();
  return {
    queue, events, connection,
    async finished(job) {
      try {
        await job.waitUntilFinished(events);
      } catch {
        /* failed: the caller inspects the job */
      }
      const again = await Job.fromId(queue, job.id!);
      if (!again) throw new Error(`job ${job.id} vanished`);
      return again;
    },
    async close() {
      await events.close();
      await queue.obliterate({ force: true }).catch(() => {});
      await queue.close();
      await closeRedis(eventsConnection);
      await closeRedis(connection);
    },
  };
}

/**
 * Registers before/after hooks that start a real redis-server and a repository
 * fixture, and run `cleanup` callbacks (last added first) before stopping them.
 */
export function queueHarness(): { readonly redis: TestRedis; readonly fx: Fixture; cleanup(fn: () => Promise<void>): void } {
  let redis: TestRedis | undefined;
  let fx: Fixture | undefined;
  const cleanups: (() => Promise<void>)[] = [];
  before(async () => {
    redis = await startRedis();
    fx = await fixture();
  });
  after(async () => {
    for (const c of cleanups.reverse()) await c();
    await redis?.stop();
    await fx?.cleanup();
  });
  return {
    get redis() { return redis!; },
    get fx() { return fx!; },
    cleanup: (fn) => void cleanups.push(fn),
  };
}

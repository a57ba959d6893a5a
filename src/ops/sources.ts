/**
 * The shared state a status report reads, opened by a process that has no API of its
 * own (`vmvault status`, the scheduler's alert checks): the repository (read only),
 * a producer connection to Redis and the queues.
 */
import type { Config } from '../config/schema.js';
import { closeRedis, createConnection } from '../queue/connection.js';
import { QueueSet } from '../queue/enqueue.js';
import { Catalogue } from '../repo/catalogue.js';
import { VerificationCache } from '../repo/health.js';
import { Repository } from '../repo/repository.js';
import { openStorage } from '../storage/open.js';
import type { StatusSources } from './status.js';

export interface OpenedSources { sources: StatusSources; close(): Promise<void> }

export async function openStatusSources(
  config: Config, where: { redisUrl: string; repository: { url: string; passphrase: string } }, opts: { cacheMs?: number; onRedisError?: (err: Error) => void } = {},
): Promise<OpenedSources> {
  const repo = await Repository.open(openStorage(where.repository.url), where.repository.passphrase, { noLock: true });
  const redis = createConnection(where.redisUrl, 'producer');
  redis.on('error', opts.onRedisError ?? (() => {}));
  const queues = new QueueSet(redis);
  const catalogue = new Catalogue(repo, opts.cacheMs ?? 2000);
  const verification = new VerificationCache(repo, opts.cacheMs ?? 2000);
  return {
    sources: { config, redis, backups: () => catalogue.list(), unreadable: () => catalogue.unreadable(), verification: () => verification.get(), queueOf: queues.of, maintenance: queues.maintenance },
    close: async () => {
      await queues.close();
      await closeRedis(redis);
      await repo.storage.close();
    },
  };
}

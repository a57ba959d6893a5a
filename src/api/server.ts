/**
 * The API's HTTP server (@hono/node-server) on config.api.listen. It opens the
 * repository itself (to list backups and stream disks) and a producer connection
 * to Redis (to enqueue jobs and read their state).
 */
import { serve, type ServerType } from '@hono/node-server';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { parseListen, type Config } from '../config/schema.js';
import { VmvaultError } from '../errors.js';
import { closeRedis, createConnection } from '../queue/connection.js';
import { Repository } from '../repo/repository.js';
import { openStorage } from '../storage/open.js';
import { createApi } from './app.js';
import type { VmInventory } from '../config/inventory.js';

/**
 * A connection on which nothing moves for this long is closed: a client that stops
 * reading a disk answer would otherwise keep it, and its buffers, for ever. Longer
 * than the 30 s GET …/snapshots may wait for its host.
 */
const IDLE_SOCKET_MS = 120_000;

export interface ApiServer {
  /** Where it listens, e.g. http://127.0.0.1:8740 */
  url: string;
  stop(): Promise<void>;
}

export async function startApiServer(
  config: Config,
  opts: { redisUrl: string; repository: { url: string; passphrase: string }; logger: Logger; listen?: string; inventory?: VmInventory },
): Promise<ApiServer> {
  const listen = opts.listen ?? config.api.listen;
  const where = parseListen(listen);
  if (!where) throw new VmvaultError('BAD_INPUT', `api.listen "${listen}" is not host:port`);
  if (config.api.tokens.length === 0) {
    opts.logger.warn({}, 'api.tokens is empty: every API route but /v1/health will answer 401; add tokens to the configuration');
  }
  const repo = await Repository.open(openStorage(opts.repository.url), opts.repository.passphrase);
  const redis = createConnection(opts.redisUrl, 'api');
  redis.on('error', (err) => opts.logger.warn({ err: err.message }, 'redis connection error'));
  const log = opts.logger.child({ component: 'api' });
  const api = createApi({ config, repo, redis, log, ...(opts.inventory ? { inventory: opts.inventory } : {}) });
  let server: ServerType;
  try {
    server = await new Promise<ServerType>((resolve, reject) => {
      const s = serve({ fetch: api.app.fetch, hostname: where.host, port: where.port }, () => resolve(s));
      s.once('error', (err: NodeJS.ErrnoException) => reject(new VmvaultError('BAD_INPUT',
        err.code === 'EADDRINUSE' ? `cannot listen on ${listen}: the address is in use (another vmvault?); change api.listen` : `cannot listen on ${listen}: ${err.message}`)));
    });
  } catch (err) {
    await api.close();
    await closeRedis(redis);
    throw err;
  }
  server.setTimeout(IDLE_SOCKET_MS);
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `http://${host}:${addr.port}`;
  log.info({ url }, 'API listening');
  let stopping: Promise<void> | undefined;
  return {
    url,
    stop: () => (stopping ??= (async () => {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
      });
      await api.close();
      await closeRedis(redis);
    })()),
  };
}

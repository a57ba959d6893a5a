/**
 * Redis connections for queues and workers, from one URL (config/redis.ts): one server
 * (redis://, rediss://, unix://), a primary found through Redis Sentinel
 * (redis-sentinel://), or a Redis Cluster (redis-cluster://).
 * Workers block on Redis and must wait through a Redis restart or a failover rather than
 * fail a command: their connections have `maxRetriesPerRequest: null` (BullMQ requires it).
 * Producers (scheduler, API) fail fast instead, so a caller learns Redis is down.
 *
 * Sentinel: ioredis asks the Sentinels for the primary, and again after every disconnect,
 * so a failover (the primary's machine lost, a replica promoted) costs a reconnection. A
 * command answered READONLY (sent to a primary just demoted) reconnects and is resent.
 * Cluster: BullMQ's Lua scripts touch several keys of a queue at once, which a cluster
 * allows only within one hash slot: every queue then uses the prefix CLUSTER_PREFIX, a
 * `{…}` hash tag, so all its keys land in one slot (see queueOptions).
 */
import { Cluster, Redis, type ClusterOptions, type RedisOptions } from 'ioredis';
import { parseRedisUrl } from '../config/redis.js';
import { VmvaultError, errorMessage } from '../errors.js';

/**
 * worker: waits for Redis forever (a worker survives a restart or failover); producer:
 * a command fails after a few reconnection attempts; api: a producer whose commands also
 * fail when Redis stops answering (a stopped or overloaded server keeps the connection
 * open), so that an HTTP request answers 503 in seconds instead of hanging.
 */
export type ConnectionRole = 'worker' | 'producer' | 'api';

/** How long the API waits for Redis to answer one command. */
export const API_COMMAND_TIMEOUT_MS = 5_000;

/** A connection to one server (or a Sentinel-managed primary), or to a cluster. */
export type RedisConnection = Redis | Cluster;

/** The BullMQ key prefix on a Redis Cluster: a hash tag, so each queue's keys share a slot. */
export const CLUSTER_PREFIX = '{vmvault}';

/**
 * ioredis options for a single server or a Sentinel-managed primary; VmvaultError('BAD_INPUT')
 * when the URL is none of the accepted forms, or names a cluster (see createConnection).
 */
export function redisOptionsFromUrl(url: string): RedisOptions {
  const t = parseRedisUrl(url);
  const auth = { ...(t.password !== undefined ? { password: t.password } : {}), ...(t.username ? { username: t.username } : {}) };
  switch (t.kind) {
    case 'socket': return { path: t.path, db: t.db, ...auth };
    case 'server': return { host: t.host, port: t.port, db: t.db, ...auth, ...(t.tls ? { tls: {} } : {}) };
    case 'sentinel': return {
      sentinels: t.sentinels, name: t.name, db: t.db, ...auth,
      ...(t.sentinelPassword !== undefined ? { sentinelPassword: t.sentinelPassword } : {}),
      ...(t.tls ? { tls: {}, enableTLSForSentinelMode: true } : {}),
      // No failoverDetector: its own Sentinel connections outlive quit() (ioredis 6.0) and
      // retry forever. A lost primary breaks the connection anyway, and a demoted one
      // answers READONLY (reconnectOnError below): both make ioredis ask the Sentinels again.
      sentinelRetryStrategy: (times: number) => Math.min(100 * times, 2000),
    };
    case 'cluster': throw new VmvaultError('BAD_INPUT', 'a redis-cluster:// URL makes a cluster connection, not a single-server one: use createConnection');
  }
}

/** A demoted primary answers writes with READONLY: reconnect (through the Sentinels) and resend. */
const reconnectOnReadonly = (err: Error): 1 | 2 | false => (err.message.startsWith('READONLY') ? 2 : false);

function commonOptions(role: ConnectionRole, extra: RedisOptions): RedisOptions {
  return {
    retryStrategy: (times) => Math.min(50 * 2 ** times, 2000),
    reconnectOnError: reconnectOnReadonly,
    ...(role === 'worker' ? { maxRetriesPerRequest: null } : { maxRetriesPerRequest: 3 }),
    ...(role === 'api' ? { commandTimeout: API_COMMAND_TIMEOUT_MS } : {}),
    ...extra,
  };
}

/**
 * A new ioredis connection to one server or a Sentinel-managed primary (not a cluster:
 * see createConnection). It reconnects forever (up to 2 s apart), so a worker survives a
 * Redis restart or a failover; `lazyConnect` leaves connecting to the first command.
 */
export function createRedis(url: string, role: ConnectionRole, extra: RedisOptions = {}): Redis {
  return new Redis({ ...redisOptionsFromUrl(url), ...commonOptions(role, extra) });
}

/** Like createRedis, and a Cluster connection for a redis-cluster:// URL: what the service uses. */
export function createConnection(url: string, role: ConnectionRole, extra: RedisOptions = {}): RedisConnection {
  const t = parseRedisUrl(url);
  if (t.kind !== 'cluster') return createRedis(url, role, extra);
  const common = commonOptions(role, extra);
  const { retryStrategy: _unused, ...redisOptions } = common; // per node; the cluster has its own
  const options: ClusterOptions = {
    redisOptions: {
      ...redisOptions,
      ...(t.password !== undefined ? { password: t.password } : {}), ...(t.username ? { username: t.username } : {}),
      ...(t.tls ? { tls: {} } : {}),
    },
    clusterRetryStrategy: (times) => Math.min(50 * 2 ** times, 2000),
    ...(extra.lazyConnect ? { lazyConnect: true } : {}),
  };
  return new Cluster(t.nodes, options);
}

/** The `connection` (and, on a cluster, `prefix`) for a BullMQ Queue or Worker. */
export function queueOptions(connection: RedisConnection): { connection: RedisConnection; prefix?: string } {
  return connection instanceof Cluster ? { connection, prefix: CLUSTER_PREFIX } : { connection };
}

/**
 * Throws VmvaultError('BAD_INPUT') unless Redis evicts nothing: with any other
 * maxmemory-policy Redis may silently drop job or lock keys under memory pressure,
 * and a dropped lock means two backups of one VM. Reads CONFIG GET, or INFO where
 * CONFIG is disabled (managed services).
 */
export async function checkNoEviction(redis: RedisConnection): Promise<void> {
  let policy: string | undefined;
  try {
    const r = (await redis.config('GET', 'maxmemory-policy')) as unknown as string[];
    policy = r[1];
  } catch {
    try {
      policy = /maxmemory_policy:(\S+)/.exec(await redis.info('memory'))?.[1];
    } catch (err) {
      throw new VmvaultError('BAD_INPUT', `cannot read Redis' maxmemory-policy (${errorMessage(err)}): vmvault needs maxmemory-policy noeviction`, { cause: err });
    }
  }
  if (policy === undefined) throw new VmvaultError('BAD_INPUT', "Redis did not report its maxmemory-policy: vmvault needs maxmemory-policy noeviction");
  if (policy !== 'noeviction') {
    throw new VmvaultError('BAD_INPUT', `Redis runs with maxmemory-policy ${policy}, which may evict queued jobs and locks: set "maxmemory-policy noeviction" in redis.conf (or CONFIG SET maxmemory-policy noeviction) and start again`);
  }
}

/** Closes a connection: QUIT when it is up, disconnect otherwise (never waits for a dead server). */
export async function closeRedis(redis: RedisConnection): Promise<void> {
  if (redis.status === 'end') return;
  if (redis.status === 'ready') {
    try {
      await redis.quit();
      return;
    } catch {
      /* fall through */
    }
  }
  redis.disconnect();
}

/**
 * Redis connections for queues and workers, from one URL:
 *   redis://[user:password@]host[:port][/db]   rediss://… (TLS)
 *   unix:///path/to/redis.sock[?db=N&password=…]
 * Workers block on Redis and must wait through a Redis restart rather than fail a
 * command: their connections have `maxRetriesPerRequest: null` (BullMQ requires it).
 * Producers (scheduler, API) fail fast instead, so a caller learns Redis is down.
 */
import { Redis, type RedisOptions } from 'ioredis';
import { VmvaultError, errorMessage } from '../errors.js';

export type ConnectionRole = 'worker' | 'producer';

/** Parses a Redis URL into ioredis options; VmvaultError('BAD_INPUT') when it is none of the accepted forms. */
export function redisOptionsFromUrl(url: string): RedisOptions {
  const bad = (why: string) => new VmvaultError('BAD_INPUT', `bad Redis URL "${url.replace(/\/\/[^@/]*@/, '//***@')}": ${why} (accepted: redis://[user:password@]host[:port][/db], rediss://…, unix:///path/to/socket[?db=N])`);
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw bad('it is not a URL');
  }
  const password = u.password ? decodeURIComponent(u.password) : u.searchParams.get('password') ?? undefined;
  const username = u.username ? decodeURIComponent(u.username) : undefined;
  const auth = { ...(password !== undefined ? { password } : {}), ...(username ? { username } : {}) };
  const dbParam = u.searchParams.get('db');
  if (u.protocol === 'unix:') {
    if (!u.pathname || u.pathname === '/') throw bad('the socket path is missing');
    if (u.host) throw bad('a unix URL has no host: write unix:///absolute/path (three slashes)');
    return { path: decodeURIComponent(u.pathname), db: parseDb(dbParam ?? '0', bad), ...auth };
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw bad(`unknown scheme "${u.protocol}"`);
  if (!u.hostname) throw bad('the host is missing');
  const port = u.port ? Number(u.port) : 6379;
  const dbPath = u.pathname.replace(/^\//, '');
  return {
    host: u.hostname.replace(/^\[|\]$/g, ''), port, db: parseDb(dbPath || dbParam || '0', bad), ...auth,
    ...(u.protocol === 'rediss:' ? { tls: {} } : {}),
  };
}

function parseDb(s: string, bad: (why: string) => VmvaultError): number {
  if (!/^\d{1,2}$/.test(s)) throw bad(`"${s}" is not a database number`);
  return Number(s);
}

/**
 * A new ioredis connection. It reconnects forever (1 s to 20 s apart), so a worker
 * survives a Redis restart; `lazyConnect` leaves connecting to the first command.
 */
export function createRedis(url: string, role: ConnectionRole, extra: RedisOptions = {}): Redis {
  const opts: RedisOptions = {
    ...redisOptionsFromUrl(url),
    retryStrategy: (times) => Math.min(50 * 2 ** times, 2000),
    ...(role === 'worker' ? { maxRetriesPerRequest: null } : { maxRetriesPerRequest: 3 }),
    ...extra,
  };
  return new Redis(opts);
}

/**
 * Throws VmvaultError('BAD_INPUT') unless Redis evicts nothing: with any other
 * maxmemory-policy Redis may silently drop job or lock keys under memory pressure,
 * and a dropped lock means two backups of one VM. Reads CONFIG GET, or INFO where
 * CONFIG is disabled (managed services).
 */
export async function checkNoEviction(redis: Redis): Promise<void> {
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
export async function closeRedis(redis: Redis): Promise<void> {
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

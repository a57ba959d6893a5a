/**
 * Where Redis is, as one URL string: what the configuration's `redis:` becomes and what
 * every part of the service passes around. Pure: parsing and formatting only (the
 * connections are made in queue/connection.ts).
 *
 *   redis://[user:password@]host[:port][/db]     one server (rediss:// with TLS)
 *   unix:///path/to/redis.sock[?db=N&password=…]  one server on a socket
 *   redis-sentinel://[user:password@]host:port[,host:port…]/NAME[/db][?sentinelPassword=…&tls=true]
 *                                                 the primary that these Sentinels name NAME
 *   redis-cluster://[user:password@]host:port[,host:port…][?tls=true]
 *                                                 a Redis Cluster, reached through these nodes
 */
import { VmvaultError } from '../errors.js';

export interface RedisNode { host: string; port: number }

export type RedisTarget =
  | { kind: 'server'; host: string; port: number; db: number; username?: string; password?: string; tls: boolean }
  | { kind: 'socket'; path: string; db: number; username?: string; password?: string }
  | { kind: 'sentinel'; sentinels: RedisNode[]; name: string; db: number; username?: string; password?: string; sentinelPassword?: string; tls: boolean }
  | { kind: 'cluster'; nodes: RedisNode[]; username?: string; password?: string; tls: boolean };

export const REDIS_URL_FORMS = 'redis://[user:password@]host[:port][/db], rediss://…, unix:///path/to/socket[?db=N], '
  + 'redis-sentinel://[:password@]host:port[,host:port…]/MASTER-NAME[/db], redis-cluster://[:password@]host:port[,host:port…]';

/** The URL with any password replaced by ***, for messages. */
export function maskRedisUrl(url: string): string {
  return url.replace(/\/\/[^@/]*@/, '//***@').replace(/((?:sentinelP|p)assword=)[^&]*/g, '$1***');
}

/** Parses a Redis URL; VmvaultError('BAD_INPUT') naming the problem and the accepted forms. */
export function parseRedisUrl(url: string): RedisTarget {
  const bad = (why: string) => new VmvaultError('BAD_INPUT', `bad Redis URL "${maskRedisUrl(url)}": ${why} (accepted: ${REDIS_URL_FORMS})`);
  const scheme = /^([a-z][a-z0-9+-]*):\/\//i.exec(url)?.[1]?.toLowerCase();
  if (scheme === 'redis-sentinel' || scheme === 'redis-cluster') return parseMultiHost(url, scheme, bad);
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
    return { kind: 'socket', path: decodeURIComponent(u.pathname), db: parseDb(dbParam ?? '0', bad), ...auth };
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw bad(`unknown scheme "${u.protocol}"`);
  if (!u.hostname) throw bad('the host is missing');
  const port = u.port ? Number(u.port) : 6379;
  const dbPath = u.pathname.replace(/^\//, '');
  return {
    kind: 'server', host: u.hostname.replace(/^\[|\]$/g, ''), port, db: parseDb(dbPath || dbParam || '0', bad), ...auth, tls: u.protocol === 'rediss:',
  };
}

/** `redis-sentinel://…` and `redis-cluster://…`: several host:port pairs, which WHATWG URLs cannot hold. */
function parseMultiHost(url: string, scheme: 'redis-sentinel' | 'redis-cluster', bad: (why: string) => VmvaultError): RedisTarget {
  let rest = url.slice(scheme.length + 3);
  const q = rest.indexOf('?');
  const query = new URLSearchParams(q < 0 ? '' : rest.slice(q + 1));
  rest = q < 0 ? rest : rest.slice(0, q);
  const slash = rest.indexOf('/');
  const authority = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? '' : rest.slice(slash + 1);
  const at = authority.lastIndexOf('@');
  const auth: { username?: string; password?: string } = {};
  if (at >= 0) {
    const info = authority.slice(0, at);
    const colon = info.indexOf(':');
    const user = decodeURIComponent(colon < 0 ? info : info.slice(0, colon));
    if (user) auth.username = user;
    if (colon >= 0) auth.password = decodeURIComponent(info.slice(colon + 1));
  }
  const hosts = authority.slice(at + 1);
  if (!hosts) throw bad(`no ${scheme === 'redis-sentinel' ? 'Sentinel' : 'cluster node'} is given: list host:port pairs separated by ","`);
  const nodes = hosts.split(',').map((h) => {
    const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(h);
    const port = Number(m?.[3]);
    if (!m || !(port >= 1 && port <= 65535)) throw bad(`"${h}" is not host:port (e.g. 10.0.0.1:26379)`);
    return { host: (m[1] ?? m[2])!, port };
  });
  for (const key of query.keys()) {
    const known = scheme === 'redis-sentinel' ? ['sentinelPassword', 'tls'] : ['tls'];
    if (!known.includes(key)) throw bad(`unknown option "${key}" (known: ${known.join(', ')})`);
  }
  const tlsParam = query.get('tls');
  if (tlsParam !== null && tlsParam !== 'true' && tlsParam !== 'false') throw bad('tls must be true or false');
  const tls = tlsParam === 'true';
  if (scheme === 'redis-cluster') {
    if (path) throw bad('a cluster URL has no path: a Redis Cluster has one database, and no primary name');
    return { kind: 'cluster', nodes, ...auth, tls };
  }
  const [name, db, ...more] = path.split('/');
  if (!name) throw bad('the primary\'s name (as in "sentinel monitor NAME …") is missing: redis-sentinel://host:port/NAME');
  if (more.length) throw bad('the path is /NAME or /NAME/DB');
  const sentinelPassword = query.get('sentinelPassword');
  return {
    kind: 'sentinel', sentinels: nodes, name: decodeURIComponent(name), db: parseDb(db || '0', bad), ...auth,
    ...(sentinelPassword !== null ? { sentinelPassword } : {}), tls,
  };
}

function parseDb(s: string, bad: (why: string) => VmvaultError): number {
  if (!/^\d{1,2}$/.test(s)) throw bad(`"${s}" is not a database number`);
  return Number(s);
}

/** The URL of a Sentinel or Cluster setup given as a mapping in the configuration. */
export function formatRedisUrl(t: Extract<RedisTarget, { kind: 'sentinel' | 'cluster' }>): string {
  const enc = encodeURIComponent;
  const auth = t.password !== undefined || t.username ? `${enc(t.username ?? '')}${t.password !== undefined ? `:${enc(t.password)}` : ''}@` : '';
  const nodes = (t.kind === 'sentinel' ? t.sentinels : t.nodes).map((n) => `${n.host.includes(':') ? `[${n.host}]` : n.host}:${n.port}`).join(',');
  const query = new URLSearchParams();
  if (t.kind === 'sentinel' && t.sentinelPassword !== undefined) query.set('sentinelPassword', t.sentinelPassword);
  if (t.tls) query.set('tls', 'true');
  const qs = query.size ? `?${query.toString()}` : '';
  return t.kind === 'sentinel'
    ? `redis-sentinel://${auth}${nodes}/${enc(t.name)}${t.db ? `/${t.db}` : ''}${qs}`
    : `redis-cluster://${auth}${nodes}${qs}`;
}

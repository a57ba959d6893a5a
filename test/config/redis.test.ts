/**
 * The configuration's `redis:` in its three forms (one server, Sentinel, Cluster), the
 * URL each becomes, and the errors for the mistakes an operator makes.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Cluster } from 'ioredis';
import { ConfigFileError, parseConfig } from '../../src/config/load.js';
import { formatRedisUrl, maskRedisUrl, parseRedisUrl } from '../../src/config/redis.js';
import { CLUSTER_PREFIX, closeRedis, createConnection, queueOptions, redisOptionsFromUrl } from '../../src/queue/connection.js';

const parse = (yaml: string) => parseConfig(yaml, 'c.yaml', { host: 'hv1' });
function problems(yaml: string): string[] {
  try {
    parse(yaml);
  } catch (err) {
    assert.ok(err instanceof ConfigFileError);
    return err.problems.map((p) => `${p.line}:${p.col}: ${p.path}: ${p.message}`);
  }
  assert.fail('expected problems');
}

describe('redis in the configuration', () => {
  test('Sentinels with the primary\'s name and passwords become one redis-sentinel URL', () => {
    const c = parse('redis:\n  sentinels: [{ host: 10.0.0.1, port: 26379 }, { host: "::1", port: 26380 }]\n  name: vmvault-primary\n  password: "p@ss:w/rd"\n  sentinelPassword: s3cret\n  db: 2\n');
    assert.equal(c.redis.url, 'redis-sentinel://:p%40ss%3Aw%2Frd@10.0.0.1:26379,[::1]:26380/vmvault-primary/2?sentinelPassword=s3cret');
    assert.deepEqual(parseRedisUrl(c.redis.url!), {
      kind: 'sentinel', sentinels: [{ host: '10.0.0.1', port: 26379 }, { host: '::1', port: 26380 }], name: 'vmvault-primary', db: 2,
      password: 'p@ss:w/rd', sentinelPassword: 's3cret', tls: false,
    });
    const o = redisOptionsFromUrl(c.redis.url!);
    assert.deepEqual(o.sentinels, [{ host: '10.0.0.1', port: 26379 }, { host: '::1', port: 26380 }]);
    assert.equal(o.name, 'vmvault-primary');
    assert.equal(o.password, 'p@ss:w/rd');
    assert.equal(o.sentinelPassword, 's3cret');
    assert.equal(o.db, 2);
    assert.equal(maskRedisUrl(c.redis.url!), 'redis-sentinel://***@10.0.0.1:26379,[::1]:26380/vmvault-primary/2?sentinelPassword=***');
  });

  test('a cluster becomes a redis-cluster URL, a Cluster connection and hash-tagged queue keys', async () => {
    const c = parse('redis:\n  cluster:\n    - { host: 10.0.0.1, port: 7000 }\n    - { host: 10.0.0.2, port: 7001 }\n  tls: true\n');
    assert.equal(c.redis.url, 'redis-cluster://10.0.0.1:7000,10.0.0.2:7001?tls=true');
    assert.deepEqual(parseRedisUrl(c.redis.url!), { kind: 'cluster', nodes: [{ host: '10.0.0.1', port: 7000 }, { host: '10.0.0.2', port: 7001 }], tls: true });
    const conn = createConnection(c.redis.url!, 'producer', { lazyConnect: true });
    try {
      assert.ok(conn instanceof Cluster);
      assert.equal(queueOptions(conn).prefix, CLUSTER_PREFIX);
      assert.match(CLUSTER_PREFIX, /^\{[^{}]+\}$/);
    } finally {
      await closeRedis(conn);
    }
    assert.throws(() => redisOptionsFromUrl(c.redis.url!), /use createConnection/);
    const single = createConnection('redis://127.0.0.1:1', 'producer', { lazyConnect: true });
    assert.equal(queueOptions(single).prefix, undefined, 'one server keeps BullMQ\'s default prefix (existing queues stay where they are)');
    await closeRedis(single);
  });

  test('a URL written by hand is accepted in all forms', () => {
    assert.equal(parse('redis: { url: "redis-sentinel://h1:26379,h2:26379/mymaster" }\n').redis.url, 'redis-sentinel://h1:26379,h2:26379/mymaster');
    assert.equal(parse('redis: { url: "redis-cluster://:pw@h1:7000" }\n').redis.url, 'redis-cluster://:pw@h1:7000');
    assert.equal(parse('redis: { url: "redis://h:6379/1" }\n').redis.url, 'redis://h:6379/1');
    assert.deepEqual(parse('stateDir: /x\n').redis, {});
    const targets: Array<Parameters<typeof formatRedisUrl>[0]> = [
      { kind: 'sentinel', sentinels: [{ host: 'a', port: 1 }], name: 'm x', db: 0, username: 'u', password: 'p', tls: true },
      { kind: 'cluster', nodes: [{ host: 'a', port: 1 }, { host: 'b', port: 2 }], tls: false },
    ];
    for (const t of targets) {
      assert.deepEqual(parseRedisUrl(formatRedisUrl(t)), t);
    }
  });

  test('mistakes are reported with what to do', () => {
    assert.deepEqual(problems('redis:\n  sentinels: [{ host: a, port: 26379 }]\n'), [
      '2:14: redis.sentinels: Sentinels need the name of the primary they watch (as in "sentinel monitor NAME …"): add name',
    ]);
    assert.deepEqual(problems('redis:\n  name: mymaster\n'), [
      '2:9: redis.name: name is the primary\'s name for Sentinel: add sentinels: [{ host, port }], or remove name',
    ]);
    assert.deepEqual(problems('redis:\n  url: redis://h\n  sentinels: [{ host: a, port: 1 }]\n  name: m\n'), [
      '3:14: redis.sentinels: give one of url, sentinels (with name) or cluster, not url and sentinels',
      '4:9: redis.name: name goes with sentinels or cluster; with url, put it in the URL (redis://user:password@host:port/db, rediss:// for TLS)',
    ]);
    assert.deepEqual(problems('redis:\n  cluster: [{ host: a, port: 70000 }]\n  db: 1\n'), [
      '2:30: redis.cluster[0].port: a port is 1 to 65535',
      '3:7: redis.db: a Redis Cluster has only database 0: remove db',
    ]);
    assert.deepEqual(problems('redis:\n  sentinels: []\n  name: m\n'), ['2:14: redis.sentinels: list at least one Sentinel']);
    assert.deepEqual(problems('redis:\n  sentinels: [{ host: a }]\n  name: m\n'), ['2:15: redis.sentinels[0].port: missing: "port" is required']);
    assert.deepEqual(problems('redis: { url: "redis-sentinel://a:1" }\n'), [
      '1:15: redis.url: the primary\'s name (as in "sentinel monitor NAME …") is missing: redis-sentinel://host:port/NAME (accepted: redis://[user:password@]host[:port][/db], rediss://…, unix:///path/to/socket[?db=N], redis-sentinel://[:password@]host:port[,host:port…]/MASTER-NAME[/db], redis-cluster://[:password@]host:port[,host:port…])',
    ]);
    assert.throws(() => parseRedisUrl('redis-sentinel://:pw@a/m'), (err: Error) => {
      assert.match(err.message, /"a" is not host:port/);
      assert.doesNotMatch(err.message, /pw/, 'no password in the message');
      return true;
    });
    assert.throws(() => parseRedisUrl('redis-cluster://a:1/0'), /a cluster URL has no path/);
    assert.throws(() => parseRedisUrl('redis-cluster://a:1?name=x'), /unknown option "name"/);
  });
});

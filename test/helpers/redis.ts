/**
 * A real `redis-server` for tests, on a private unix socket in a temp directory (no
 * TCP port), with AOF on so that restart() keeps queues and locks as a production
 * Redis would. When redis-server is not installed this throws: tests fail, never skip.
 * The spawning is `vmvault up`'s own (src/queue/embedded-redis.ts).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startEmbeddedRedis } from '../../src/queue/embedded-redis.js';

export interface RedisOptions {
  /** `noeviction` unless told otherwise (a worker must refuse anything else). */
  maxmemoryPolicy?: string;
  /** Extra `--name value` arguments. */
  args?: string[];
  /** How long start (and each restart) may take. */
  startTimeoutMs?: number;
}

export interface TestRedis {
  /** `unix:///…/redis.sock`, as the queue code accepts it. */
  url: string;
  socketPath: string;
  /** Always undefined: the server listens on the socket only (`--port 0`). */
  port?: number;
  dir: string;
  /** The server's pid while it runs (to stop it with SIGSTOP, as a hung server). */
  readonly pid: number | undefined;
  /** Stops the server cleanly (SIGTERM: AOF is flushed) and starts it again on the same socket and data. */
  restart(): Promise<void>;
  /** Kills the server and removes its directory. */
  stop(): Promise<void>;
}

export async function startRedis(opts: RedisOptions = {}): Promise<TestRedis> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-redis-'));
  try {
    const server = await startEmbeddedRedis({
      dir, socketPath: join(dir, 'redis.sock'),
      ...(opts.maxmemoryPolicy ? { maxmemoryPolicy: opts.maxmemoryPolicy } : {}),
      ...(opts.args ? { args: opts.args } : {}),
      ...(opts.startTimeoutMs ? { startTimeoutMs: opts.startTimeoutMs } : {}),
    });
    return {
      url: server.url,
      socketPath: server.socketPath,
      dir,
      get pid() { return server.pid; },
      restart: () => server.restart(),
      async stop() {
        await server.stop('SIGKILL');
        await rm(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

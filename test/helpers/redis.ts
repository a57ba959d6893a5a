/**
 * A real `redis-server` for tests, on a private unix socket in a temp directory (no
 * TCP port), with AOF on so that restart() keeps queues and locks as a production
 * Redis would. When redis-server is not installed this throws: tests fail, never skip.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

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
  /** Stops the server cleanly (SIGTERM: AOF is flushed) and starts it again on the same socket and data. */
  restart(): Promise<void>;
  /** Kills the server and removes its directory. */
  stop(): Promise<void>;
}

export async function startRedis(opts: RedisOptions = {}): Promise<TestRedis> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-redis-'));
  const socketPath = join(dir, 'redis.sock');
  const args = [
    '--port', '0', '--unixsocket', socketPath, '--unixsocketperm', '700', '--dir', dir,
    '--appendonly', 'yes', '--save', '', '--maxmemory-policy', opts.maxmemoryPolicy ?? 'noeviction',
    '--daemonize', 'no', '--loglevel', 'warning', ...(opts.args ?? []),
  ];
  const timeout = opts.startTimeoutMs ?? 10_000;
  let proc: ChildProcess | undefined;
  try {
    proc = await launch(args, socketPath, timeout);
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }

  const halt = async (signal: NodeJS.Signals): Promise<void> => {
    const p = proc;
    proc = undefined;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = once(p, 'exit');
    p.kill(signal);
    await exited;
  };
  return {
    url: `unix://${socketPath}`,
    socketPath,
    dir,
    async restart() {
      await halt('SIGTERM');
      proc = await launch(args, socketPath, timeout);
    },
    async stop() {
      await halt('SIGKILL');
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Starts redis-server and resolves once it answers PING on its socket. */
async function launch(args: string[], socketPath: string, timeoutMs: number): Promise<ChildProcess> {
  const proc = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  proc.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
  const failed = new Promise<never>((_, reject) => {
    proc.once('error', (err: NodeJS.ErrnoException) => {
      reject(err.code === 'ENOENT' ? new Error('redis-server is not installed (apt-get install redis-server): queue tests need a real Redis') : err);
    });
    proc.once('exit', (code, signal) => reject(new Error(`redis-server exited (${code ?? signal}) before it was ready: ${output.trim()}`)));
  });
  failed.catch(() => {}); // Observed below; after readiness an exit is expected (restart/stop).
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      // A ping races with the failure: whichever settles first wins.
      if (await Promise.race([ping(socketPath), failed])) return proc;
      if (Date.now() > deadline) throw new Error(`redis-server did not answer PING within ${timeoutMs} ms: ${output.trim()}`);
      await Promise.race([new Promise((r) => setTimeout(r, 20)), failed]);
    }
  } catch (err) {
    if (proc.exitCode === null && proc.signalCode === null) {
      const exited = once(proc, 'exit');
      proc.kill('SIGKILL');
      await exited;
    }
    throw err;
  }
}

/** True when a server on the socket answers PING with PONG (and is not loading the AOF). */
function ping(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = createConnection(socketPath);
    let reply = '';
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on('error', () => done(false));
    sock.on('connect', () => sock.write('*1\r\n$4\r\nPING\r\n'));
    sock.on('data', (d: Buffer) => {
      reply += d.toString();
      if (reply.includes('\r\n')) done(reply.startsWith('+PONG'));
    });
  });
}

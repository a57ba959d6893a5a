/**
 * A private `redis-server` on a unix socket (no TCP port unless `tcp` asks for one,
 * with a password), as `vmvault up` starts when no Redis is configured: AOF on (`--appendonly yes`), no RDB snapshots
 * (`--save ''`), `--maxmemory-policy noeviction` (workers refuse anything else).
 * Ready once it answers PING on its socket; stop() sends SIGTERM (AOF flushed).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { VmvaultError } from '../errors.js';
import { toolEnv } from '../tool-env.js';

export interface EmbeddedRedisOptions {
  /** Data directory (AOF files); created 0700 when missing. */
  dir: string;
  /** Socket path (default `<dir>/redis.sock`). Unix socket paths are limited to about 100 bytes. */
  socketPath?: string;
  /** `noeviction` unless told otherwise. */
  maxmemoryPolicy?: string;
  /** Extra `--name value` arguments. */
  args?: string[];
  /** How long start (and each restart) may take (default 10 s). */
  startTimeoutMs?: number;
  /**
   * Also listen on TCP (for workers on other hosts), with this password required of
   * every client, the socket's included. The password goes in a 0600 configuration
   * file in `dir`, never on the command line (which every local user can read).
   */
  tcp?: { host: string; port: number; password: string };
}

export interface EmbeddedRedis {
  /** `unix:///…/redis.sock`, as createRedis accepts it. */
  url: string;
  socketPath: string;
  dir: string;
  /** The server's pid, while it runs. */
  readonly pid: number | undefined;
  /** Stops the server (SIGTERM, AOF flushed) and starts it again on the same socket and data. */
  restart(): Promise<void>;
  /** Stops the server: SIGTERM by default (clean), SIGKILL to simulate a crash. Idempotent. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

export async function startEmbeddedRedis(opts: EmbeddedRedisOptions): Promise<EmbeddedRedis> {
  await mkdir(opts.dir, { recursive: true, mode: 0o700 });
  const socketPath = opts.socketPath ?? join(opts.dir, 'redis.sock');
  if (Buffer.byteLength(socketPath) > 100) {
    throw new VmvaultError('BAD_INPUT', `the Redis socket path ${socketPath} is too long for a unix socket (at most 100 bytes): use a shorter state directory`);
  }
  await rm(socketPath, { force: true });
  let auth: string | undefined;
  const tcpArgs: string[] = [];
  if (opts.tcp) {
    if (!/^[A-Za-z0-9_-]{16,256}$/.test(opts.tcp.password)) throw new VmvaultError('BAD_INPUT', 'the Redis password must be 16 to 256 letters, digits, "_" or "-"');
    const conf = join(opts.dir, 'vmvault-redis.conf');
    await rm(conf, { force: true });
    await writeFile(conf, `requirepass "${opts.tcp.password}"\n`, { mode: 0o600, flag: 'wx' });
    tcpArgs.push(conf);
    auth = opts.tcp.password;
  }
  const args = [
    ...tcpArgs,
    '--port', opts.tcp ? String(opts.tcp.port) : '0', ...(opts.tcp ? ['--bind', opts.tcp.host] : []), '--unixsocket', socketPath, '--unixsocketperm', '700', '--dir', opts.dir,
    '--appendonly', 'yes', '--save', '', '--maxmemory-policy', opts.maxmemoryPolicy ?? 'noeviction',
    '--daemonize', 'no', '--loglevel', 'warning', ...(opts.args ?? []),
  ];
  const timeout = opts.startTimeoutMs ?? 10_000;
  let proc: ChildProcess | undefined = await launch(args, socketPath, timeout, auth);

  const halt = async (signal: NodeJS.Signals): Promise<void> => {
    const p = proc;
    proc = undefined;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = once(p, 'exit');
    p.kill(signal);
    await exited;
  };
  return {
    url: `unix://${socketPath}${auth ? `?password=${encodeURIComponent(auth)}` : ''}`,
    socketPath,
    dir: opts.dir,
    get pid() { return proc?.pid; },
    async restart() {
      await halt('SIGTERM');
      proc = await launch(args, socketPath, timeout, auth);
    },
    stop: (signal: NodeJS.Signals = 'SIGTERM') => halt(signal),
  };
}

/** Starts redis-server and resolves once it answers PING on its socket. */
async function launch(args: string[], socketPath: string, timeoutMs: number, password?: string): Promise<ChildProcess> {
  const proc = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'], env: toolEnv() });
  let output = '';
  proc.stdout!.on('data', (d: Buffer) => { output += d.toString(); });
  proc.stderr!.on('data', (d: Buffer) => { output += d.toString(); });
  const failed = new Promise<never>((_, reject) => {
    proc.once('error', (err: NodeJS.ErrnoException) => {
      reject(err.code === 'ENOENT'
        ? new VmvaultError('BAD_INPUT', 'redis-server is not installed (apt-get install redis-server), and no redis.url is configured')
        : err);
    });
    proc.once('exit', (code, signal) => reject(new VmvaultError('BAD_INPUT', `redis-server exited (${code ?? signal}) before it was ready: ${output.trim()}`)));
  });
  failed.catch(() => {}); // Observed below; after readiness an exit is expected (restart/stop).
  const deadline = Date.now() + timeoutMs;
  try {
    for (;;) {
      // A ping races with the failure: whichever settles first wins.
      if (await Promise.race([pingSocket(socketPath, password), failed])) return proc;
      if (Date.now() > deadline) throw new VmvaultError('BAD_INPUT', `redis-server did not answer PING within ${timeoutMs} ms: ${output.trim()}`);
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
export function pingSocket(socketPath: string, password?: string): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = createConnection(socketPath);
    let reply = '';
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on('error', () => done(false));
    const authCmd = password === undefined ? '' : `*2\r\n$4\r\nAUTH\r\n$${Buffer.byteLength(password)}\r\n${password}\r\n`;
    sock.on('connect', () => sock.write(`${authCmd}*1\r\n$4\r\nPING\r\n`));
    sock.on('data', (d: Buffer) => {
      reply += d.toString();
      if (password !== undefined && reply.startsWith('+OK\r\n')) reply = reply.slice(5);
      if (reply.includes('\r\n')) done(reply.startsWith('+PONG'));
    });
  });
}

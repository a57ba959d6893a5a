/**
 * A real Redis Sentinel setup for tests: a primary, a replica and one Sentinel
 * (`redis-server --sentinel` with a generated configuration), each a redis-server on a
 * private TCP port of 127.0.0.1 with its files in one temp directory (replication and
 * Sentinel need TCP: a unix socket cannot be announced). When redis-server is missing
 * this throws: tests fail, never skip.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { freePort } from './ports.js';

export const SENTINEL_NAME = 'vmvault-primary';

export interface SentinelSetup {
  /** The configuration's redis mapping, as YAML flow: `{ sentinels: [...], name: … }`. */
  yaml: string;
  /** The same as a URL (what the configuration becomes). */
  url: string;
  /** Ports of the first primary, the first replica and the Sentinel. */
  ports: { primary: number; replica: number; sentinel: number };
  /** The port of the primary the Sentinel names now. */
  currentPrimary(): Promise<number>;
  /** Kills the current primary's process with SIGKILL, as when its machine is lost. */
  killPrimary(): Promise<number>;
  /** Log output of every process, for diagnostics. */
  output(): string;
  stop(): Promise<void>;
}

async function waitUntil(what: string, fn: () => Promise<boolean>, ms: number, diag: () => string): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await fn().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`redis sentinel setup: timed out waiting for ${what}\n${diag()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function startSentinelSetup(): Promise<SentinelSetup> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-sentinel-'));
  const procs = new Map<number, ChildProcess>();
  let log = '';
  /**
   * Starts one redis-server on a fresh port and returns the port once the server there
   * answers as this very process (INFO's process_id): a port taken by another server
   * between the check and the bind makes this one exit, and it is tried again on another.
   */
  const launch = async (name: string, argsFor: (port: number) => Promise<string[]> | string[]): Promise<number> => {
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      const p = spawn('redis-server', await argsFor(port), { stdio: ['ignore', 'pipe', 'pipe'] });
      let own = '';
      const take = (d: Buffer) => { own += d.toString(); log += `[${name}] ${d.toString()}`; };
      p.stdout?.on('data', take);
      p.stderr?.on('data', take);
      const failed = new Promise<never>((_, reject) => {
        p.once('error', reject);
        p.once('exit', (code, sig) => reject(new Error(`redis-server (${name}) exited (${sig ?? code}) at start\n${log}`)));
      });
      failed.catch(() => {}); // also after a good start: the process is killed at the end
      const ours = async () => {
        const c = new Redis({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
        c.on('error', () => {});
        try {
          await c.connect();
          return new RegExp(`process_id:${p.pid}\\b`).test(await c.info('server'));
        } finally {
          c.disconnect();
        }
      };
      try {
        await Promise.race([waitUntil(`${name} to answer on port ${port}`, ours, 10_000, () => log), failed]);
        procs.set(port, p);
        return port;
      } catch (err) {
        if (p.exitCode === null && p.signalCode === null) {
          const exited = once(p, 'exit');
          p.kill('SIGKILL');
          await exited;
        }
        if (attempt < 5 && /Address already in use/.test(own)) continue;
        throw err;
      }
    }
  };
  const server = (port: number, sub: string, more: string[] = []) => [
    '--port', String(port), '--bind', '127.0.0.1', '--dir', join(dir, sub), '--appendonly', 'yes', '--save', '',
    '--maxmemory-policy', 'noeviction', '--daemonize', 'no', '--loglevel', 'warning', ...more,
  ];
  const stop = async () => {
    for (const p of procs.values()) {
      if (p.exitCode === null && p.signalCode === null) {
        const exited = once(p, 'exit');
        p.kill('SIGKILL');
        await exited;
      }
    }
    await rm(dir, { recursive: true, force: true });
  };
  const ask = async <T>(port: number, fn: (c: Redis) => Promise<T>): Promise<T> => {
    const c = new Redis({ port, host: '127.0.0.1', maxRetriesPerRequest: 1, retryStrategy: () => null });
    c.on('error', () => {});
    try { return await fn(c); } finally { c.disconnect(); }
  };
  let ports = { primary: 0, replica: 0, sentinel: 0 };
  try {
    for (const sub of ['primary', 'replica', 'sentinel']) await mkdir(join(dir, sub));
    const primary = await launch('primary', (port) => server(port, 'primary'));
    const replica = await launch('replica', (port) => server(port, 'replica', ['--replicaof', '127.0.0.1', String(primary)]));
    const conf = join(dir, 'sentinel', 'sentinel.conf');
    const sentinel = await launch('sentinel', async (port) => {
      await writeFile(conf, [
        `port ${port}`, 'bind 127.0.0.1', `dir ${join(dir, 'sentinel')}`,
        `sentinel monitor ${SENTINEL_NAME} 127.0.0.1 ${primary} 1`,
        `sentinel down-after-milliseconds ${SENTINEL_NAME} 1000`,
        `sentinel failover-timeout ${SENTINEL_NAME} 10000`,
        `sentinel parallel-syncs ${SENTINEL_NAME} 1`, '',
      ].join('\n'));
      return [conf, '--sentinel', '--loglevel', 'notice'];
    });
    ports = { primary, replica, sentinel };
    await waitUntil('the replica to be in sync', async () => /master_link_status:up/.test(await ask(ports.replica, (c) => c.info('replication'))), 20_000, () => log);
    await waitUntil('the Sentinel to know the replica', async () => {
      const replicas = await ask(ports.sentinel, (c) => c.call('SENTINEL', 'REPLICAS', SENTINEL_NAME)) as unknown[];
      return replicas.length > 0;
    }, 20_000, () => log);
  } catch (err) {
    await stop();
    throw err;
  }
  const currentPrimary = async () => {
    const addr = await ask(ports.sentinel, (c) => c.call('SENTINEL', 'GET-MASTER-ADDR-BY-NAME', SENTINEL_NAME)) as [string, string];
    return Number(addr[1]);
  };
  return {
    yaml: `{ sentinels: [{ host: 127.0.0.1, port: ${ports.sentinel} }], name: ${SENTINEL_NAME} }`,
    url: `redis-sentinel://127.0.0.1:${ports.sentinel}/${SENTINEL_NAME}`,
    ports,
    currentPrimary,
    async killPrimary() {
      const port = await currentPrimary();
      const p = procs.get(port);
      if (!p) throw new Error(`no process of ours listens on the primary's port ${port}`);
      const exited = once(p, 'exit');
      p.kill('SIGKILL');
      await exited;
      return port;
    },
    output: () => log,
    stop,
  };
}

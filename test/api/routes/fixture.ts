/**
 * The API in-process (Hono's `app.request()`, no HTTP server) over real parts: a
 * directory repository, a redis-server (test/helpers/redis.ts) and, where a test needs
 * its jobs to run, a real host worker and maintenance worker in this process, with
 * real qcow2 images. Tokens of every role; a clock the tests can move.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { createApi, type Api } from '../../../src/api/app.js';
import { parseConfig } from '../../../src/config/load.js';
import { closeRedis, createRedis } from '../../../src/queue/connection.js';
import { Repository } from '../../../src/repo/repository.js';
import { LocalStorage } from '../../../src/storage/local.js';
import { startHostWorker, type HostWorker } from '../../../workers/host-agent.js';
import { startMaintenanceWorker, type MaintenanceWorker } from '../../../workers/maintenance.js';
import { makeImage, tempDir, type TempDir } from '../../helpers/images.js';
import { waitFor } from '../../helpers/procs.js';
import { startRedis, type TestRedis } from '../../helpers/redis.js';

export const TOKENS = { viewer: 'viewer-token-0123456789', operator: 'operator-token-0123456789', admin: 'admin-token-0123456789' } as const;
export type Role = keyof typeof TOKENS;
const PASSPHRASE = 'routes test passphrase';
/** The off-site repository's (copy jobs write to DIR/offsite). */
export const OFFSITE_PASSPHRASE = 'routes test off-site passphrase';
const MiB = 1024 * 1024;
export const WEB_WRITES = [{ offset: 0, length: MiB, pattern: 0x5a }, { offset: 5 * MiB, length: 2 * MiB, pattern: 0xa5 }];

export interface Fixture {
  dir: string;
  api: Api;
  redis: TestRedis;
  repoUrl: string;
  /** The disk of VM "web" (qcow2, 8 MiB, WEB_WRITES). */
  webDisk: string;
  /** hosta's restore root. */
  restoreRoot: string;
  policiesDir: string;
  /** Seconds since the epoch as the API sees them; tests may move it. */
  clock: { now: number };
  call(method: string, path: string, opts?: { role?: Role; body?: unknown; headers?: Record<string, string> }): Promise<{ status: number; body: any; headers: Headers }>;
  /** The job once it has completed or failed (its view from GET /v1/jobs/{id}). */
  finished(jobId: string): Promise<any>;
  close(): Promise<void>;
}

/** With `workers`, a host worker for hosta and a maintenance worker run in this process. */
export async function startFixture(opts: { workers?: boolean } = {}): Promise<Fixture> {
  const tmp: TempDir = await tempDir('vmvault-routes-');
  const dir = tmp.path;
  const redis = await startRedis();
  const repoUrl = join(dir, 'repo');
  const restoreRoot = join(dir, 'restores');
  const policiesDir = join(dir, 'policies');
  await Promise.all([mkdir(restoreRoot), mkdir(policiesDir)]);
  const repo = await Repository.init(new LocalStorage(repoUrl), PASSPHRASE, { kdf: 'weak' });
  const webDisk = await makeImage(dir, 'web.qcow2', 'qcow2', 8 * MiB, WEB_WRITES);
  const sha = (t: string) => createHash('sha256').update(t).digest('hex');
  const config = parseConfig([
    'host: hosta',
    `policiesDir: ${JSON.stringify(policiesDir)}`,
    `stateDir: ${JSON.stringify(join(dir, 'state'))}`,
    'api:',
    '  tokens:',
    ...Object.entries(TOKENS).map(([role, t]) => `    - { name: ${role}-token, role: ${role}, sha256: ${sha(t)} }`),
    'hosts:',
    `  hosta: { restoreRoots: [${JSON.stringify(restoreRoot)}] }`,
    '  hostb: { restoreRoots: [] }',
    'vms:',
    `  - { name: web, host: hosta, tags: [web], disks: [{ path: ${JSON.stringify(webDisk)}, name: root, format: qcow2 }] }`,
    `  - { name: db, host: hostb, disks: [{ path: ${JSON.stringify(join(dir, 'db.raw'))}, format: raw }] }`,
    // Its disk file does not exist: its backups fail on hosta's worker.
    `  - { name: gone, host: hosta, disks: [{ path: ${JSON.stringify(join(dir, 'gone.qcow2'))}, format: qcow2 }] }`,
    '',
  ].join('\n'), join(dir, 'vmvault.yaml'), { host: 'hosta' });
  const producer = createRedis(redis.url, 'api'); // as src/api/server.ts
  producer.on('error', () => {});
  const clock = { now: Date.now() / 1000 };
  const api = createApi({ config, repo, redis: producer, log: pino({ level: 'silent' }), now: () => clock.now });
  const logger = pino({ level: 'silent' });
  let host: HostWorker | undefined;
  let maintenance: MaintenanceWorker | undefined;
  if (opts.workers) {
    host = await startHostWorker({ host: 'hosta', redisUrl: redis.url, repoUrl, passphrase: PASSPHRASE, restoreRoots: [restoreRoot], stateDir: join(dir, 'state'), logger, progressIntervalMs: 100 });
    maintenance = await startMaintenanceWorker({
      redisUrl: redis.url, repoUrl, passphrase: PASSPHRASE, policiesDir, logger, inventory: () => config.vms,
      // The off-site repository of copy jobs: made at the first copy.
      copyTo: async () => {
        const url = join(dir, 'offsite');
        if (!existsSync(join(url, 'config'))) await Repository.init(new LocalStorage(url), OFFSITE_PASSPHRASE, { kdf: 'weak' });
        return { url, passphrase: OFFSITE_PASSPHRASE };
      },
    });
  }

  const call: Fixture['call'] = async (method, path, o = {}) => {
    const headers: Record<string, string> = { ...o.headers };
    if (o.role) headers.authorization = `Bearer ${TOKENS[o.role]}`;
    if (o.body !== undefined) headers['content-type'] ??= 'application/json';
    const init: RequestInit = { method, headers };
    if (o.body !== undefined) init.body = typeof o.body === 'string' ? o.body : JSON.stringify(o.body);
    const r = await api.app.request(path, init);
    const type = r.headers.get('content-type') ?? '';
    const body = type.includes('json') ? await r.json() : Buffer.from(await r.arrayBuffer());
    return { status: r.status, body, headers: r.headers };
  };
  const finished = (jobId: string) => waitFor(`job ${jobId} to finish`, async () => {
    const r = await call('GET', `/v1/jobs/${encodeURIComponent(jobId)}`, { role: 'viewer' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.state === 'completed' || r.body.state === 'failed' ? r.body : undefined;
  }, 60_000, undefined, 50);

  return {
    dir, api, redis, repoUrl, webDisk, restoreRoot, policiesDir, clock, call, finished,
    async close() {
      await host?.close();
      await maintenance?.close();
      await api.close();
      await closeRedis(producer);
      await redis.stop();
      await tmp.cleanup();
    },
  };
}

/** Backs up VM web through the API and waits for it: the new backup's id. */
export async function backupWeb(f: Fixture, labels: string[] = []): Promise<string> {
  const r = await f.call('POST', '/v1/vms/web/backups', { role: 'operator', body: { labels } });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const done = await f.finished(r.body.job.id);
  assert.equal(done.state, 'completed', done.error);
  return done.result.id as string;
}

/**
 * Backups as the API lists them once `check` accepts them: the API's catalogue is a
 * cache refreshed at most every 2 s, so a change made by a worker shows within that.
 */
export async function listedBackups(f: Fixture, query: string, check: (items: any[]) => boolean): Promise<any[]> {
  let last: any[] = [];
  try {
    return await waitFor('the backup listing', async () => {
      last = (await f.call('GET', `/v1/backups${query}`, { role: 'viewer' })).body.items;
      return check(last) ? last : undefined;
    }, 5000);
  } catch {
    assert.fail(`the listing never matched: ${JSON.stringify(last.map((b) => b.id))}`);
  }
}

/** An ApiError answer: its status and code, and its message matching `message`. */
export function assertError(r: { status: number; body: any }, status: number, code: string, message?: RegExp): void {
  assert.equal(r.status, status, JSON.stringify(r.body));
  assert.equal(r.body?.error?.code, code, JSON.stringify(r.body));
  if (message) assert.match(r.body.error.message, message);
}

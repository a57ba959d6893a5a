/**
 * Status and health as operators see them, with real processes: `vmvault serve`, a
 * `vmvault worker` for hosta (none for hostb), a redis-server, real qcow2 images. A
 * backup, a failing backup and a job for the host without a worker are made, then
 * GET /v1/status, `vmvault status` (text and --json) and /v1/health are checked
 * against them; a worker's heartbeat goes when it stops.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { liveWorkers } from '../../src/queue/heartbeat.js';
import { cli } from '../helpers/cli.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { BASE_ENV, stopProc, waitFor } from '../helpers/procs.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startService, type TestService } from '../helpers/service.js';

const TOKENS = { viewer: 'viewer-token-status-0123', operator: 'operator-token-status-0123' } as const;
const MiB = 1024 * 1024;
const DAY = 24 * 3600 * 1000;

let redis: TestRedis;
let dir: TempDir;
let service: TestService | undefined;
const output = () => service?.output() ?? '';

async function call(method: string, path: string, role?: keyof typeof TOKENS, body?: unknown): Promise<{ status: number; body: any }> {
  const headers: Record<string, string> = {};
  if (role) headers.authorization = `Bearer ${TOKENS[role]}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const r = await fetch(`${service!.api}${path}`, { method, headers, ...(body !== undefined ? { body: JSON.stringify(body) } : {}) });
  const text = await r.text();
  try { return { status: r.status, body: JSON.parse(text) }; } catch { return { status: r.status, body: text }; }
}

const finished = (id: string) => waitFor(`job ${id}`, async () => {
  const j = (await call('GET', `/v1/jobs/${id}`, 'viewer')).body;
  return j.state === 'completed' || j.state === 'failed' ? j : undefined;
}, 60_000, output);

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-status-');
  const disk = await makeImage(dir.path, 'web.qcow2', 'qcow2', 16 * MiB, [{ offset: 0, length: 2 * MiB, pattern: 0x5a }]);
  const late = await makeImage(dir.path, 'late.qcow2', 'qcow2', 8 * MiB);
  const other = await makeImage(dir.path, 'db.qcow2', 'qcow2', 8 * MiB);
  // The policy was first seen three days ago: a VM it selects with no backup since is overdue.
  const conn = createRedis(redis.url, 'producer');
  await conn.set('vmvault:policy-first-seen:nightly', String(Date.now() - 3 * DAY));
  await closeRedis(conn);
  service = await startService({
    dir: dir.path, redisUrl: redis.url, passphrase: 'status test passphrase', tokens: TOKENS, workers: ['hosta'],
    hosts: ['hostb: { restoreRoots: [] }'],
    vms: [
      `{ name: web, host: hosta, disks: [{ path: ${JSON.stringify(disk)} }] }`,
      `{ name: late, host: hosta, disks: [{ path: ${JSON.stringify(late)} }] }`,
      `{ name: broken, host: hosta, disks: [{ path: ${JSON.stringify(join(dir.path, 'missing.qcow2'))}, format: qcow2 }] }`,
      `{ name: db, host: hostb, disks: [{ path: ${JSON.stringify(other)} }] }`,
    ],
    policies: { 'nightly.yaml': 'name: nightly\nschedule: "0 2 * * *"\nselect: { vms: [web, late] }\nretention: { keepLast: 7 }\n' },
    env: { VMVAULT_HEARTBEAT_MS: '300' },
  });
});

after(async () => {
  await service?.stop();
  await redis?.stop();
  await dir?.cleanup();
});

describe('status', () => {
  let backupId: string;

  test('a backup, a failed backup and a job for a host without a worker show in GET /v1/status', async () => {
    const ok = await finished((await call('POST', '/v1/vms/web/backups', 'operator', {})).body.job.id);
    assert.equal(ok.state, 'completed', ok.error);
    backupId = ok.result.id;
    const bad = await finished((await call('POST', '/v1/vms/broken/backups', 'operator', {})).body.job.id);
    assert.equal(bad.state, 'failed');
    assert.equal((await call('POST', '/v1/vms/db/backups', 'operator', {})).status, 202);

    assert.equal((await call('GET', '/v1/status')).status, 401);
    const r = await call('GET', '/v1/status', 'viewer');
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const s = r.body;
    assert.ok(Math.abs(Date.parse(s.generatedAt) - Date.now()) < 60_000);
    assert.equal(s.policies.length, 1);
    assert.equal(s.policies[0].name, 'nightly');
    assert.equal(s.policies[0].schedule, '0 2 * * *');
    const next = Date.parse(s.policies[0].nextRun);
    assert.ok(next > Date.now() && next <= Date.now() + DAY, s.policies[0].nextRun);
    assert.equal(new Date(next).getHours(), 2);

    const vm = (name: string) => s.vms.find((v: any) => v.name === name);
    assert.deepEqual(s.vms.map((v: any) => v.name), ['web', 'late', 'broken', 'db']);
    const web = vm('web');
    assert.equal(web.host, 'hosta');
    assert.equal(web.policy, 'nightly');
    assert.equal(web.nextRun, s.policies[0].nextRun);
    assert.equal(web.lastBackup.id, backupId);
    assert.equal(web.lastBackup.sizeBytes, 16 * MiB);
    assert.equal(web.lastBackup.uploadedBytes, ok.result.stats.bytesUploaded);
    assert.ok(web.lastBackup.uploadedBytes > 0);
    assert.equal(web.lastBackup.mode, 'full');
    assert.equal(web.lastBackup.verification, null);
    assert.equal(web.lastSuccessAt, web.lastBackup.time);
    assert.equal(web.lastFailure, null);
    assert.equal(web.overdue, false, 'backed up just now');
    // Selected by a policy first seen three days ago and never backed up: a slot was missed.
    assert.equal(vm('late').overdue, true);
    assert.equal(vm('late').lastBackup, null);
    const broken = vm('broken');
    assert.equal(broken.policy, null);
    assert.equal(broken.overdue, false, 'no policy selects it');
    assert.equal(broken.lastFailure.code, 'NOT_FOUND');
    assert.match(broken.lastFailure.message, /missing\.qcow2/);
    assert.equal(broken.lastFailure.at, bad.finishedAt);

    const hosta = s.hosts.find((h: any) => h.host === 'hosta');
    const hostb = s.hosts.find((h: any) => h.host === 'hostb');
    assert.equal(hosta.online, true);
    assert.equal(hosta.workers.length, 1);
    assert.equal(hosta.workers[0].pid, service!.workers.get('hosta')!.pid);
    assert.ok(Date.now() - Date.parse(hosta.workers[0].lastSeen) < 5000);
    assert.deepEqual(hosta.queue, { waiting: 0, active: 0, delayed: 0, failed: 1 });
    assert.equal(hostb.online, false);
    assert.deepEqual(hostb.workers, []);
    assert.deepEqual(hostb.queue, { waiting: 1, active: 0, delayed: 0, failed: 0 });
    assert.deepEqual(s.unreadableBackups, []);
  });

  test('health is degraded, with the reason, while a host has queued jobs and no live worker', async () => {
    const r = await fetch(`${service!.api}/v1/health`);
    assert.equal(r.status, 503);
    const h = await r.json() as any;
    assert.equal(h.status, 'degraded');
    assert.equal(h.redis, 'ok');
    assert.match(h.reason, /host "hostb" has 1 queued job\(s\) and no live worker/);
  });

  test('vmvault status prints the same, readably and as JSON', async () => {
    const env = { ...BASE_ENV, VMVAULT_CONFIG: service!.configFile };
    const j = await cli(['status', '--json'], env);
    assert.equal(j.code, 0, j.stderr);
    const s = JSON.parse(j.stdout);
    const api = (await call('GET', '/v1/status', 'viewer')).body;
    const drop = (x: any) => ({ ...x, generatedAt: undefined, hosts: x.hosts.map((h: any) => ({ ...h, workers: h.workers.map((w: any) => ({ ...w, lastSeen: undefined })) })) });
    assert.deepEqual(drop(s), drop(api));
    const t = await cli(['status'], env);
    assert.equal(t.code, 0, t.stderr);
    assert.match(t.stdout, /^Policies\n {2}NAME +SCHEDULE +NEXT RUN\n {2}nightly +0 2 \* \* \* +in \d+[smh]\n/);
    assert.match(t.stdout, /\n {2}late +hosta +nightly +- .*OVERDUE\n/);
    assert.match(t.stdout, /\n {2}web +hosta +nightly +\d+s ago +16\.0 MiB .*full .*ok\n/);
    assert.match(t.stdout, /broken: last failure \d+s ago \(NOT_FOUND\): .*missing\.qcow2/);
    assert.match(t.stdout, /\n {2}hostb +OFFLINE +1 +0 +0 +0$/);
  });

  test('a backup whose manifest cannot be read: in GET /v1/status, the listing and vmvault status, with what to do; listed again once put back', async () => {
    const file = join(service!.repoUrl, 'backups', backupId);
    const good = await readFile(file);
    const bad = Buffer.from(good);
    bad[Math.floor(bad.length / 2)]! ^= 0x40;
    await writeFile(file, bad);
    try {
      // The API's catalogue is refreshed at most every 2 s.
      const s = await waitFor('the status to count it', async () => {
        const b = (await call('GET', '/v1/status', 'viewer')).body;
        return b.unreadableBackups.length ? b : undefined;
      }, 15_000, output);
      assert.equal(s.unreadableBackups.length, 1);
      const u = s.unreadableBackups[0];
      assert.equal(u.id, backupId);
      assert.equal(u.kind, 'damaged');
      assert.match(u.problem, new RegExp(`backups/${backupId}`));
      assert.match(u.advice, new RegExp(`put a good copy of backups/${backupId} back .*"vmvault repair --remove" deletes it.*gc deletes no chunk`));
      assert.equal(s.vms.find((v: any) => v.name === 'web').lastBackup, null, 'in no VM\'s figures');

      const listed = (await call('GET', '/v1/backups', 'viewer')).body;
      assert.deepEqual(listed.items.map((b: any) => b.id), []);
      assert.deepEqual(listed.unreadable, [u]);
      // Whatever the filters: an unreadable manifest's VM is unknown.
      assert.deepEqual((await call('GET', '/v1/backups?vm=late', 'viewer')).body.unreadable, [u]);

      const env = { ...BASE_ENV, VMVAULT_CONFIG: service!.configFile };
      const t = await cli(['status'], env);
      assert.equal(t.code, 0, t.stderr);
      assert.match(t.stdout, new RegExp(`\\nBackups that cannot be read \\(1\\).*gc deletes no chunk.*\\n {2}${backupId.slice(0, 12)} DAMAGED: .*backups/${backupId}.*\\n {4}what to do: put a good copy`));
      assert.deepEqual(JSON.parse((await cli(['status', '--json'], env)).stdout).unreadableBackups, [u]);
    } finally {
      await writeFile(file, good);
    }
    const back = await waitFor('the backup to be listed again', async () => {
      const b = (await call('GET', '/v1/status', 'viewer')).body;
      return b.unreadableBackups.length === 0 ? b : undefined;
    }, 15_000, output);
    assert.equal(back.vms.find((v: any) => v.name === 'web').lastBackup.id, backupId);
    assert.deepEqual((await call('GET', '/v1/backups', 'viewer')).body.unreadable, []);
  });

  test('a stopped worker leaves no heartbeat', async () => {
    const conn = createRedis(redis.url, 'producer');
    try {
      assert.equal((await liveWorkers(conn)).length, 1);
      await stopProc(service!.workers.get('hosta')!);
      assert.deepEqual(await liveWorkers(conn), []);
      const s = (await call('GET', '/v1/status', 'viewer')).body;
      assert.equal(s.hosts.find((h: any) => h.host === 'hosta').online, false);
    } finally {
      await closeRedis(conn);
    }
  });
});

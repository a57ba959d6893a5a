/**
 * GET /metrics after real work: `vmvault serve` and a `vmvault worker` (separate
 * processes, so the series cannot come from the worker's memory), a redis-server and
 * a directory repository. A backup, a failed backup and a gc are made; the exposition
 * must parse strictly and carry the per-VM series with the values the jobs reported.
 * The example alert rules must parse and name only series that /metrics exports.
 */
import assert from 'node:assert/strict';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { parse as parseYaml } from 'yaml';
import { dedupRatio } from '../../src/ops/metrics.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { parsePrometheusText, sampleValue, type Family } from '../helpers/prom-text.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startService, type TestService } from '../helpers/service.js';

const TOKENS = { viewer: 'viewer-token-metrics-0123', operator: 'operator-token-metrics-0123', admin: 'admin-token-metrics-0123' } as const;
const MiB = 1024 * 1024;
const RULES = fileURLToPath(new URL('../../../deploy/prometheus/alerts.yml', import.meta.url));

let redis: TestRedis;
let dir: TempDir;
let service: TestService | undefined;
const output = () => service?.output() ?? '';

async function call(method: string, path: string, role?: keyof typeof TOKENS, body?: unknown): Promise<{ status: number; text: string; type: string | null }> {
  const headers: Record<string, string> = {};
  if (role) headers.authorization = `Bearer ${TOKENS[role]}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const r = await fetch(`${service!.api}${path}`, { method, headers, ...(body !== undefined ? { body: JSON.stringify(body) } : {}) });
  return { status: r.status, text: await r.text(), type: r.headers.get('content-type') };
}
const json = async (method: string, path: string, role: keyof typeof TOKENS, body?: unknown) => JSON.parse((await call(method, path, role, body)).text);
const finished = (id: string) => waitFor(`job ${id}`, async () => {
  const j = await json('GET', `/v1/jobs/${id}`, 'viewer');
  return j.state === 'completed' || j.state === 'failed' ? j : undefined;
}, 60_000, output);

async function dirBytes(d: string): Promise<number> {
  let n = 0;
  for (const e of await readdir(d, { withFileTypes: true })) n += e.isDirectory() ? await dirBytes(join(d, e.name)) : (await stat(join(d, e.name))).size;
  return n;
}

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-metrics-');
  const disk = await makeImage(dir.path, 'web.qcow2', 'qcow2', 32 * MiB, [
    { offset: 0, length: 4 * MiB, pattern: 0x11 }, { offset: 8 * MiB, length: 4 * MiB, pattern: 0x11 }, { offset: 16 * MiB, length: 1 * MiB, pattern: 0x22 },
  ]);
  service = await startService({
    dir: dir.path, redisUrl: redis.url, passphrase: 'metrics test passphrase', tokens: TOKENS, workers: ['hosta'],
    vms: [
      `{ name: web, host: hosta, disks: [{ path: ${JSON.stringify(disk)} }] }`,
      `{ name: broken, host: hosta, disks: [{ path: ${JSON.stringify(join(dir.path, 'missing.qcow2'))}, format: qcow2 }] }`,
    ],
  });
});

after(async () => {
  await service?.stop();
  await redis?.stop();
  await dir?.cleanup();
});

describe('metrics', () => {
  let families: Map<string, Family>;
  let backup: any;

  test('/metrics needs a viewer token and parses strictly after a backup, a failed backup and a gc', async () => {
    backup = await finished((await json('POST', '/v1/vms/web/backups', 'operator', {})).job.id);
    assert.equal(backup.state, 'completed', backup.error);
    const bad = await finished((await json('POST', '/v1/vms/broken/backups', 'operator', {})).job.id);
    assert.equal(bad.state, 'failed');
    const gc = await finished((await json('POST', '/v1/maintenance/gc', 'admin', {})).job.id);
    assert.equal(gc.state, 'completed', gc.error);

    assert.equal((await call('GET', '/metrics')).status, 401);
    const r = await call('GET', '/metrics', 'viewer');
    assert.equal(r.status, 200, r.text);
    assert.match(r.type ?? '', /^text\/plain; version=0\.0\.4/);
    families = parsePrometheusText(r.text);
    for (const f of families.values()) assert.ok(f.help && f.type, `${f.name} has HELP and TYPE`);
  });

  test('the per-VM series carry what the backup job reported', () => {
    const s = backup.result.stats;
    const vm = { vm: 'web' };
    assert.equal(sampleValue(families, 'vmvault_vm_last_success_timestamp_seconds', { ...vm, host: 'hosta' }), Date.parse(backup.result.time) / 1000);
    assert.equal(sampleValue(families, 'vmvault_vm_backups', vm), 1);
    assert.equal(sampleValue(families, 'vmvault_vm_backups', { vm: 'broken' }), 0);
    assert.equal(sampleValue(families, 'vmvault_vm_last_success_timestamp_seconds', { vm: 'broken' }), undefined, 'no backup, no time');
    assert.equal(sampleValue(families, 'vmvault_backup_duration_seconds', vm), s.seconds);
    assert.equal(sampleValue(families, 'vmvault_backup_read_bytes', vm), s.bytesRead);
    assert.ok(s.bytesRead >= 9 * MiB, `read ${s.bytesRead}`);
    assert.equal(sampleValue(families, 'vmvault_backup_uploaded_bytes', vm), s.bytesUploaded);
    assert.equal(sampleValue(families, 'vmvault_backup_size_bytes', vm), 32 * MiB);
    // Two identical 4 MiB chunks: the second is deduplicated, so one of the three non-zero chunks was not uploaded.
    assert.equal(s.chunksNew, 2);
    assert.equal(s.chunksReused, 1);
    assert.equal(sampleValue(families, 'vmvault_backup_dedup_ratio', vm), dedupRatio(s));
    assert.ok(Math.abs(dedupRatio(s) - 1 / 3) < 1e-9);
    assert.equal(sampleValue(families, 'vmvault_vm_backups_damaged', vm), 0);
    assert.equal(sampleValue(families, 'vmvault_vm_overdue', vm), 0);
    for (const kind of ['damaged', 'other-version', 'stray']) assert.equal(sampleValue(families, 'vmvault_backups_unreadable', { kind }), 0, kind);
  });

  test('failures by code, queue depths, workers and the repository size from gc', async () => {
    assert.equal(sampleValue(families, 'vmvault_jobs_failed', { queue: 'vmvault-host-hosta', kind: 'backup', code: 'NOT_FOUND' }), 1);
    assert.equal(sampleValue(families, 'vmvault_queue_jobs', { queue: 'vmvault-host-hosta', state: 'failed' }), 1);
    assert.equal(sampleValue(families, 'vmvault_queue_jobs', { queue: 'vmvault-host-hosta', state: 'waiting' }), 0);
    assert.equal(sampleValue(families, 'vmvault_queue_jobs', { queue: 'vmvault-maintenance', state: 'active' }), 0);
    assert.equal(sampleValue(families, 'vmvault_workers_online', { host: 'hosta' }), 1);
    assert.equal(sampleValue(families, 'vmvault_host_vms', { host: 'hosta' }), 2);
    assert.equal(sampleValue(families, 'vmvault_repository_size_bytes'), await dirBytes(join(service!.repoUrl, 'chunks')));
    assert.equal(sampleValue(families, 'vmvault_repository_chunks'), 2);
    assert.ok(sampleValue(families, 'vmvault_gc_last_timestamp_seconds')! <= Date.now() / 1000);
  });

  test('a backup whose manifest cannot be read is counted by kind, and in no VM\'s series', async () => {
    const file = join(service!.repoUrl, 'backups', backup.result.id);
    const good = await readFile(file);
    await writeFile(file, good.subarray(0, good.length - 7)); // cut short
    try {
      const now = await waitFor('the unreadable backup to be counted', async () => {
        const f = parsePrometheusText((await call('GET', '/metrics', 'viewer')).text);
        return sampleValue(f, 'vmvault_backups_unreadable', { kind: 'damaged' }) === 1 ? f : undefined;
      }, 15_000, output);
      assert.equal(sampleValue(now, 'vmvault_backups_unreadable', { kind: 'stray' }), 0);
      assert.equal(sampleValue(now, 'vmvault_vm_backups', { vm: 'web' }), 0);
    } finally {
      await writeFile(file, good);
    }
    await waitFor('the backup to be counted again', async () => {
      const f = parsePrometheusText((await call('GET', '/metrics', 'viewer')).text);
      return sampleValue(f, 'vmvault_backups_unreadable', { kind: 'damaged' }) === 0 && sampleValue(f, 'vmvault_vm_backups', { vm: 'web' }) === 1 ? f : undefined;
    }, 15_000, output);
  });

  test('the example alert rules parse and name only exported series', async () => {
    const doc = parseYaml(await readFile(RULES, 'utf8')) as { groups: { name: string; rules: { alert: string; expr: string; for?: string }[] }[] };
    const rules = doc.groups.flatMap((g) => g.rules);
    const names = rules.map((r) => r.alert);
    for (const wanted of ['VmvaultNoRecentBackup', 'VmvaultWorkerDown', 'VmvaultVerifyFoundDamage', 'VmvaultBackupUnreadable']) assert.ok(names.includes(wanted), wanted);
    assert.match(rules.find((r) => r.alert === 'VmvaultNoRecentBackup')!.expr, /vmvault_vm_last_success_timestamp_seconds > 26 \* 3600/);
    for (const r of rules) {
      assert.equal(typeof r.expr, 'string', `${r.alert} has an expr`);
      if (r.for !== undefined) assert.match(r.for, /^\d+[smhd]$/);
      const used = r.expr.match(/vmvault_[a-z_]+/g) ?? [];
      assert.ok(used.length > 0, `${r.alert} uses a vmvault series`);
      for (const u of used) assert.ok(families.has(u), `${r.alert} uses ${u}, which /metrics exports`);
    }
  });
});

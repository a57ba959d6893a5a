/**
 * POST /v1/backups/{id}/exports against a real redis-server, a real host worker and a
 * directory repository: the worker starts the NBD export and the answer says where
 * to connect (qemu-img reads the disk back from it) and until when; the export stops
 * at its TTL; addresses other than loopback or the configured one, and viewers, are
 * refused.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { pino } from 'pino';
import { createApi, type Api } from '../../../src/api/app.js';
import { parseConfig } from '../../../src/config/load.js';
import { backupVm } from '../../../src/vm/drivers.js';
import { closeRedis, createRedis } from '../../../src/queue/connection.js';
import { Repository } from '../../../src/repo/repository.js';
import { LocalStorage } from '../../../src/storage/local.js';
import { startHostWorker, type HostWorker } from '../../../workers/host-agent.js';
import { makeImage, tempDir, type TempDir } from '../../helpers/images.js';
import { startRedis, type TestRedis } from '../../helpers/redis.js';

const MiB = 1024 * 1024;
const PASS = 'api export passphrase';
const TOKENS = { operator: 'operator-token-0123456789', viewer: 'viewer-token-0123456789' };
const sha = (t: string) => createHash('sha256').update(t).digest('hex');
let redis: TestRedis;
let dir: TempDir;
let api: Api;
let worker: HostWorker;
let connection: ReturnType<typeof createRedis>;
let repo: Repository;
let image: string;
let backupId: string;

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-api-export-');
  repo = await Repository.init(new LocalStorage(`${dir.path}/repo`), PASS, { kdf: 'weak', chunkSize: MiB });
  image = await makeImage(dir.path, 'web.raw', 'raw', 8 * MiB, [{ offset: 2 * MiB, length: MiB, pattern: 0x61 }]);
  backupId = (await backupVm(repo, { vm: 'web', driver: 'image', disks: [{ path: image, name: 'root', format: 'raw' }] })).manifest.id;
  const config = parseConfig([
    'host: hv1',
    'api:',
    `  tokens: [{ name: op, role: operator, sha256: ${sha(TOKENS.operator)} }, { name: dash, role: viewer, sha256: ${sha(TOKENS.viewer)} }]`,
    'hosts:',
    '  hv1: { restoreRoots: [/tmp], exportAddress: 127.0.0.2 }',
    `vms: [{ name: web, disks: [{ path: ${JSON.stringify(image)}, name: root, format: raw }] }]`,
    '',
  ].join('\n'), `${dir.path}/vmvault.yaml`, { host: 'hv1' });
  connection = createRedis(redis.url, 'producer');
  api = createApi({ config, repo, redis: connection, log: pino({ level: 'silent' }) });
  worker = await startHostWorker({
    host: 'hv1', redisUrl: redis.url, repoUrl: `${dir.path}/repo`, passphrase: PASS, logger: pino({ level: 'silent' }),
    exportAddress: config.hosts.hv1!.exportAddress!,
  });
});

after(async () => {
  await worker?.close();
  await api?.close();
  if (connection) await closeRedis(connection);
  await redis?.stop();
  await dir?.cleanup();
});

async function post(body: unknown, token = TOKENS.operator): Promise<{ status: number; body: any }> {
  const r = await api.app.request(`/v1/backups/${backupId.slice(0, 12)}/exports`, {
    method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
}

test('an operator gets an NBD export on loopback that qemu-img reads back; it stops at its TTL', async () => {
  const started = Date.now();
  const r = await post({ disk: 'root', ttl: '1min' });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  assert.match(r.body.uri, /^nbd:\/\/127\.0\.0\.1:\d+\/root\.[0-9a-f]{32}$/);
  assert.equal(r.body.size, 8 * MiB);
  assert.equal(r.body.backup, backupId);
  const expires = Date.parse(r.body.expiresAt);
  assert.ok(expires >= started + 59_000 && expires <= Date.now() + 61_000, r.body.expiresAt);
  await execa('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', r.body.uri, image]);
  // Viewers read job listings: the export's job shows the URI without its secret.
  const job = await api.app.request(`/v1/jobs/${encodeURIComponent(r.body.job)}`, { headers: { authorization: `Bearer ${TOKENS.viewer}` } });
  assert.equal(job.status, 200);
  const view = await job.json() as { result: { uri: string } };
  assert.equal(view.result.uri, r.body.uri.replace(/\.[0-9a-f]{32}$/, '.…'));
  const listed = await (await api.app.request('/v1/jobs', { headers: { authorization: `Bearer ${TOKENS.viewer}` } })).text();
  assert.ok(!listed.includes(r.body.uri.split('/').pop()!), 'no listing holds the secret');

  const short = await post({ disk: 'root', ttl: '1min', address: '127.0.0.2' });
  assert.equal(short.status, 201, JSON.stringify(short.body));
  assert.match(short.body.uri, /^nbd:\/\/127\.0\.0\.2:\d+\/root\.[0-9a-f]{32}$/, 'the configured address is allowed');
});

test('a TTL ends the export: the port stops answering', async () => {
  // The smallest TTL a duration can say is a minute; the worker's timer is what ends it, so drive one directly.
  const { HostExports } = await import('../../../workers/export-job.js');
  const exports = new HostExports(repo, pino({ level: 'silent' }), undefined);
  const r = await exports.start({ backupId, disk: 'root', address: '127.0.0.1', ttlSeconds: 1 });
  await execa('qemu-img', ['info', '-f', 'raw', r.uri]);
  await sleep(1500);
  const after = await execa('qemu-img', ['info', '-f', 'raw', r.uri], { reject: false });
  assert.notEqual(after.exitCode, 0, 'the export is gone after its TTL');
  await exports.closeAll();
});

test('other addresses, unknown disks, bad TTLs and viewers are refused', async () => {
  const wide = await post({ disk: 'root', address: '0.0.0.0' });
  assert.equal(wide.status, 400);
  assert.match(wide.body.error.message, /address "0\.0\.0\.0" is not allowed: exports listen on 127\.0\.0\.1, ::1 or 127\.0\.0\.2/);
  const disk = await post({ disk: 'nope' });
  assert.equal(disk.status, 404);
  assert.match(disk.body.error.message, /has no disk "nope"; its disks are: root/);
  const ttl = await post({ disk: 'root', ttl: '2d' });
  assert.equal(ttl.status, 400);
  assert.match(ttl.body.error.message, /at most 24h/);
  const viewer = await post({ disk: 'root' }, TOKENS.viewer);
  assert.equal(viewer.status, 403);
});

/**
 * Verification states in the API, in-process (app.request) against a real redis-server
 * and a real directory repository: never verified, damaged after a verify that found a
 * corrupt chunk, ok once a backup has uploaded that chunk again.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { createApi, type Api } from '../../src/api/app.js';
import { parseConfig } from '../../src/config/load.js';
import { backupVm } from '../../src/vm/drivers.js';
import { verify } from '../../src/pipeline/verify.js';
import { readDrills, withDrill, writeDrill } from '../../src/repo/health.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { chunkName } from '../../src/repo/chunk.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const MiB = 1024 * 1024;
const TOKEN = 'viewer-token-0123456789';
let redis: TestRedis;
let dir: TempDir;
let api: Api;
let connection: ReturnType<typeof createRedis>;
let repo: Repository;
let storage: LocalStorage;
let image: string;

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-api-verify-');
  storage = new LocalStorage(`${dir.path}/repo`);
  repo = await Repository.init(storage, 'api verify passphrase', { kdf: 'weak', chunkSize: MiB });
  image = await makeImage(dir.path, 'web', 'qcow2', 4 * MiB, [{ offset: 0, length: 2 * MiB, pattern: 0x61 }]);
  const config = parseConfig([
    'host: hv1',
    'api:',
    `  tokens: [{ name: dash, role: viewer, sha256: ${createHash('sha256').update(TOKEN).digest('hex')} }]`,
    `vms: [{ name: web, disks: [{ path: ${JSON.stringify(image)}, name: root }] }]`,
    '',
  ].join('\n'), `${dir.path}/vmvault.yaml`, { host: 'hv1' });
  connection = createRedis(redis.url, 'producer');
  api = createApi({ config, repo, redis: connection, log: pino({ level: 'silent' }) });
});

after(async () => {
  await api?.close();
  if (connection) await closeRedis(connection);
  await redis?.stop();
  await dir?.cleanup();
});

async function get(path: string): Promise<any> {
  const r = await api.app.request(path, { headers: { authorization: `Bearer ${TOKEN}` } });
  assert.equal(r.status, 200, await r.clone().text());
  return r.json();
}

/** Polls until `check` passes: the API's listings are cached for up to two seconds. */
async function eventually(check: () => Promise<void>): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      return await check();
    } catch (err) {
      if (i >= 40) throw err;
      await sleep(100);
    }
  }
}

test('backups, one backup and a VM\'s last backup carry the verification state, and it heals', async () => {
  const first = (await backupVm(repo, { vm: 'web', driver: 'image', disks: [{ path: image, name: 'root' }] })).manifest;
  const page = await get('/v1/backups');
  assert.equal(page.items[0].id, first.id);
  assert.equal(page.items[0].verification, null, 'never verified');

  const chunk = first.disks[0]!.chunks[1]!;
  const bytes = Buffer.from(await storage.get(chunkName(chunk)));
  bytes[40]! ^= 0xff;
  await storage.put(chunkName(chunk), bytes);
  const report = await verify(repo, { readData: true });
  assert.equal(report.ok, false);

  await eventually(async () => {
    const damaged = { status: 'damaged', damagedDisks: ['root'], damagedChunks: 1, readData: 'all' };
    const listed = (await get('/v1/backups')).items[0].verification;
    assert.deepEqual({ ...listed, lastVerified: undefined }, { ...damaged, lastVerified: undefined });
    assert.ok(!Number.isNaN(Date.parse(listed.lastVerified)));
    assert.deepEqual((await get(`/v1/backups/${first.id.slice(0, 8)}`)).verification, listed);
    assert.deepEqual((await get('/v1/vms/web')).lastBackup.verification, listed);
  });

  const second = (await backupVm(repo, { vm: 'web', driver: 'image', disks: [{ path: image, name: 'root' }] })).manifest;
  assert.equal(second.stats.chunksNew, 1, 'the damaged chunk is uploaded again');
  await eventually(async () => {
    const items = (await get('/v1/backups')).items;
    assert.deepEqual(items.map((b: any) => b.id), [second.id, first.id]);
    assert.equal(items[1].verification.status, 'ok', 'healed');
    assert.equal(items[0].verification, null);
  });
  const doc = await get('/v1/openapi.json');
  assert.ok(doc.components.schemas.Verification, 'the state is in the OpenAPI document');
});

test('a restore drill\'s result is the verification state in the API: boot-verified with its date, then boot-failed with the reason; a damaged backup stays damaged', async () => {
  const b = (await backupVm(repo, { vm: 'web', driver: 'image', disks: [{ path: image, name: 'root' }] })).manifest;
  const drill = { backup: b.id, host: 'hv1', probe: 'serial "login:"', seconds: 3.2 };
  await writeDrill(repo, { ...drill, run: 'r1', time: '2026-11-30T10:00:00.000Z', status: 'boot-verified' });
  await eventually(async () => {
    const v = (await get(`/v1/backups/${b.id}`)).verification;
    assert.deepEqual(v, {
      status: 'boot-verified', lastVerified: '2026-11-30T10:00:00.000Z', readData: 'none', damagedDisks: [], damagedChunks: 0,
      boot: { status: 'boot-verified', time: '2026-11-30T10:00:00.000Z', host: 'hv1', probe: 'serial "login:"', seconds: 3.2 },
    });
  });
  await writeDrill(repo, { ...drill, run: 'r2', time: '2026-11-30T11:00:00.000Z', status: 'boot-failed', reason: '"login:" did not appear on the serial console within 300 s' });
  await eventually(async () => {
    const v = (await get('/v1/backups')).items.find((x: any) => x.id === b.id).verification;
    assert.equal(v.status, 'boot-failed');
    assert.equal(v.boot.reason, '"login:" did not appear on the serial console within 300 s');
  });
  assert.deepEqual([...(await readDrills(repo, new Set([b.id]))).values()].map((d) => d.record.run), ['r2'], 'the older drill record was replaced');
  assert.deepEqual(withDrill({ lastVerified: '2026-12-01T00:00:00.000Z', readData: 'all', status: 'damaged', damagedDisks: ['root'], damagedChunks: 1 },
    { ...drill, run: 'r3', time: '2026-11-30T12:00:00.000Z', status: 'boot-verified' })?.status, 'damaged');
});

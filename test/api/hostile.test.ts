/**
 * Inventory formats reach the worker: a raw disk whose guest wrote a qcow2 header
 * naming a host file, backed up through the HTTP API by a real `vmvault serve` and
 * `vmvault worker` over a real redis-server. Declared `format: raw`: the job backs it
 * up as raw and it restores identical. No format: the job fails naming the file, and
 * no backup of it exists.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { compareImages } from '../../src/disk/qemu.js';
import { cliJson } from '../helpers/cli.js';
import { hostSecret, trappedRawDisk } from '../helpers/hostile.js';
import { tempDir, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { startService, type TestService } from '../helpers/service.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const PASSWORD = 'hostile api passphrase';
const TOKEN = 'operator-token-hostile-0123456789';

let redis: TestRedis;
let dir: TempDir;
let api: string;
let repoUrl: string;
let disk: string;
let secret: { path: string; marker: string };
let service: TestService | undefined;
const output = () => service?.output() ?? '';

async function call(method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  const r = await fetch(`${api}${path}`, {
    method, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return { status: r.status, body: await r.json() };
}

async function backupThroughApi(vm: string): Promise<any> {
  const r = await call('POST', `/v1/vms/${vm}/backups`, {});
  assert.equal(r.status, 202, JSON.stringify(r.body));
  return waitFor(`the backup of ${vm}`, async () => {
    const j = (await call('GET', `/v1/jobs/${encodeURIComponent(r.body.job.id)}`)).body;
    return j.state === 'completed' || j.state === 'failed' ? j : undefined;
  }, 120_000, output, 50);
}

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-hostile-api-');
  secret = await hostSecret(dir.path);
  disk = await trappedRawDisk(dir.path, 'guest.raw', 'qcow2 backing file', secret.path);
  service = await startService({
    dir: dir.path, redisUrl: redis.url, passphrase: PASSWORD, tokens: { operator: TOKEN },
    vms: [
      `{ name: declared, disks: [{ path: ${JSON.stringify(disk)}, name: root, format: raw }] }`,
      `{ name: undeclared, disks: [{ path: ${JSON.stringify(disk)}, name: root }] }`,
    ],
  });
  api = service.api;
  repoUrl = service.repoUrl;
});

after(async () => {
  await service?.stop();
  await redis?.stop();
  await dir?.cleanup();
});

describe('inventory formats through the API', () => {
  test('format: raw is backed up as raw, identical, without a byte of the named host file', async () => {
    const job = await backupThroughApi('declared');
    assert.equal(job.state, 'completed', job.error);
    assert.equal(job.result.disks[0].format, 'raw');
    const env = { PATH: process.env.PATH, VMVAULT_REPOSITORY: repoUrl, VMVAULT_PASSWORD: PASSWORD };
    const out = await cliJson(['restore', job.result.id, '--to', join(dir.path, 'out'), '--format', 'raw'], env);
    const restored = out.files.find((f: any) => f.kind === 'disk').path;
    assert.ok((await compareImages(disk, restored, 'raw', 'raw')).identical);
    assert.equal((await readFile(restored)).indexOf(secret.marker), -1);
  });

  test('no format: the job fails naming the file, and nothing is committed', async () => {
    const job = await backupThroughApi('undeclared');
    assert.equal(job.state, 'failed');
    assert.ok(String(job.error).includes(`backing file "${secret.path}"`), job.error);
    assert.equal(job.attemptsMade, 1, 'a refused image is not retried');
    const list = await call('GET', '/v1/backups?vm=undeclared');
    assert.deepEqual(list.body.items, []);
  });
});

/**
 * Every read path on a repository that refuses writes, on both backends: a read-only
 * bind mount of the directory (chmod when not root), and S3 credentials that may not
 * write (a proxy answering AccessDenied to PUT and DELETE). Listing, show, restore
 * (byte-identical), verify and the API's signed link all work, with a warning that no
 * lock was taken; writers (backup, gc) fail saying why. And when S3 goes down during a
 * backup, the error shown is the upload's, not the lock clean-up's.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import { compareImages } from '../../src/disk/qemu.js';
import { parseConfig } from '../../src/config/load.js';
import { startApiServer } from '../../src/api/server.js';
import { makeImage } from '../helpers/images.js';
import { cli, cliJson } from '../helpers/cli.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { readOnlyDir } from '../helpers/read-only-dir.js';
import { startS3Proxy } from '../helpers/s3-proxy.js';
import { e2eFile, backupJson, envFor, initRepo, objects, PASSWORD, type Backend } from './harness.js';

const MiB = 1024 * 1024;
const { all, work } = await e2eFile('vmvault-ro-');
const TOKEN = 'read-only-test-token-0123456789';

let redis: TestRedis;
before(async () => { redis = await startRedis(); });
after(async () => { await redis?.stop(); });

/** The repository `url` as seen with rights to read only; `release` gives them back. */
async function readOnlyView(b: Backend, url: string): Promise<{ url: string; release(): Promise<void> }> {
  if (b.name === 'local') {
    const ro = await readOnlyDir(url);
    return { url: ro.path, release: ro.release };
  }
  const endpoint = /endpoint=([^&]+)/.exec(url)![1]!;
  const proxy = await startS3Proxy(endpoint, 'read-only');
  return { url: proxy.via(url), release: () => proxy.down() };
}

/** The disk through a signed link of the API, opened on `url`, as a host with no worker would get it. */
async function diskThroughSignedLink(url: string, backupId: string, disk: string, file: string): Promise<void> {
  const config = parseConfig(`api:\n  tokens:\n    - { name: t, role: operator, sha256: ${createHash('sha256').update(TOKEN).digest('hex')} }\n`, 'test.yaml', { host: 'h' });
  const server = await startApiServer(config, {
    redisUrl: redis.url, repository: { url, passphrase: PASSWORD }, logger: pino({ level: 'silent' }), listen: '127.0.0.1:0',
  });
  try {
    const link = await fetch(`${server.url}/v1/backups/${backupId}/disks/${disk}/links`, {
      method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: '{}',
    });
    assert.equal(link.status, 201, await link.clone().text());
    const got = await fetch(((await link.json()) as { url: string }).url);
    assert.equal(got.status, 200);
    await writeFile(file, Buffer.from(await got.arrayBuffer()));
  } finally {
    await server.stop();
  }
}

for (const b of all) {
  describe(`a read-only repository on the ${b.name} backend`, () => {
    test('backups, show, restore, verify and a signed link work without a lock, with a warning; backup and gc say it is read-only', async () => {
      const { repo, env } = await initRepo(b);
      const src = await makeImage(work, `ro-${b.name}.qcow2`, 'qcow2', 24 * MiB, [
        { offset: 0, length: 3 * MiB, pattern: 0x31 }, { offset: 9 * MiB, length: 5 * MiB, pattern: 0x32 }, { offset: 23 * MiB, length: MiB, pattern: 0x33 },
      ]);
      const made = await backupJson(env, 'ro', [src]);
      const before1 = await objects(repo);
      const view = await readOnlyView(b, repo);
      try {
        const roEnv = envFor(b, view.url);
        const listed = await cli(['backups', '--json'], roEnv);
        assert.equal(listed.code, 0, listed.stderr);
        assert.deepEqual(JSON.parse(listed.stdout).map((x: { id: string }) => x.id), [made.id]);
        assert.equal((await cliJson(['show', made.id.slice(0, 10)], roEnv)).id, made.id);

        const dir = join(work, `ro-out-${b.name}`);
        const restored = await cli(['restore', made.id, '--to', dir, '--json'], roEnv);
        assert.equal(restored.code, 0, restored.stderr);
        assert.match(restored.stderr, /warning: no lock was taken for restore: .*refuses writes \(read-only/);
        const disk = JSON.parse(restored.stdout).files.find((f: { kind: string }) => f.kind === 'disk');
        const cmp = await compareImages(src, disk.path, 'qcow2', 'qcow2');
        assert.ok(cmp.identical, cmp.output);

        const verified = await cli(['verify', '--read-data'], roEnv);
        assert.equal(verified.code, 0, verified.stdout + verified.stderr);
        assert.match(verified.stderr, /warning: no lock was taken for verify/);
        const quiet = await cli(['--no-lock', 'verify'], roEnv);
        assert.equal(quiet.code, 0, quiet.stderr);
        assert.doesNotMatch(quiet.stderr, /warning/, 'with --no-lock, as asked: no warning');

        const linked = join(work, `ro-link-${b.name}.raw`);
        await diskThroughSignedLink(view.url, made.id, made.disks[0].name, linked);
        const cmp2 = await compareImages(src, linked, 'qcow2', 'raw');
        assert.ok(cmp2.identical, cmp2.output);

        const refused = await cli(['backup', '--vm', 'ro', '--disk', src], roEnv);
        assert.equal(refused.code, 1);
        assert.match(refused.stderr, /error: backup of ro cannot run: the repository at .* is read-only for this process/);
        const gc = await cli(['gc'], roEnv);
        assert.equal(gc.code, 1);
        assert.match(gc.stderr, /error: garbage collection cannot run: .* is read-only/);
      } finally {
        await view.release();
      }
      assert.deepEqual(await objects(repo), before1, 'nothing was written');
    });

    test('--no-lock refuses any write, even where the repository could take it', async () => {
      const { repo, env } = await initRepo(b);
      const src = await makeImage(work, `nolock-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x41 }]);
      const made = await backupJson(env, 'nl', [src]);
      const before1 = await objects(repo);
      const r = await cli(['--no-lock', 'restore', made.id, '--to', join(work, `nolock-out-${b.name}`)], env);
      assert.equal(r.code, 0, r.stderr);
      const w = await cli(['--no-lock', 'backup', '--vm', 'nl', '--disk', src], env);
      assert.equal(w.code, 1);
      assert.match(w.stderr, /read-only for this process \(opened with --no-lock/);
      assert.deepEqual(await objects(repo), before1, 'no lock, nothing else either');
    });
  });
}

describe('S3 down in the middle of a backup', () => {
  test("the error shown is the upload's; the lock left behind is a warning", async () => {
    const b = all.find((x) => x.name === 's3')!;
    const { repo, env } = await initRepo(b);
    const proxy = await startS3Proxy(/endpoint=([^&]+)/.exec(repo)![1]!);
    proxy.onRequest = (method, path) => {
      if (method === 'PUT' && path.includes('/chunks/')) void proxy.down();
    };
    const src = await makeImage(work, 'down.qcow2', 'qcow2', 16 * MiB, [{ offset: 0, length: 16 * MiB, pattern: 0x51 }]);
    const r = await cli(['backup', '--vm', 'down', '--disk', src], envFor(b, proxy.via(repo)));
    assert.equal(r.code, 1, r.stderr);
    const error = r.stderr.split('\n').find((l) => l.includes('error:')) ?? '';
    // The chunk's upload, or the check whether another chunk is stored, whichever gives up first: both failed on S3.
    assert.match(error, /(put|stat) of object "chunks\//, r.stderr);
    assert.doesNotMatch(error, /locks\//, r.stderr);
    assert.match(r.stderr, /warning: the lock locks\/[0-9a-f]+ of backup of down could not be removed .*expires by itself/);
  });
});

/**
 * Ctrl-C during a backup to S3 over a slow link: the chunk uploads in flight are cut,
 * not waited for. A proxy in front of the S3 test server holds every chunk PUT for a
 * minute (a link on which each upload takes that long); the real CLI, with the real AWS
 * SDK, is sent SIGINT once uploads are under way. It must exit within seconds, say it was
 * interrupted, leave no lock and no manifest, and the proxy must see the held uploads
 * closed by the client. A backup run afterwards through the same repository completes
 * and restores identical (what the cut uploads may have left is only unreferenced).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compareImages } from '../../src/disk/qemu.js';
import { openStorage } from '../../src/storage/open.js';
import { cli, cliJson } from '../helpers/cli.js';
import { makeImage } from '../helpers/images.js';
import { start, waitFor } from '../helpers/procs.js';
import { startS3Server, type S3Server } from '../helpers/s3.js';
import { startS3Proxy, type ProxiedRequest } from '../helpers/s3-proxy.js';
import { PASSWORD } from './harness.js';

const KiB = 1024;
const CHUNK = 256 * KiB;
const CHUNKS = 24;
const HELD_MS = 60_000;

let s3: S3Server;
let work: string;
before(async () => {
  s3 = await startS3Server();
  work = await mkdtemp(join(tmpdir(), 'vmvault-s3-interrupt-'));
});
after(async () => {
  await s3?.stop();
  await rm(work, { recursive: true, force: true });
});

const isChunkPut = (r: ProxiedRequest) => r.method === 'PUT' && r.path.includes('/chunks/');

test('SIGINT during a backup to S3 cuts the chunk uploads in flight: out within seconds, nothing committed, no lock', async () => {
  const proxy = await startS3Proxy(s3.endpoint);
  try {
    const repo = proxy.via(s3.repoUrl('interrupt'));
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, ...s3.env, VMVAULT_REPOSITORY: repo, VMVAULT_PASSWORD: PASSWORD };
    const init = await cli(['init', '--kdf', 'weak', '--chunk-size', '256K'], env);
    assert.equal(init.code, 0, init.stderr);
    const src = await makeImage(work, 'slow.qcow2', 'qcow2', CHUNKS * CHUNK,
      Array.from({ length: CHUNKS }, (_, i) => ({ offset: i * CHUNK, length: CHUNK, pattern: i + 1 })));

    proxy.putDelayFor = (path) => (path.includes('/chunks/') ? HELD_MS : 0);
    const p = start(['backup', '--vm', 'slow', '--disk', src, '--json'], env);
    await waitFor('chunk uploads to be under way', () => proxy.log.filter(isChunkPut).length >= 2, 60_000, p.output);
    const at = Date.now();
    p.kill('SIGINT');
    const r = await p;
    const took = Date.now() - at;
    assert.notEqual(r.exitCode, 0, p.output());
    assert.ok(took < 15_000, `the backup took ${took} ms to stop (chunk uploads are held ${HELD_MS} ms)`);
    assert.match(p.output(), /the backup was interrupted \(SIGINT\): nothing was saved/);
    const held = proxy.log.filter(isChunkPut);
    console.log(`# s3 interrupt: stopped ${took} ms after SIGINT; ${held.length} chunk upload(s) were held, ${held.filter((h) => h.end !== undefined).length} closed`);
    await waitFor('the held uploads to be closed by the client', () => held.every((h) => h.end !== undefined && h.end - h.start < HELD_MS / 2), 5000, p.output);
    assert.ok(held.every((h) => h.status !== 200), 'no held upload was stored');

    proxy.putDelayFor = undefined;
    const storage = openStorage(s3.repoUrl('interrupt'));
    try {
      const names = async (prefix: string) => { const out: string[] = []; for await (const o of storage.list(prefix)) out.push(o.name); return out; };
      assert.deepEqual(await names('locks/'), [], 'no lock left');
      assert.deepEqual(await names('backups/'), [], 'nothing committed');
    } finally {
      await storage.close();
    }
    const made = await cliJson(['backup', '--vm', 'slow', '--disk', src], env);
    const restored = await cliJson(['restore', made.id, '--to', join(work, 'out')], env);
    const cmp = await compareImages(src, restored.files[0].path, 'qcow2', 'qcow2');
    assert.ok(cmp.identical, cmp.output);
  } finally {
    await proxy.down();
  }
});

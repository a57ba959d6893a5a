/**
 * Ctrl-C during a backup to S3, or a restore from it, over a slow link: the chunk
 * requests in flight are cut, not waited for. A proxy in front of the S3 test server
 * holds every chunk PUT (then GET) for a minute (a link on which each takes that long);
 * the real CLI, with the real AWS SDK, is sent SIGINT once they are under way. It must
 * exit within seconds, say it was interrupted, leave no lock and no manifest (no
 * restored file), and the proxy must see the held requests closed by the client. The
 * backup run afterwards through the same repository completes and restores identical
 * (what the cut uploads may have left is only unreferenced). A copy of it to another
 * repository, with the chunk GETs held, is cut the same way.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
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

test('SIGINT during a backup to S3, then a restore from it, cuts the chunk requests in flight: out within seconds, nothing committed or left', async () => {
  const proxy = await startS3Proxy(s3.endpoint);
  try {
    const repo = proxy.via(s3.repoUrl('interrupt'));
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, ...s3.env, VMVAULT_REPOSITORY: repo, VMVAULT_PASSWORD: PASSWORD };
    const init = await cli(['init', '--kdf', 'weak', '--chunk-size', '256K'], env);
    assert.equal(init.code, 0, init.stderr);
    const src = await makeImage(work, 'slow.qcow2', 'qcow2', CHUNKS * CHUNK,
      Array.from({ length: CHUNKS }, (_, i) => ({ offset: i * CHUNK, length: CHUNK, pattern: i + 1 })));

    /** Runs `args` with every chunk request of `method` held, and SIGINTs it once two are: it must stop within seconds, cutting them. */
    const interrupted = async (args: string[], method: 'PUT' | 'GET', what: string) => {
      const isHeld = (q: ProxiedRequest) => q.method === method && q.path.includes('/chunks/');
      proxy.delayFor = (m, path) => (m === method && path.includes('/chunks/') ? HELD_MS : 0);
      const since = proxy.log.length; // this command's requests only
      const mine = () => proxy.log.slice(since).filter(isHeld);
      const p = start(args, env);
      try {
        await waitFor(`chunk ${method}s to be under way`, () => mine().length >= 2, 60_000, p.output);
        const at = Date.now();
        p.kill('SIGINT');
        const r = await p;
        const took = Date.now() - at;
        assert.notEqual(r.exitCode, 0, p.output());
        assert.ok(took < 15_000, `the ${what} took ${took} ms to stop (chunk ${method}s are held ${HELD_MS} ms)`);
        assert.match(p.output(), new RegExp(`the ${what} was interrupted \\(SIGINT\\)`));
        const held = mine();
        console.log(`# s3 interrupt: the ${what} stopped ${took} ms after SIGINT; ${held.length} chunk ${method}(s) were held`);
        await waitFor(`the held ${method}s to be closed by the client`, () => held.every((h) => h.end !== undefined && h.end - h.start < HELD_MS / 2), 5000, p.output);
        assert.ok(held.every((h) => h.status === undefined), 'none was answered');
        return p.output();
      } finally {
        proxy.delayFor = undefined;
        // A failure above: the command ends before the test's files are removed.
        if (p.exitCode === null && p.signalCode === null) {
          p.kill('SIGKILL');
          await p;
        }
      }
    };

    assert.match(await interrupted(['backup', '--vm', 'slow', '--disk', src, '--json'], 'PUT', 'backup'), /nothing was saved/);
    const storage = openStorage(s3.repoUrl('interrupt'));
    try {
      const names = async (prefix: string) => { const out: string[] = []; for await (const o of storage.list(prefix)) out.push(o.name); return out; };
      assert.deepEqual(await names('locks/'), [], 'no lock left');
      assert.deepEqual(await names('backups/'), [], 'nothing committed');
    } finally {
      await storage.close();
    }
    const made = await cliJson(['backup', '--vm', 'slow', '--disk', src], env);

    // The restore of it, with every chunk GET held: cut at SIGINT too, its files removed.
    const out = join(work, 'cut');
    assert.match(await interrupted(['restore', made.id, '--to', out, '--json'], 'GET', 'restore'), /its partly written files were removed/);
    assert.deepEqual(await readdir(out).catch(() => []), [], 'no file left in the restore directory');

    const restored = await cliJson(['restore', made.id, '--to', join(work, 'out')], env);
    const cmp = await compareImages(src, restored.files[0].path, 'qcow2', 'qcow2');
    assert.ok(cmp.identical, cmp.output);

    // A copy of it to a directory repository, reading the S3 one: cut at SIGINT as well,
    // nothing committed in the destination and no lock left in either.
    const dest = join(work, 'copy-dest');
    assert.equal((await cli(['--repo', dest, 'init', '--kdf', 'weak', '--chunk-size', '256K'], env)).code, 0);
    const fromPass = join(work, 'from-pass');
    await writeFile(fromPass, PASSWORD);
    assert.match(await interrupted(['--repo', dest, 'copy', '--from-repo', repo, '--from-password-file', fromPass, '--json'], 'GET', 'copy'),
      /the backups copied before it stand; the one under way was not committed/);
    assert.deepEqual(await readdir(join(dest, 'backups')).catch(() => []), [], 'nothing committed in the destination');
    assert.deepEqual(await readdir(join(dest, 'locks')).catch(() => []), [], 'no lock left in the destination');
    const source = openStorage(s3.repoUrl('interrupt'));
    try {
      for await (const o of source.list('locks/')) assert.fail(`lock ${o.name} left in the source`);
    } finally {
      await source.close();
    }
  } finally {
    await proxy.down();
  }
});

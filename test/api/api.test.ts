/**
 * The HTTP API as operators use it, with real processes throughout: a redis-server,
 * `vmvault serve` (scheduler + API), and two `vmvault worker`s for hosts "hosta" and
 * "hostb" with separate restore roots, over a directory repository and real qcow2
 * images. A backup is taken on hosta and restored through the API onto hostb;
 * `qemu-img convert` pulls a disk through a signed link, as a host with no worker would.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import SwaggerParser from '@apidevtools/swagger-parser';
import { execa } from 'execa';
import { compareImages } from '../../src/disk/qemu.js';
import { API_ROUTES } from '../../src/api/app.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { startService, type TestService } from '../helpers/service.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const PASSWORD = 'api test passphrase';
const TOKENS = { viewer: 'viewer-token-0123456789', operator: 'operator-token-0123456789', admin: 'admin-token-0123456789' } as const;
const MiB = 1024 * 1024;

let redis: TestRedis;
let dir: TempDir;
let api: string;
let source: string;
let rootA: string;
let rootB: string;
let backupId: string;
let dbDisk: string;
let service: TestService | undefined;
const output = () => service?.output() ?? '';

type Role = keyof typeof TOKENS;
async function call(method: string, path: string, opts: { role?: Role; body?: unknown; headers?: Record<string, string> } = {}): Promise<{ status: number; body: any; headers: Headers }> {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.role) headers.authorization = `Bearer ${TOKENS[opts.role]}`;
  if (opts.body !== undefined) headers['content-type'] = 'application/json';
  const r = await fetch(`${api}${path}`, { method, headers, ...(opts.body !== undefined ? { body: typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body) } : {}) })
    .catch((err: unknown) => { throw new Error(`${method} ${path}: ${String(err)}\n${output()}`); });
  const text = await r.text();
  let body: unknown = text;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, body, headers: r.headers };
}

/** A request with the path sent exactly as written (fetch would normalise it). */
function rawRequest(method: string, path: string, headers: Record<string, string> = {}): Promise<number> {
  const u = new URL(api);
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: u.hostname, port: u.port, method, path, headers }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode!));
    });
    req.on('error', reject);
    req.end();
  });
}

async function finished(jobId: string, onPoll?: (job: any) => void): Promise<any> {
  return waitFor(`job ${jobId} to finish`, async () => {
    const r = await call('GET', `/v1/jobs/${encodeURIComponent(jobId)}`, { role: 'viewer' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    onPoll?.(r.body);
    return r.body.state === 'completed' || r.body.state === 'failed' ? r.body : undefined;
  }, 120_000, output, 25);
}

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-api-');
  rootA = join(dir.path, 'hosta-restores');
  rootB = join(dir.path, 'hostb-restores');
  await mkdir(rootA);
  await mkdir(rootB);
  // 96 MiB of random data in a 256 MiB disk, so that a restore runs long enough to report progress.
  const raw = join(dir.path, 'random.raw');
  await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=96', 'status=none']);
  await execa('truncate', ['-s', `${256 * MiB}`, raw]);
  source = join(dir.path, 'web.qcow2');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, source]);
  dbDisk = await makeImage(dir.path, 'db', 'qcow2', 16 * MiB, [{ offset: 0, length: MiB, pattern: 0x11 }]);
  const xml = join(dir.path, 'web.xml');
  await writeFile(xml, `<domain type='kvm'>\n  <name>web</name>\n  <devices>\n    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='${source}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n  </devices>\n</domain>\n`);
  service = await startService({
    dir: dir.path, redisUrl: redis.url, passphrase: PASSWORD, tokens: TOKENS, workers: ['hosta', 'hostb'],
    hosts: [`hosta: { restoreRoots: [${JSON.stringify(rootA)}] }`, `hostb: { restoreRoots: [${JSON.stringify(rootB)}] }`],
    vms: [
      `{ name: web, host: hosta, disks: [{ path: ${JSON.stringify(source)}, name: root }], configFiles: [${JSON.stringify(xml)}] }`,
      `{ name: db, host: hostb, disks: [{ path: ${JSON.stringify(dbDisk)} }] }`,
    ],
  });
  api = service.api;
});

after(async () => {
  await service?.stop();
  await redis?.stop();
  await dir?.cleanup();
});

describe('HTTP API', () => {
  test('health needs no token; everything else answers 401 without one and 403 to a role too low', async () => {
    const h = await call('GET', '/v1/health');
    assert.equal(h.status, 200);
    assert.deepEqual(h.body, { status: 'ok', redis: 'ok', repository: 'ok' });
    const none = await call('GET', '/v1/vms');
    assert.equal(none.status, 401);
    assert.equal(none.body.error.code, 'UNAUTHORIZED');
    assert.match(none.headers.get('www-authenticate') ?? '', /Bearer/);
    assert.equal((await call('GET', '/v1/vms', { headers: { authorization: 'Bearer not-a-token' } })).status, 401);
    assert.equal((await call('GET', '/v1/vms', { headers: { authorization: `Basic ${TOKENS.admin}` } })).status, 401);
    const vms = await call('GET', '/v1/vms', { role: 'viewer' });
    assert.equal(vms.status, 200);
    assert.deepEqual(vms.body.items.map((v: any) => v.name), ['web', 'db']);
    const viewerBackup = await call('POST', '/v1/vms/web/backups', { role: 'viewer', body: {} });
    assert.equal(viewerBackup.status, 403);
    assert.equal(viewerBackup.body.error.code, 'FORBIDDEN');
    assert.equal((await call('GET', '/v1/vms/nope', { role: 'viewer' })).status, 404);
    assert.equal((await call('GET', '/v1/openapi.json')).status, 401);
  });

  test('repeated, dot and encoded path segments never reach a route without a token', async () => {
    const variants = ['//v1/vms', '/v1//vms', '/v1/vms/', '/v1%2Fvms', '/v1/%76ms', '/v1/health/../vms', '/v1/health/%2e%2e/vms',
      '/v1/health%2F..%2Fvms', '/v1/links/../vms', '/v1/links/%2e%2e/vms', '/v1/./vms', '/V1/vms', '/v1/health//', '//v1/health/../../v1/vms'];
    for (const v of variants) {
      const status = await rawRequest('GET', v);
      assert.ok([400, 401, 404].includes(status), `${v} answered ${status}`);
    }
    // With a token too low for a restore, no spelling of the restore route accepts it.
    for (const v of ['//v1/backups/0000/restore', '/v1/backups//0000/restore', '/v1/backups/0000%2Frestore']) {
      const status = await rawRequest('POST', v, { authorization: `Bearer ${TOKENS.viewer}`, 'content-type': 'application/json' });
      assert.ok([400, 403, 404].includes(status), `${v} answered ${status}`);
    }
  });

  test('an on-demand backup on host A: job id, completion, then listed with filters', async () => {
    const r = await call('POST', '/v1/vms/web/backups', { role: 'operator', body: { labels: ['pre-update'] } });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    assert.equal(r.body.job.queue, 'vmvault-host-hosta');
    const job = await finished(r.body.job.id);
    assert.equal(job.state, 'completed', job.error);
    backupId = job.result.id;
    assert.match(backupId, /^[0-9a-f]{64}$/);
    assert.equal(job.result.host, 'hosta');

    const list = await call('GET', '/v1/backups?vm=web&label=pre-update', { role: 'viewer' });
    assert.deepEqual(list.body.items.map((b: any) => b.id), [backupId]);
    assert.deepEqual((await call('GET', '/v1/backups?label=other', { role: 'viewer' })).body.items, []);
    assert.deepEqual((await call('GET', '/v1/backups?since=2999-01-01', { role: 'viewer' })).body.items, []);
    assert.equal((await call('GET', '/v1/backups?since=yesterday', { role: 'viewer' })).status, 400);
    const one = await call('GET', `/v1/backups/${backupId.slice(0, 10)}`, { role: 'viewer' });
    assert.equal(one.status, 200);
    assert.equal(one.body.id, backupId);
    assert.deepEqual(one.body.disks.map((d: any) => d.name), ['root']);
    const vm = await call('GET', '/v1/vms/web', { role: 'viewer' });
    assert.equal(vm.body.lastBackup.id, backupId);
    assert.equal(vm.body.state, 'idle');
    assert.equal(vm.body.backups, 1);
  });

  for (const format of ['qcow2', 'vmdk'] as const) {
    test(`restore onto host B as ${format}: progress while it runs, identical to the source, config rewritten`, async () => {
      assert.ok(backupId, 'needs the backup of the previous test');
      const target = join(rootB, `web-${format}`);
      const r = await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', body: { host: 'hostb', directory: target, format } });
      assert.equal(r.status, 202, JSON.stringify(r.body));
      assert.equal(r.body.job.queue, 'vmvault-host-hostb');
      const seen: any[] = [];
      const job = await finished(r.body.job.id, (j) => { if (j.state === 'active' && j.progress) seen.push(j.progress); });
      assert.equal(job.state, 'completed', job.error);
      assert.ok(seen.length > 0, 'the running job reported progress');
      assert.equal(seen[0].phase, 'restore');
      assert.ok(seen.every((p) => p.bytesTotal > 0 && p.bytesDone <= p.bytesTotal), JSON.stringify(seen));
      const disk = job.result.files.find((f: any) => f.kind === 'disk');
      assert.equal(disk.path, join(target, `root.${format}`));
      assert.equal(disk.format, format);
      assert.equal((await compareImages(source, disk.path, 'qcow2', format)).identical, true, `${disk.path} differs from the source`);
      const xml = job.result.files.find((f: any) => f.kind === 'config');
      assert.equal(xml.path, join(target, 'web.xml'));
      const text = await readFile(xml.path, 'utf8');
      assert.ok(text.includes(`<source file="${disk.path}"/>`) || text.includes(`<source file='${disk.path}'/>`), text);
      assert.ok(!text.includes(source), 'the old disk path is gone');
      assert.match(text, new RegExp(`type=["']${format}["']`));
      assert.deepEqual(await readdir(rootA), [], 'host A wrote nothing');
      if (format !== 'qcow2') return;
      // Again into the same place: refused in the API's own words (its field is "overwrite").
      const again = await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', body: { host: 'hostb', directory: target, format } });
      const refused = await finished(again.body.job.id);
      assert.equal(refused.state, 'failed');
      assert.match(refused.error, /already exist.*set "overwrite": true in the restore request to replace them; nothing was written/);
      assert.doesNotMatch(refused.error, /--force/);
    });
  }

  test('restore refusals: traversal gives 400 and writes nothing; unknown backup 404; viewer 403; no token 401', async () => {
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    const jobsBefore = (await call('GET', '/v1/jobs?limit=1000', { role: 'viewer' })).body.items.length;
    const bad = [
      { host: 'hostb', directory: `${rootB}/../outside`, format: 'qcow2' },
      { host: 'hostb', directory: `${rootB}/./x/../../outside`, format: 'qcow2' },
      { host: 'hostb', directory: outside, format: 'qcow2' },
      { host: 'hostb', directory: 'relative/dir', format: 'qcow2' },
      { host: 'hostb', directory: rootA, format: 'qcow2' },
      { host: 'hostb', directory: join(rootB, 'x'), format: 'qcow2', disks: ['../../outside/root'] },
      { host: 'hostb', directory: join(rootB, 'x'), format: 'qcow2', disks: ['/etc/passwd'] },
      { host: 'hostb', directory: join(rootB, 'x'), format: 'iso' },
      { host: 'nohost', directory: join(rootB, 'x'), format: 'qcow2' },
    ];
    for (const body of bad) {
      const r = await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', body });
      assert.equal(r.status, 400, `${JSON.stringify(body)} → ${r.status} ${JSON.stringify(r.body)}`);
      assert.ok(r.body.error.message.length > 10);
    }
    assert.equal((await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', body: { host: 'hostb', directory: join(rootB, 'x'), format: 'qcow2', disks: ['nope'] } })).status, 404);
    const unknown = await call('POST', `/v1/backups/${'f'.repeat(64)}/restore`, { role: 'operator', body: { host: 'hostb', directory: join(rootB, 'x'), format: 'qcow2' } });
    assert.equal(unknown.status, 404);
    assert.equal(unknown.body.error.code, 'NOT_FOUND');
    assert.equal((await call('GET', `/v1/backups/${'f'.repeat(64)}`, { role: 'viewer' })).status, 404);
    assert.equal((await call('POST', `/v1/backups/${backupId}/restore`, { role: 'viewer', body: { host: 'hostb', directory: join(rootB, 'x'), format: 'qcow2' } })).status, 403);
    assert.equal((await call('POST', `/v1/backups/${backupId}/restore`, { body: { host: 'hostb', directory: join(rootB, 'x'), format: 'qcow2' } })).status, 401);
    assert.equal((await call('GET', '/v1/jobs?limit=1000', { role: 'viewer' })).body.items.length, jobsBefore, 'no job was enqueued');
    assert.ok(!existsSync(join(rootB, 'x')));

    // A symlink inside the root that points outside: only the host can see it; its worker refuses.
    await symlink(outside, join(rootB, 'evil'));
    const r = await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', body: { host: 'hostb', directory: join(rootB, 'evil', 'web'), format: 'qcow2' } });
    assert.equal(r.status, 202);
    const job = await finished(r.body.job.id);
    assert.equal(job.state, 'failed');
    assert.match(job.error, /outside this host's restore roots/);
    assert.deepEqual(await readdir(outside), [], 'nothing written through the symlink');
  });

  test('a signed link restores with stock qemu-img convert; HEAD and Range work; expired or altered links get 403', async () => {
    const link = await call('POST', `/v1/backups/${backupId}/disks/root/links`, { role: 'operator', body: { expiresIn: 120 } });
    assert.equal(link.status, 201, JSON.stringify(link.body));
    const url: string = link.body.url;
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/v1\/links\/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
    assert.equal((await call('POST', `/v1/backups/${backupId}/disks/root/links`, { role: 'viewer', body: {} })).status, 403);
    // The body is optional: without one the link lasts the default 15 minutes.
    const bare = await call('POST', `/v1/backups/${backupId}/disks/root/links`, { role: 'operator' });
    assert.equal(bare.status, 201, JSON.stringify(bare.body));
    const lasts = Date.parse(bare.body.expiresAt) - Date.now();
    assert.ok(lasts > 800_000 && lasts <= 900_000, bare.body.expiresAt);
    assert.equal((await fetch(bare.body.url, { method: 'HEAD' })).status, 200);

    const head = await fetch(url, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('content-length'), String(256 * MiB));
    assert.equal(head.headers.get('accept-ranges'), 'bytes');

    const rawSource = join(dir.path, 'source.raw');
    await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', source, rawSource]);
    const want = (await readFile(rawSource)).subarray(4 * MiB - 10, 4 * MiB + 10);
    const part = await fetch(url, { headers: { range: `bytes=${4 * MiB - 10}-${4 * MiB + 9}` } });
    assert.equal(part.status, 206);
    assert.equal(part.headers.get('content-range'), `bytes ${4 * MiB - 10}-${4 * MiB + 9}/${256 * MiB}`);
    assert.deepEqual(Buffer.from(await part.arrayBuffer()), want);
    assert.equal((await fetch(url, { headers: { range: `bytes=${256 * MiB}-` } })).status, 416);
    // A burst of whole-response ranges is served in turn, every one complete.
    const burst = await Promise.all(Array.from({ length: 24 }, async (_, i) => {
      const r = await fetch(url, { headers: { range: `bytes=${i * MiB}-${i * MiB + 16 * MiB - 1}` } });
      return [r.status, (await r.arrayBuffer()).byteLength];
    }));
    assert.ok(burst.every(([status, n]) => status === 206 && n === 16 * MiB), JSON.stringify(burst));

    // Where no worker runs: stock qemu-img through QEMU's curl driver, with the command
    // line the API answers and the README documents (-m 1: QEMU 7.2's curl driver hangs
    // now and then with parallel requests).
    // The link's signature goes to the server as a cookie, from a file the shell's own
    // printf writes: it appears once in the command, in that builtin, and never on
    // qemu-img's command line (checked in /proc while it runs). The test's own `sh -c`
    // carries the text, as any shell given it as an argument would; typed at a prompt,
    // no process does.
    const command: string = link.body.command;
    const signature = url.slice(url.lastIndexOf('.') + 1);
    const cookieUrl = url.slice(0, url.lastIndexOf('.'));
    assert.equal(command, `(umask 077; trap 'rm -f root.link' EXIT; printf '%s' 'vmvault_link=${signature}' > root.link && qemu-img convert -p -m 1 ` +
      `--object secret,id=vmvault-link,file=root.link -O qcow2 'json:{"driver":"raw","file":{"driver":"http","url":"${cookieUrl}","cookie-secret":"vmvault-link"}}' root.qcow2)`);
    const readme = await readFile(new URL('../../../README.md', import.meta.url), 'utf8');
    assert.ok(readme.includes("(umask 077; trap 'rm -f root.link' EXIT; printf '%s' 'vmvault_link=…' > root.link && qemu-img convert -p -m 1 " +
      '--object secret,id=vmvault-link,file=root.link -O qcow2 \'json:{"driver":"raw","file":{"driver":"http","url":"http://backup-host:8740/v1/links/…","cookie-secret":"vmvault-link"}}\' root.qcow2)'),
    'the README shows the same command');
    const cwd = join(dir.path, 'via-link');
    await mkdir(cwd);
    const seen: string[] = [];
    let watching = true;
    const watch = (async () => {
      while (watching) {
        for (const pid of await readdir('/proc').catch(() => [] as string[])) {
          if (!/^\d+$/.test(pid)) continue;
          const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
          if (cmdline.startsWith('qemu-img\0convert')) seen.push(cmdline);
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    try {
      await execa('sh', ['-c', command], { cwd, timeout: 120_000 });
    } finally {
      watching = false;
      await watch;
    }
    assert.ok(seen.length > 0, 'qemu-img was seen running');
    assert.ok(seen.every((c) => !c.includes(signature)), 'the signature is on no command line');
    assert.equal((await compareImages(source, join(cwd, 'root.qcow2'), 'qcow2', 'qcow2')).identical, true);
    assert.deepEqual(await readdir(cwd), ['root.qcow2'], 'the cookie file is removed');

    const [payload, mac] = url.slice(url.lastIndexOf('/') + 1).split('.') as [string, string];
    const base = url.slice(0, url.lastIndexOf('/') + 1);
    const flip = (s: string) => s.slice(0, 5) + (s[5] === 'A' ? 'B' : 'A') + s.slice(6);
    for (const bad of [`${flip(payload)}.${mac}`, `${payload}.${flip(mac)}`, `${payload}`, 'x.y']) {
      const r = await fetch(base + bad);
      assert.equal(r.status, 403, bad);
      assert.equal(((await r.json()) as any).error.code, 'FORBIDDEN');
    }
    const short = await call('POST', `/v1/backups/${backupId}/disks/root/links`, { role: 'operator', body: { expiresIn: 1 } });
    await new Promise((r) => setTimeout(r, 2100));
    const expired = await fetch(short.body.url);
    assert.equal(expired.status, 403);
    assert.match(((await expired.json()) as any).error.message, /expired/);

    // With a bearer token the same disk is at /v1/backups/{id}/disks/{disk}.
    const direct = await fetch(`${api}/v1/backups/${backupId}/disks/root`, { headers: { authorization: `Bearer ${TOKENS.operator}`, range: 'bytes=0-99' } });
    assert.equal(direct.status, 206);
    assert.deepEqual(Buffer.from(await direct.arrayBuffer()), (await readFile(rawSource)).subarray(0, 100));
    assert.equal((await call('GET', `/v1/backups/${backupId}/disks/root`, { role: 'viewer' })).status, 403);
    assert.equal((await call('GET', `/v1/backups/${backupId}/disks/nope`, { role: 'operator' })).status, 404);
    assert.ok(!output().includes(payload), 'link tokens are not logged');
  });

  test('jobs are paginated; policies list and validate; maintenance jobs need admin', async () => {
    const p1 = await call('GET', '/v1/jobs?limit=2', { role: 'viewer' });
    assert.equal(p1.body.items.length, 2);
    assert.ok(p1.body.nextCursor);
    const p2 = await call('GET', `/v1/jobs?limit=2&cursor=${p1.body.nextCursor}`, { role: 'viewer' });
    assert.ok(p2.body.items.length >= 1);
    assert.ok(!p2.body.items.some((j: any) => p1.body.items.some((k: any) => k.id === j.id)), 'pages do not overlap');
    assert.equal((await call('GET', '/v1/jobs?limit=0', { role: 'viewer' })).status, 400);
    assert.equal((await call('GET', '/v1/jobs/no-such-job', { role: 'viewer' })).status, 404);

    assert.deepEqual((await call('GET', '/v1/policies', { role: 'viewer' })).body, { items: [], problems: [] });
    const good = 'name: nightly\nschedule: "0 2 * * *"\nselect:\n  vms: [web]\nretention:\n  keepDaily: 7\n';
    assert.equal((await call('POST', '/v1/policies/validate', { role: 'operator', body: { yaml: good } })).status, 403);
    const ok = await call('POST', '/v1/policies/validate', { role: 'admin', body: { yaml: good } });
    assert.equal(ok.body.valid, true, JSON.stringify(ok.body));
    const bad = await call('POST', '/v1/policies/validate', { role: 'admin', body: { yaml: good.replace('keepDaily', 'keepDialy'), file: 'nightly.yaml' } });
    assert.equal(bad.body.valid, false);
    assert.equal(bad.body.problems[0].line, 6);
    assert.equal((await call('POST', '/v1/policies/validate', { role: 'admin', body: { yaml: 'x'.repeat(300 * 1024) } })).status, 413);
    assert.equal((await call('POST', '/v1/policies/validate', { role: 'admin', body: '{not json' })).status, 400);

    assert.equal((await call('POST', '/v1/maintenance/verify', { role: 'operator', body: {} })).status, 403);
    const verify = await call('POST', '/v1/maintenance/verify', { role: 'admin', body: { readData: true } });
    assert.equal(verify.status, 202);
    const v = await finished(verify.body.job.id);
    assert.equal(v.state, 'completed', v.error);
    const gc = await call('POST', '/v1/maintenance/gc', { role: 'admin', body: { dryRun: true } });
    assert.equal((await finished(gc.body.job.id)).state, 'completed');
    assert.equal((await call('POST', '/v1/maintenance/prune', { role: 'admin', body: { policy: 'nightly', bogus: 1 } })).status, 400);
  });

  test('snapshots through the API run on the VM\'s host: create, list, revert, delete; clear refusals', async () => {
    assert.equal((await call('POST', '/v1/vms/db/snapshots', { role: 'viewer', body: { name: 'before' } })).status, 403);
    assert.equal((await call('POST', '/v1/vms/nope/snapshots', { role: 'operator', body: { name: 'before' } })).status, 404);
    for (const name of ['vmvault-x', '123', '../x']) {
      const r = await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name } });
      assert.equal(r.status, 400, `${name}: ${JSON.stringify(r.body)}`);
    }
    assert.equal((await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name: 'x', expireIn: 'soon' } })).status, 400);
    // Durations mean one thing: m is refused as ambiguous; errors name the API's field, not the CLI's flag.
    const ambiguous = await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name: 'x', expireIn: '30m' } });
    assert.equal(ambiguous.status, 400);
    assert.match(ambiguous.body.error.message, /^expireIn: "30m" is ambiguous: write 30min for minutes or 30mo for months/);
    const zero = await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name: 'x', expireIn: '0min' } });
    assert.equal(zero.status, 400);
    assert.match(zero.body.error.message, /^expireIn 0min is zero/);
    assert.doesNotMatch(`${ambiguous.body.error.message} ${zero.body.error.message}`, /--expire-in/);

    const created = await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name: 'before-upgrade', expireIn: '30min' } });
    assert.equal(created.status, 202, JSON.stringify(created.body));
    assert.equal(created.body.job.queue, 'vmvault-host-hostb');
    const c = await finished(created.body.job.id);
    assert.equal(c.state, 'completed', c.error);
    const list = await call('GET', '/v1/vms/db/snapshots', { role: 'viewer' });
    assert.equal(list.status, 200, JSON.stringify(list.body));
    assert.deepEqual(list.body.items.map((x: any) => [x.name, x.label]), [['before-upgrade', 'pre-update']]);
    const expiresIn = Date.parse(list.body.items[0].expiresAt) - Date.now();
    assert.ok(expiresIn > 25 * 60_000 && expiresIn <= 30 * 60_000, `30min is thirty minutes: ${list.body.items[0].expiresAt}`);

    const dup = await finished((await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name: 'before-upgrade' } })).body.job.id);
    assert.equal(dup.state, 'failed');
    assert.match(dup.error, /already/);

    const copy = join(dir.path, 'db-at-snapshot.qcow2');
    await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', dbDisk, copy]);
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 0 2M', dbDisk]);
    assert.equal((await compareImages(dbDisk, copy, 'qcow2', 'qcow2')).identical, false);
    const reverted = await finished((await call('POST', '/v1/vms/db/snapshots/before-upgrade/revert', { role: 'operator' })).body.job.id);
    assert.equal(reverted.state, 'completed', reverted.error);
    assert.equal((await compareImages(dbDisk, copy, 'qcow2', 'qcow2')).identical, true, 'the disk is back to the snapshot');

    const deleted = await finished((await call('DELETE', '/v1/vms/db/snapshots/before-upgrade', { role: 'operator' })).body.job.id);
    assert.equal(deleted.state, 'completed', deleted.error);
    assert.deepEqual((await call('GET', '/v1/vms/db/snapshots', { role: 'viewer' })).body.items, []);
  });

  test('a retried POST with the same Idempotency-Key gets the job of its first try: a revert is not done twice', async () => {
    const headers = { 'idempotency-key': 'revert-db-7d1c9a' };
    /** The first byte of each MiB of the db disk's first 2 MiB, as the guest sees them. */
    const firstBytes = async () => {
      const raw = join(dir.path, 'db-now.raw');
      await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', dbDisk, raw]);
      const b = await readFile(raw);
      return [b[0], b[MiB]];
    };
    const created = await finished((await call('POST', '/v1/vms/db/snapshots', { role: 'operator', body: { name: 'idem' } })).body.job.id);
    assert.equal(created.state, 'completed', created.error);
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 0 2M', dbDisk]);

    const first = await call('POST', '/v1/vms/db/snapshots/idem/revert', { role: 'operator', headers });
    assert.equal(first.status, 202, JSON.stringify(first.body));
    assert.equal(first.headers.get('idempotent-replayed'), null);
    const again = await call('POST', '/v1/vms/db/snapshots/idem/revert', { role: 'operator', headers });
    assert.equal(again.status, 202, JSON.stringify(again.body));
    assert.equal(again.body.job.id, first.body.job.id, 'the retry is answered with the first try\'s job');
    assert.equal(again.headers.get('idempotent-replayed'), 'true');
    const done = await finished(first.body.job.id);
    assert.equal(done.state, 'completed', done.error);
    assert.deepEqual(await firstBytes(), [0x11, 0x00], 'reverted to the snapshot');

    // The VM writes after the revert; a late retry of the same request must not revert again.
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 1M', dbDisk]);
    const late = await call('POST', '/v1/vms/db/snapshots/idem/revert', { role: 'operator', headers });
    assert.equal(late.status, 202, JSON.stringify(late.body));
    assert.equal(late.body.job.id, first.body.job.id);
    assert.equal(late.body.job.state, 'completed', 'a replay shows the job as it is now');
    const jobs = await call('GET', '/v1/jobs?limit=1000', { role: 'viewer' });
    assert.equal(jobs.body.items.filter((j: any) => j.name === 'snapshot' && j.data.op === 'revert' && j.data.name === 'idem').length, 1, 'one revert job');
    assert.deepEqual(await firstBytes(), [0x33, 0x00], 'the write after the revert is still there');

    // The same key for another request is refused; another token's same key is its own.
    const conflict = await call('POST', '/v1/vms/db/snapshots/other/revert', { role: 'operator', headers });
    assert.equal(conflict.status, 422, JSON.stringify(conflict.body));
    assert.equal(conflict.body.error.code, 'IDEMPOTENCY_KEY_REUSED');
    assert.match(conflict.body.error.message, /new key/);
    const admins = await call('POST', '/v1/vms/db/snapshots/other/revert', { role: 'admin', headers });
    assert.equal(admins.status, 202, JSON.stringify(admins.body));
    assert.notEqual(admins.body.job.id, first.body.job.id);
    assert.equal((await finished(admins.body.job.id)).state, 'failed', 'there is no snapshot "other"');
    for (const bad of ['', 'has space', 'x'.repeat(256)]) {
      const r = await call('POST', '/v1/vms/db/snapshots/idem/revert', { role: 'operator', headers: { 'idempotency-key': bad } });
      assert.equal(r.status, 400, `${JSON.stringify(bad)}: ${JSON.stringify(r.body)}`);
    }
    assert.deepEqual(await firstBytes(), [0x33, 0x00], 'no refused request reverted anything');

    // The same key for a restore onto another host (another queue) is another request: refused before anything is queued.
    assert.ok(backupId, 'needs the backup of an earlier test');
    const restoreKey = { 'idempotency-key': 'restore-web-5e2f' };
    const onB = await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', headers: restoreKey, body: { host: 'hostb', directory: join(rootB, 'idem'), format: 'raw' } });
    assert.equal(onB.status, 202, JSON.stringify(onB.body));
    const jobsBefore = (await call('GET', '/v1/jobs?limit=1000', { role: 'viewer' })).body.items.length;
    const onA = await call('POST', `/v1/backups/${backupId}/restore`, { role: 'operator', headers: restoreKey, body: { host: 'hosta', directory: join(rootA, 'idem'), format: 'raw' } });
    assert.equal(onA.status, 422, JSON.stringify(onA.body));
    assert.equal(onA.body.error.details.job, onB.body.job.id);
    assert.equal((await call('GET', '/v1/jobs?limit=1000', { role: 'viewer' })).body.items.length, jobsBefore, 'nothing was queued for host A');
    assert.equal((await finished(onB.body.job.id)).state, 'completed');
    const deleted = await finished((await call('DELETE', '/v1/vms/db/snapshots/idem', { role: 'operator' })).body.job.id);
    assert.equal(deleted.state, 'completed', deleted.error);
  });

  test('the OpenAPI document validates and lists every route', async () => {
    const r = await call('GET', '/v1/openapi.json', { role: 'viewer' });
    assert.equal(r.status, 200);
    const doc = r.body;
    await SwaggerParser.validate(structuredClone(doc));
    for (const { method, path } of API_ROUTES) {
      if (path === '/v1/openapi.json') continue;
      assert.ok(doc.paths[path]?.[method], `${method.toUpperCase()} ${path} is in the document`);
    }
    assert.deepEqual(doc.paths['/v1/health'].get.security, []);
    assert.deepEqual(doc.paths['/v1/links/{token}'].get.security, []);
    assert.ok(doc.paths['/v1/backups/{id}/restore'].post.requestBody.content['application/json'].schema);
  });

  test('no token or passphrase appears in any log line', () => {
    const out = output();
    for (const t of [...Object.values(TOKENS), PASSWORD]) assert.ok(!out.includes(t), `a log contains ${t.slice(0, 8)}…`);
    assert.match(out, /"path":"\/v1\/links\/\(redacted\)"/);
  });
});

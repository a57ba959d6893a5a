/**
 * A first start as a new user makes it: `vmvault up` from an empty state directory
 * with no configuration, its stdout not a terminal (as under systemd), writes an
 * admin token to STATE_DIR/admin-token (0600) and prints only that path; the token
 * opens the API, a VM
 * (a real qcow2 image) is added through the API, backed up and restored identical
 * (qemu-img compare); the VM file is reloaded while up runs; a worker on "another
 * host" joins with the printed command, which names the Redis password's file, never
 * the password; a second start prints no token, and wrong or replaced tokens are refused.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { cli } from '../helpers/cli.js';
import { BASE_ENV, start, stopProc, waitFor, type Proc } from '../helpers/procs.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { freePort } from '../helpers/ports.js';

const MiB = 1024 * 1024;

describe('first start with no configuration', () => {
  let dir: TempDir;
  let stateDir: string;
  let image: string;
  let redisPort: number;
  let up: Proc | undefined;
  let api = '';
  let token = '';
  const joined: Proc[] = [];

  const call = async (method: string, path: string, o: { token?: string; body?: unknown } = {}) => {
    const r = await fetch(`${api}${path}`, {
      method,
      headers: { ...(o.token ? { authorization: `Bearer ${o.token}` } : {}), ...(o.body !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(o.body !== undefined ? { body: JSON.stringify(o.body) } : {}),
    });
    const text = await r.text();
    return { status: r.status, body: text ? JSON.parse(text) : undefined };
  };
  const startUp = async (): Promise<string> => {
    up = start(['up', '--redis-listen', `127.0.0.1:${redisPort}`], { VMVAULT_STATE_DIR: stateDir, VMVAULT_API_LISTEN: '127.0.0.1:0', VMVAULT_NO_CATCH_UP: '1' });
    await waitFor('up to serve its API', () => /API on (http:\/\/\S+) /.exec(up!.output())?.[1], 40_000, () => up!.output());
    api = /API on (http:\/\/\S+) /.exec(up.output())![1]!;
    return up.output();
  };
  const stopUp = async () => {
    if (up) assert.equal(await stopProc(up), 0, up.output());
    up = undefined;
  };
  const jobDone = async (id: string) => waitFor(`job ${id}`, async () => {
    const j = await call('GET', `/v1/jobs/${encodeURIComponent(id)}`, { token });
    return j.body?.state === 'completed' || j.body?.state === 'failed' ? j.body : undefined;
  }, 60_000, () => up?.output() ?? '');

  before(async () => {
    dir = await tempDir('vv-first-');
    stateDir = join(dir.path, 'state');
    image = await makeImage(dir.path, 'web.qcow2', 'qcow2', 24 * MiB, [
      { offset: 0, length: MiB, pattern: 0x5a }, { offset: 9 * MiB + 4096, length: 300_000, pattern: 0xc3 },
    ]);
    redisPort = await freePort();
  });
  after(async () => {
    for (const p of joined) await stopProc(p, 'SIGKILL').catch(() => {});
    if (up) await stopProc(up, 'SIGKILL').catch(() => {});
    await dir.cleanup();
  });

  test('up writes a new admin token to a 0600 file, not to its output; the hash is kept (0600); the API takes it and refuses others', async () => {
    const out = await startUp();
    const tokenFile = join(stateDir, 'admin-token');
    assert.match(out, new RegExp(`admin API token; it is in ${tokenFile} \\(mode 0600\\).*read it \\(cat ${tokenFile}\\) and delete the file`, 's'));
    assert.doesNotMatch(out, /admin token: /);
    assert.equal((await stat(tokenFile)).mode & 0o777, 0o600);
    token = (await readFile(tokenFile, 'utf8')).trim();
    assert.match(token, /^vv_[A-Za-z0-9_-]{32}$/);
    assert.ok(!out.includes(token), 'the token is not in up\'s output');
    const file = join(stateDir, 'admin-token.sha256');
    assert.equal((await stat(file)).mode & 0o777, 0o600);
    const stored = await readFile(file, 'utf8');
    assert.equal(stored.trim(), createHash('sha256').update(token).digest('hex'));
    assert.ok(!stored.includes(token));
    const dashboard = /dashboard: (http:\/\/127\.0\.0\.1:\d+\/)/.exec(out)?.[1];
    assert.ok(dashboard, out);
    // The printed address serves the dashboard, and its API calls take the printed token.
    const page = await fetch(dashboard);
    assert.equal(page.status, 200);
    assert.match(await page.text(), /<title>vmvault<\/title>/);
    assert.equal(new URL('/v1/vms', dashboard).origin, new URL(api).origin);
    assert.ok(!/"level"[^\n]*vv_/.test(out), 'no log line carries the token');

    const vms = await call('GET', '/v1/vms', { token });
    assert.equal(vms.status, 200, JSON.stringify(vms.body));
    assert.deepEqual(vms.body.items, []);
    const wrong = await call('GET', '/v1/vms', { token: `${token}x` });
    assert.equal(wrong.status, 401);
    assert.match(wrong.body.error.message, /not known/);
    assert.equal((await call('GET', '/v1/vms')).status, 401);
  });

  test('a VM added through the API is written to vms.yaml, backed up and restored identical', async () => {
    const bad = await call('POST', '/v1/vms', { token, body: { name: 'web', disks: [{ path: 'web.qcow2' }] } });
    assert.equal(bad.status, 400, JSON.stringify(bad.body));
    assert.match(bad.body.error.message, /invalid VM: disks\[0\]\.path: a disk path must be an absolute path/);
    const unknownHost = await call('POST', '/v1/vms', { token, body: { name: 'web', host: 'elsewhere', disks: [{ path: image }] } });
    assert.equal(unknownHost.status, 400);
    assert.match(unknownHost.body.error.message, /host: .*"elsewhere", which is neither this host/);

    const added = await call('POST', '/v1/vms', { token, body: { name: 'web', disks: [{ path: image, format: 'qcow2' }], tags: ['first'] } });
    assert.equal(added.status, 201, JSON.stringify(added.body));
    assert.equal(added.body.disks[0].name, 'web');
    assert.match(await readFile(join(stateDir, 'vms.yaml'), 'utf8'), /name: web/);
    assert.equal((await stat(join(stateDir, 'vms.yaml'))).mode & 0o777, 0o600);
    assert.equal((await call('POST', '/v1/vms', { token, body: { name: 'web', disks: [{ path: image }] } })).status, 409);
    assert.deepEqual((await call('GET', '/v1/vms', { token })).body.items.map((v: { name: string }) => v.name), ['web']);

    const backup = await call('POST', '/v1/vms/web/backups', { token, body: {} });
    assert.equal(backup.status, 202, JSON.stringify(backup.body));
    const done = await jobDone(backup.body.job.id);
    assert.equal(done.state, 'completed', done.error);
    const list = await call('GET', '/v1/backups?vm=web', { token });
    assert.equal(list.body.items.length, 1);
    const host = list.body.items[0].host as string;
    const target = join(stateDir, 'restores', 'web-1');
    const restore = await call('POST', `/v1/backups/${list.body.items[0].id}/restore`, { token, body: { host, directory: target, format: 'qcow2' } });
    assert.equal(restore.status, 202, JSON.stringify(restore.body));
    const restored = await jobDone(restore.body.job.id);
    assert.equal(restored.state, 'completed', restored.error);
    const cmp = await execa('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', image, join(target, 'web.qcow2')], { reject: false });
    assert.equal(cmp.exitCode, 0, cmp.stdout + cmp.stderr);
  });

  test('vms.yaml is reloaded while up runs; an invalid edit is logged with its line and the previous VMs stay', async () => {
    const file = join(stateDir, 'vms.yaml');
    const before = await readFile(file, 'utf8');
    await writeFile(file, `${before}  - name: db\n    disks: [{ path: ${JSON.stringify(join(dir.path, 'db.raw'))} }]\n`);
    await waitFor('db to be listed', async () => (await call('GET', '/v1/vms', { token })).body.items.some((v: { name: string }) => v.name === 'db'), 10_000, () => up!.output());
    await writeFile(file, 'vms:\n  - name: db\n    disks: [{ path: relative.raw }]\n');
    await waitFor('the problem to be logged', () => /vms\.yaml:3:\d+: vms\[0\]\.disks\[0\]\.path: a disk path must be an absolute path/.test(up!.output()), 10_000, () => up!.output());
    assert.deepEqual((await call('GET', '/v1/vms', { token })).body.items.map((v: { name: string }) => v.name), ['web', 'db']);
    await writeFile(file, before.replace(/\n$/, '\n') + `  - name: db\n    disks: [{ path: ${JSON.stringify(join(dir.path, 'db.raw'))} }]\n`);
    const del = await call('DELETE', '/v1/vms/db', { token });
    assert.equal(del.status, 204, JSON.stringify(del.body));
    assert.doesNotMatch(await readFile(file, 'utf8'), /name: db/);
    assert.deepEqual((await call('GET', '/v1/vms', { token })).body.items.map((v: { name: string }) => v.name), ['web']);
    assert.equal((await call('DELETE', '/v1/vms/db', { token })).status, 404);
  });

  test('a worker on another host joins with the printed command, which names the password\'s file, over a Redis that wants the password', async () => {
    const line = up!.output().split('\n').find((l) => l.includes('worker --join'));
    assert.ok(line, up!.output());
    const passwordFile = join(stateDir, 'redis.password');
    const password = (await readFile(passwordFile, 'utf8')).trim();
    assert.ok(!up!.output().includes(password), 'the Redis password is not in up\'s output');
    const m = /^\s*vmvault (.*) --redis-password-file (\S+)$/.exec(line);
    assert.ok(m, line);
    assert.equal(m[2], passwordFile);
    // No password: refused by up's Redis.
    const noAuth = await execa('redis-cli', ['-h', '127.0.0.1', '-p', String(redisPort), 'ping'], { reject: false });
    assert.match(noAuth.stdout + noAuth.stderr, /NOAUTH/);
    const worker = start([...m[1]!.split(' '), '--redis-password-file', m[2]!, '--host', 'hostb', '--state-dir', join(dir.path, 'hostb')], {});
    joined.push(worker);
    await waitFor('the joined worker', () => worker.output().includes('worker started'), 30_000, () => worker.output());
    const clients = await execa('redis-cli', ['-h', '127.0.0.1', '-p', String(redisPort), '--no-auth-warning', '-a', password, 'client', 'list']);
    assert.match(clients.stdout, /addr=127\.0\.0\.1:\d+/, 'the joined worker is connected over TCP');
    assert.equal(await stopProc(worker), 0, worker.output());
  });

  test('a second start prints no token; the stored one still works and a wrong one is refused; token create replaces it', async () => {
    await stopUp();
    let out = await startUp();
    assert.doesNotMatch(out, /admin token:/);
    assert.ok(!out.includes(token));
    assert.match(out, /admin token's SHA-256 is in .*admin-token\.sha256.*token create/);
    assert.match(out, /admin-token still holds the admin API token; delete it once read/, 'an unread token file is pointed out');
    await rm(join(stateDir, 'admin-token'));
    await stopUp();
    out = await startUp();
    assert.doesNotMatch(out, /still holds the admin API token/);
    assert.deepEqual((await call('GET', '/v1/vms', { token })).body.items.map((v: { name: string }) => v.name), ['web']);
    assert.equal((await call('GET', '/v1/vms', { token: 'vv_not-the-token-at-all-000000000' })).status, 401);

    const created = await cli(['token', 'create', '--role', 'admin', '--state-dir', stateDir], BASE_ENV);
    assert.equal(created.code, 0, created.stderr);
    const fresh = created.stdout.trim();
    assert.notEqual(fresh, token);
    await stopUp();
    await startUp();
    assert.equal((await call('GET', '/v1/vms', { token })).status, 401, 'the replaced token is refused');
    assert.equal((await call('GET', '/v1/vms', { token: fresh })).status, 200);
    await stopUp();
  });
});

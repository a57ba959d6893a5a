/**
 * Alerts end to end, with real processes: `vmvault serve` (which runs the alert
 * checks), `vmvault worker`s for hosta and hostb, a redis-server, a local HTTP
 * endpoint that checks each webhook's HMAC signature and timestamp, and a local SMTP
 * server (smtp-server, with a password) that receives the e-mails. A failed job, a
 * missed schedule and a killed worker must each produce a signed webhook and an e-mail;
 * a webhook answered 503 is retried with the same delivery id.
 */
import assert from 'node:assert/strict';
import { createHmac, timingSafeEqual } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { SMTPServer } from 'smtp-server';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { chunkName } from '../../src/repo/chunk.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startService, type TestService } from '../helpers/service.js';

const TOKENS = { viewer: 'viewer-token-alerts-0123', operator: 'operator-token-alerts-0123', admin: 'admin-token-alerts-0123' } as const;
const PASSPHRASE = 'alerts test passphrase';
const SECRET = 'webhook-secret-6f1d0c9a8b7e';
const SMTP_USER = 'vmvault';
const SMTP_PASSWORD = 'smtp-password-3e2a9c';
const MiB = 1024 * 1024;
const DAY = 24 * 3600 * 1000;

interface Hook { event: string; delivery: string; body: any; signed: boolean; fresh: boolean }
interface Mail { from: string; to: string[]; raw: string; text: string }

let redis: TestRedis;
let dir: TempDir;
let service: TestService | undefined;
let hookServer: Server;
let smtp: SMTPServer;
const hooks: Hook[] = [];
const attempts: string[] = [];
const mails: Mail[] = [];
const output = () => service?.output() ?? '';

/** Undoes quoted-printable soft breaks and escapes (nodemailer's body encoding for long lines). */
const unQp = (s: string) => s.replace(/=\r?\n/g, '').replace(/=([0-9A-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16)));

function checkSignature(body: string, ts: string | undefined, sig: string | undefined): boolean {
  if (!ts || !sig?.startsWith('sha256=')) return false;
  const want = createHmac('sha256', SECRET).update(`${ts}.${body}`).digest();
  const got = Buffer.from(sig.slice(7), 'hex');
  return got.length === want.length && timingSafeEqual(got, want);
}

async function call(method: string, path: string, role: keyof typeof TOKENS, body?: unknown): Promise<any> {
  const r = await fetch(`${service!.api}${path}`, {
    method, headers: { authorization: `Bearer ${TOKENS[role]}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return r.json();
}

const both = async (what: string, hookMatch: (h: Hook) => boolean, mailMatch: (m: Mail) => boolean) => {
  const hook = await waitFor(`a webhook for ${what}`, () => hooks.find(hookMatch), 60_000, () => `${JSON.stringify(hooks, null, 1)}\n${output()}`);
  const mail = await waitFor(`an e-mail for ${what}`, () => mails.find(mailMatch), 30_000, () => `${mails.map((m) => m.text).join('\n---\n')}\n${output()}`);
  return { hook, mail };
};

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-alerts-');
  hookServer = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString();
      const delivery = String(req.headers['x-vmvault-delivery']);
      attempts.push(delivery);
      // The first attempt of every delivery fails: each must be retried.
      if (attempts.filter((d) => d === delivery).length === 1) {
        res.writeHead(503).end();
        return;
      }
      const ts = req.headers['x-vmvault-timestamp'] as string | undefined;
      hooks.push({
        event: String(req.headers['x-vmvault-event']), delivery, body: JSON.parse(text),
        signed: checkSignature(text, ts, req.headers['x-vmvault-signature'] as string | undefined),
        fresh: Math.abs(Date.now() / 1000 - Number(ts)) < 300,
      });
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((r) => hookServer.listen(0, '127.0.0.1', r));
  smtp = new SMTPServer({
    disabledCommands: ['STARTTLS'], allowInsecureAuth: true, logger: false,
    onAuth(auth, _session, cb) {
      if (auth.username === SMTP_USER && auth.password === SMTP_PASSWORD) cb(null, { user: auth.username });
      else cb(new Error('bad credentials'));
    },
    onData(stream, session, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const raw = Buffer.concat(chunks).toString();
        mails.push({ from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '', to: session.envelope.rcptTo.map((r) => r.address), raw, text: unQp(raw) });
        cb();
      });
    },
  });
  await new Promise<void>((r) => smtp.listen(0, '127.0.0.1', r));
  const smtpPort = (smtp.server.address() as AddressInfo).port;
  const hookUrl = `http://127.0.0.1:${(hookServer.address() as AddressInfo).port}/hooks/vmvault`;
  const secretFile = join(dir.path, 'webhook-secret');
  await writeFile(secretFile, `${SECRET}\n`, { mode: 0o600 });

  const late = await makeImage(dir.path, 'late.qcow2', 'qcow2', 8 * MiB);
  const db = await makeImage(dir.path, 'db.qcow2', 'qcow2', 8 * MiB);
  const web = await makeImage(dir.path, 'web.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: 4 * MiB, pattern: 0x61 }]);
  const conn = createRedis(redis.url, 'producer');
  await conn.set('vmvault:policy-first-seen:nightly', String(Date.now() - 3 * DAY));
  await closeRedis(conn);
  service = await startService({
    dir: dir.path, redisUrl: redis.url, passphrase: PASSPHRASE, tokens: TOKENS, workers: ['hosta', 'hostb'],
    hosts: ['hostb: { restoreRoots: [] }'],
    vms: [
      `{ name: broken, host: hosta, disks: [{ path: ${JSON.stringify(join(dir.path, 'missing.qcow2'))}, format: qcow2 }] }`,
      `{ name: late, host: hosta, disks: [{ path: ${JSON.stringify(late)} }] }`,
      `{ name: db, host: hostb, disks: [{ path: ${JSON.stringify(db)} }] }`,
      `{ name: web, host: hosta, disks: [{ path: ${JSON.stringify(web)} }] }`,
    ],
    policies: { 'nightly.yaml': 'name: nightly\nschedule: "0 2 * * *"\nselect: { vms: [late] }\nretention: { keepLast: 7 }\n' },
    extraConfig: [
      'alerts:',
      '  checkEvery: 500ms',
      '  offlineAfter: 8s',
      `  webhooks: [{ url: ${JSON.stringify(hookUrl)}, secretFile: ${JSON.stringify(secretFile)}, retryDelay: 100ms }]`,
      '  email:',
      // A local test relay without STARTTLS: the password in cleartext is allowed explicitly.
      `    smtp: { host: 127.0.0.1, port: ${smtpPort}, user: ${SMTP_USER}, passwordEnv: VMVAULT_SMTP_PASSWORD, allowPlaintextAuth: true }`,
      '    from: vmvault@backup.example',
      '    to: [ops@example.com, oncall@example.com]',
    ],
    env: { VMVAULT_HEARTBEAT_MS: '300', VMVAULT_SMTP_PASSWORD: SMTP_PASSWORD },
  });
});

after(async () => {
  await service?.stop();
  await new Promise((r) => hookServer?.close(r));
  await new Promise<void>((r) => (smtp ? smtp.close(() => r()) : r()));
  await redis?.stop();
  await dir?.cleanup();
});

describe('alerts', () => {
  test('a job that failed for good: a signed webhook (retried after a 503) and an e-mail', async () => {
    const accepted = await call('POST', '/v1/vms/broken/backups', 'operator', {});
    const id = accepted.job.id as string;
    const { hook, mail } = await both(`failed job ${id}`, (h) => h.event === 'job_failed' && h.body.details.job === id,
      (m) => m.text.includes(`job ${id}`) && m.text.includes('X-Vmvault-Event: job_failed'));
    assert.equal(hook.signed, true, 'the signature is the HMAC-SHA-256 of timestamp.body under the secret');
    assert.equal(hook.fresh, true);
    assert.equal(attempts.filter((d) => d === hook.delivery).length, 2, 'one 503, then delivered with the same delivery id');
    assert.equal(hook.body.details.code, 'NOT_FOUND');
    assert.equal(hook.body.details.vm, 'broken');
    assert.match(hook.body.details.message, /missing\.qcow2/);
    assert.match(hook.body.summary, /backup job .* of VM broken failed \(NOT_FOUND\)/);
    assert.deepEqual(mail.to.sort(), ['oncall@example.com', 'ops@example.com']);
    assert.equal(mail.from, 'vmvault@backup.example');
    assert.match(mail.text, /missing\.qcow2/);
  });

  test('a VM with no successful backup within its policy\'s period: once per episode', async () => {
    const { hook, mail } = await both('the overdue VM', (h) => h.event === 'backup_overdue', (m) => m.text.includes('X-Vmvault-Event: backup_overdue'));
    assert.equal(hook.signed, true);
    assert.equal(hook.body.details.vm, 'late');
    assert.equal(hook.body.details.policy, 'nightly');
    assert.equal(hook.body.details.lastSuccessAt, null);
    assert.match(mail.text, /VM late has no successful backup within its policy's period/);
    // Several more checks run (every 500 ms): the same episode is not alerted again.
    await new Promise((r) => setTimeout(r, 2500));
    assert.equal(hooks.filter((h) => h.event === 'backup_overdue').length, 1);
    assert.equal(mails.filter((m) => m.text.includes('X-Vmvault-Event: backup_overdue')).length, 1);
  });

  test('a killed worker: its host goes offline, with a webhook and an e-mail', async () => {
    const worker = service!.workers.get('hostb')!;
    assert.equal(hooks.filter((h) => h.event === 'worker_offline').length, 0, 'no alert while both workers run');
    worker.kill('SIGKILL');
    await worker;
    const { hook, mail } = await both('the dead worker', (h) => h.event === 'worker_offline', (m) => m.text.includes('X-Vmvault-Event: worker_offline'));
    assert.equal(hook.signed, true);
    assert.equal(hook.body.details.host, 'hostb');
    assert.deepEqual(hook.body.details.vms, ['db']);
    assert.match(mail.text, /no worker is running on host hostb/);
    assert.equal(hooks.filter((h) => h.event === 'worker_offline').length, 1, 'hosta, whose worker runs, is not alerted');
  });

  test('verify found damage: a webhook and an e-mail naming the backup', async () => {
    const id = (await call('POST', '/v1/vms/web/backups', 'operator', {})).job.id as string;
    const backup = await waitFor('the backup to finish', async () => {
      const j = await call('GET', `/v1/jobs/${id}`, 'viewer');
      return j.state === 'completed' || j.state === 'failed' ? j : undefined;
    }, 60_000, output);
    assert.equal(backup.state, 'completed', backup.error);
    const storage = new LocalStorage(service!.repoUrl);
    const repo = await Repository.open(storage, PASSPHRASE);
    const chunk = (await repo.loadManifest(backup.result.id)).disks[0]!.chunks[0]!;
    const bytes = Buffer.from(await storage.get(chunkName(chunk)));
    bytes[40]! ^= 0xff;
    await storage.put(chunkName(chunk), bytes);
    await storage.close();
    const verify = await call('POST', '/v1/maintenance/verify', 'admin', { readData: true });
    const { hook, mail } = await both('the damaged backup', (h) => h.event === 'verify_damage', (m) => m.text.includes('X-Vmvault-Event: verify_damage'));
    assert.equal(hook.signed, true);
    assert.equal(hook.body.details.backup, backup.result.id);
    assert.equal(hook.body.details.vm, 'web');
    assert.equal(hook.body.details.status, 'damaged');
    assert.equal(hook.body.details.damagedChunks, 1);
    assert.match(mail.text, new RegExp(`verify found backup ${backup.result.id.slice(0, 12)} of VM web damaged`));
    // The verify job itself failed for good (INTEGRITY): that is a job_failed alert too.
    const failed = await waitFor('the verify job\'s alert', () => hooks.find((h) => h.event === 'job_failed' && h.body.details.job === verify.job.id), 30_000, output);
    assert.equal(failed.body.details.code, 'INTEGRITY');
  });

  test('a backup whose manifest cannot be read: a webhook and an e-mail with what to do, once per episode', async () => {
    const storage = new LocalStorage(service!.repoUrl);
    const id = (await (await Repository.open(storage, PASSPHRASE)).backupIds())[0]!;
    const name = `backups/${id}`;
    const good = Buffer.from(await storage.get(name));
    const bad = Buffer.from(good);
    bad[bad.length - 20]! ^= 0x01;
    await storage.put(name, bad);
    try {
      const { hook, mail } = await both('the unreadable backup', (h) => h.event === 'backup_unreadable' && h.body.details.backup === id,
        (m) => m.text.includes('X-Vmvault-Event: backup_unreadable'));
      assert.equal(hook.signed, true);
      assert.equal(hook.body.details.kind, 'damaged');
      assert.match(hook.body.details.problem, new RegExp(name));
      assert.match(hook.body.details.advice, /"vmvault repair --remove" deletes it/);
      assert.match(mail.text, new RegExp(`the manifest of backup ${id.slice(0, 12)} cannot be read`));
      // Several more checks run (every 500 ms): the same episode is not alerted again.
      await new Promise((r) => setTimeout(r, 2500));
      assert.equal(hooks.filter((h) => h.event === 'backup_unreadable').length, 1);
    } finally {
      await storage.put(name, good);
      await storage.close();
    }
    // Put back: the episode ends (its member leaves the Redis set), so a new damage would alert again.
    const conn = createRedis(redis.url, 'producer');
    try {
      await waitFor('the episode to end', async () => (await conn.smembers('vmvault:alerts:episodes:unreadable')).length === 0 || undefined, 15_000, output);
    } finally {
      await closeRedis(conn);
    }
  });

  test('no secret reaches a log, a webhook or an e-mail', () => {
    const all = [output(), ...hooks.map((h) => JSON.stringify(h.body)), ...mails.map((m) => m.raw)].join('\n');
    for (const s of [SECRET, SMTP_PASSWORD]) assert.ok(!all.includes(s), `${s.slice(0, 8)}… leaked`);
    assert.match(output(), /"msg":"alert: backup job/);
  });
});

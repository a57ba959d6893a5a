/**
 * The service as an operator runs it: `vmvault serve`, `vmvault worker` and
 * `vmvault up` as separate processes, against a real redis-server, real qcow2
 * images and a real directory repository. Conditions are polled with deadlines.
 */
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { existsSync } from 'node:fs';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Redis } from 'ioredis';
import type { Queue } from 'bullmq';
import { imageInfo } from '../../src/disk/qemu.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { pingSocket } from '../../src/queue/embedded-redis.js';
import { enqueueBackup, hostQueue } from '../../src/queue/enqueue.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { spawnCli } from '../helpers/cli.js';
import { BASE_ENV, start, stopProc, waitFor, type Proc } from '../helpers/procs.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const PASSWORD = 'service test passphrase';
/**
 * Snapshot names of an image, read with -U (force-share): a running backup holds the image's
 * lock. A read that meets the image's metadata half-written (the backup adding a snapshot or
 * bitmap at that moment; qemu then reports e.g. "Bitmap '' doesn't satisfy the constraints")
 * is tried again.
 */
async function snapshotsOf(disk: string): Promise<string[]> {
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await execa('qemu-img', ['info', '-U', '--output=json', disk]);
      return ((JSON.parse(r.stdout) as { snapshots?: Array<{ name: string }> }).snapshots ?? []).map((x) => x.name);
    } catch (err) {
      if (attempt >= 20) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

interface Setup { dir: TempDir; repoUrl: string; passFile: string; policiesDir: string; configFile: string; repo: Repository }

async function setup(host: string, vms: Array<{ name: string; disk: string }>): Promise<Setup> {
  const dir = await tempDir('vmvault-svc-');
  const repoUrl = join(dir.path, 'repo');
  const passFile = join(dir.path, 'password');
  const policiesDir = join(dir.path, 'policies');
  await mkdir(policiesDir);
  await writeFile(passFile, `${PASSWORD}\n`, { mode: 0o600 });
  const repo = await Repository.init(new LocalStorage(repoUrl), PASSWORD, { kdf: 'weak' });
  const configFile = join(dir.path, 'vmvault.yaml');
  const vmLines = vms.map((v) => `  - name: ${v.name}\n    disks: [{ path: ${JSON.stringify(v.disk)} }]\n`).join('');
  await writeFile(configFile, [
    `repository: { url: ${JSON.stringify(repoUrl)}, passwordFile: ${JSON.stringify(passFile)} }`,
    `redis: { url: ${JSON.stringify(redis.url)} }`,
    `host: ${host}`,
    `policiesDir: ${JSON.stringify(policiesDir)}`,
    `stateDir: ${JSON.stringify(join(dir.path, 'state'))}`,
    // Any free port: several serve processes run at once here.
    'api: { listen: "127.0.0.1:0" }',
    'vms:',
    vmLines,
  ].join('\n'));
  return { dir, repoUrl, passFile, policiesDir, configFile, repo };
}

const perSecondPolicy = (name: string, vms: string[]) =>
  `name: ${name}\nschedule: "* * * * * *"\nselect:\n  vms: [${vms.join(', ')}]\nretention:\n  keepLast: 1000\n`;

let redis: TestRedis;
let conn: Redis;
const queues: Queue[] = [];
const queueFor = (host: string) => {
  const q = hostQueue(conn, host);
  queues.push(q);
  return q;
};

before(async () => {
  redis = await startRedis();
  conn = createRedis(redis.url, 'producer');
});
after(async () => {
  for (const q of queues) await q.close().catch(() => {});
  await closeRedis(conn);
  await redis.stop();
});

describe('vmvault serve and worker', () => {
  test('a per-second policy with two schedulers makes exactly one backup per VM per slot', async () => {
    const dir = await tempDir('vmvault-img-');
    const host = 'svc-a';
    const disks = await Promise.all(['web', 'db'].map((n, i) =>
      makeImage(dir.path, `${n}.qcow2`, 'qcow2', 2 * 1024 * 1024, [{ offset: 0, length: 256 * 1024, pattern: 0x31 + i }])));
    const s = await setup(host, [{ name: 'web', disk: disks[0]! }, { name: 'db', disk: disks[1]! }]);
    await writeFile(join(s.policiesDir, 'persec.yaml'), perSecondPolicy('persec', ['web', 'db']));
    const queue = queueFor(host);
    const env = { VMVAULT_CONFIG: s.configFile };
    const procs: Proc[] = [];
    try {
      const worker = start(['worker'], env);
      const serve1 = start(['serve'], env);
      const serve2 = start(['serve'], env);
      procs.push(worker, serve1, serve2);
      const diag = () => procs.map((p, i) => `--- process ${i}\n${p.output()}`).join('\n');
      // Both schedulers have started and fired for at least three slots.
      await waitFor('both schedulers started', () => [serve1, serve2].every((p) => p.output().includes('scheduler started')), 20_000, diag);
      // Run until each VM has backups of at least three slots.
      await waitFor('three completed backups of each VM', async () => {
        const done = await queue.getJobs(['completed'], 0, -1);
        return ['web', 'db'].every((vm) => done.filter((j) => j.data.vm === vm).length >= 3);
      }, 30_000, diag);
      assert.equal(await stopProc(serve1), 0, diag());
      assert.equal(await stopProc(serve2), 0, diag());
      await waitFor('the queue to drain', async () => {
        const c = await queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized');
        return (c.waiting ?? 0) + (c.active ?? 0) + (c.delayed ?? 0) + (c.prioritized ?? 0) === 0;
      }, 30_000, diag);
      assert.equal(await stopProc(worker), 0, diag());

      const completed = await queue.getJobs(['completed'], 0, -1);
      const failed = await queue.getJobs(['failed'], 0, -1);
      assert.deepEqual(failed.map((j) => `${j.id}: ${j.failedReason}`), []);
      const perSlot = new Map<string, string[]>();
      for (const j of completed) {
        const key = `${j.data.vm}@${j.data.slot}`;
        perSlot.set(key, [...(perSlot.get(key) ?? []), j.id!]);
      }
      for (const [key, ids] of perSlot) assert.equal(ids.length, 1, `(vm, slot) ${key} has jobs ${ids.join(', ')}`);
      for (const vm of ['web', 'db']) {
        const slots = completed.filter((j) => j.data.vm === vm).length;
        assert.ok(slots >= 3, `expected at least 3 slots of ${vm}, got ${slots}`);
      }
      const ids = new Set(completed.map((j) => j.id));
      assert.equal(ids.size, completed.length);
      const manifests = (await Repository.open(new LocalStorage(s.repoUrl), PASSWORD).then((r) => r.manifests())).filter((m) => m.policy === 'persec');
      assert.equal(manifests.length, ids.size, 'one backup per completed job, no duplicates');
      assert.deepEqual(new Set(completed.map((j) => (j.returnvalue as { id: string }).id)), new Set(manifests.map((m) => m.id)));
    } finally {
      for (const p of procs) await stopProc(p, 'SIGKILL').catch(() => {});
      await s.dir.cleanup();
      await dir.cleanup();
    }
  });

  test('SIGKILL of a worker mid-backup: another worker completes the job, one backup, no snapshot left', async () => {
    const dir = await tempDir('vmvault-img-');
    const host = 'svc-k';
    const raw = join(dir.path, 'big.raw');
    const disk = join(dir.path, 'big.qcow2');
    await execa('sh', ['-c', `head -c ${300 * 1024 * 1024} /dev/urandom > "$1"`, 'sh', raw]);
    await execa('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, disk]);
    const s = await setup(host, [{ name: 'big', disk }]);
    const queue = queueFor(host);
    const env = {
      VMVAULT_CONFIG: s.configFile, VMVAULT_JOB_LOCK_MS: '2000', VMVAULT_STALLED_INTERVAL_MS: '1000',
      VMVAULT_VM_LOCK_TTL_MS: '3000',
    };
    const procs: Proc[] = [];
    const slot = '2026-01-01T00:00:00.000Z';
    try {
      const w1 = start(['worker'], env);
      procs.push(w1);
      const diag = () => procs.map((p, i) => `--- worker ${i + 1}\n${p.output()}`).join('\n');
      await waitFor('worker 1 started', () => w1.output().includes('worker started'), 20_000, diag);
      const job = await enqueueBackup(queue, { vm: 'big', disks: [{ path: disk }], policy: 'kill', slot }, { jobId: 'kill-big-slot' });
      // Mid-backup: the job runs and its internal snapshot exists.
      await waitFor('the backup to be under way', async () => {
        const state = await queue.getJobState(job.id!);
        const snaps = (await snapshotsOf(disk)).filter((n) => n.startsWith('vmvault-'));
        return state === 'active' && snaps.length > 0;
      }, 20_000, diag);
      await stopProc(w1, 'SIGKILL');
      assert.ok((await snapshotsOf(disk)).some((n) => n.startsWith('vmvault-')), 'the killed run left its snapshot');
      assert.equal(await queue.getJobState(job.id!), 'active');

      const w2 = start(['worker'], env);
      procs.push(w2);
      await waitFor('worker 2 to complete the job', async () => {
        const st = await queue.getJobState(job.id!);
        if (st === 'failed') throw new Error(`job failed: ${(await queue.getJob(job.id!))?.failedReason}\n${diag()}`);
        return st === 'completed';
      }, 45_000, diag);
      assert.equal(await stopProc(w2), 0, diag());

      const manifests = (await s.repo.manifests()).filter((m) => m.vm === 'big');
      assert.equal(manifests.length, 1, 'exactly one backup for the slot');
      assert.equal(manifests[0]!.policy, 'kill');
      const snaps = (await imageInfo(disk)).snapshots.map((x) => x.name);
      assert.deepEqual(snaps.filter((n) => n.startsWith('vmvault-')), [], 'no vmvault- snapshot remains');
    } finally {
      for (const p of procs) await stopProc(p, 'SIGKILL').catch(() => {});
      await s.dir.cleanup();
      await dir.cleanup();
    }
  });

  test('a malformed policy and an unknown VM are reported; the valid policy keeps running', async () => {
    const dir = await tempDir('vmvault-img-');
    const host = 'svc-b';
    const disk = await makeImage(dir.path, 'one.qcow2', 'qcow2', 1024 * 1024);
    const s = await setup(host, [{ name: 'one', disk }]);
    await writeFile(join(s.policiesDir, 'good.yaml'), perSecondPolicy('good', ['one']));
    await writeFile(join(s.policiesDir, 'broken.yaml'), 'name: broken\nschedule: "* * * * * *"\nselect:\n  vms: [one]\nretention:\n  keepLast: many\n');
    await writeFile(join(s.policiesDir, 'ghost.yaml'), perSecondPolicy('ghost', ['ghost-vm']));
    const queue = queueFor(host);
    const serve = start(['serve'], { VMVAULT_CONFIG: s.configFile, VMVAULT_NO_CATCH_UP: '1' });
    try {
      await waitFor('the errors to be logged and two slots of the valid policy enqueued', async () => {
        const jobs = await queue.getJobs(['waiting', 'prioritized'], 0, -1);
        const good = jobs.filter((j) => j.data.policy === 'good');
        return good.length >= 2 && serve.output().includes('ghost-vm');
      }, 20_000, () => serve.output());
      const out = serve.output();
      assert.match(out, /policy skipped: [^"]*broken\.yaml:6:\d+: retention\.keepLast/);
      assert.match(out, /policy ghost selects unknown VM or tag \\"ghost-vm\\"/);
      assert.equal(await stopProc(serve), 0, out);
      const jobs = await queue.getJobs(['waiting', 'prioritized'], 0, -1);
      assert.ok(jobs.every((j) => j.data.policy === 'good' && j.data.vm === 'one'));
    } finally {
      await stopProc(serve, 'SIGKILL').catch(() => {});
      await queue.obliterate({ force: true }).catch(() => {});
      await s.dir.cleanup();
      await dir.cleanup();
    }
  });
});

describe('vmvault up', () => {
  test('with no configuration: own Redis and repository in the state directory; SIGTERM stops both, exit 0', async () => {
    const dir = await tempDir('vmvault-up-');
    const stateDir = join(dir.path, 'state');
    const socket = join(stateDir, 'redis.sock');
    const upProc = start(['up'], { VMVAULT_STATE_DIR: stateDir, VMVAULT_API_LISTEN: '127.0.0.1:0' });
    try {
      await waitFor('up to be running', () => upProc.output().includes('vmvault: up:'), 40_000, () => upProc.output());
      const out = upProc.output();
      assert.ok(existsSync(join(stateDir, 'repository', 'config')) || existsSync(join(stateDir, 'repository')), 'repository created');
      const passFile = join(stateDir, 'passphrase');
      assert.equal((await stat(passFile)).mode & 0o777, 0o600);
      assert.match(out, new RegExp(`passphrase is in ${passFile.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
      assert.match(out, /key export --paper/);
      assert.ok(await pingSocket(socket), 'its redis-server answers PING');
      // It serves the HTTP API: health needs no token, anything else does.
      const api = /API on (http:\/\/\S+)/.exec(upProc.output())?.[1];
      assert.ok(api, upProc.output());
      const health = await fetch(`${api}/v1/health`);
      assert.equal(health.status, 200, await health.clone().text());
      assert.deepEqual(await health.json(), { status: 'ok', redis: 'ok', repository: 'ok' });
      assert.equal((await fetch(`${api}/v1/vms`)).status, 401);
      // The repository opens with the stored passphrase.
      const r = await spawnCli(['--repo', join(stateDir, 'repository'), '--password-file', passFile, 'key', 'list'], BASE_ENV);
      assert.equal(r.exitCode, 0, String(r.stderr));
      assert.equal(await stopProc(upProc), 0, upProc.output());
      assert.equal(await pingSocket(socket), false, 'redis-server stopped');
    } finally {
      await stopProc(upProc, 'SIGKILL').catch(() => {});
      await dir.cleanup();
    }
  });
});

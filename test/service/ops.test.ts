/**
 * Service papercuts from operations, through the real CLI as operators start it:
 * a missing policies directory, `up --state-dir` with a configuration that names
 * none, and SIGTERM while a worker cannot reach Redis.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { metaPath } from '../../src/vm/snapshot-store.js';
import { DEFAULT_STATE_DIR } from '../../src/config/schema.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { start, stopProc, waitFor, type Proc } from '../helpers/procs.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';

const PASSWORD = 'ops test passphrase';
const MiB = 1024 * 1024;
let redis: TestRedis;
let dir: TempDir;
let n = 0;

before(async () => {
  redis = await startRedis();
  dir = await tempDir('vmvault-svc-ops-');
});
after(async () => {
  await redis?.stop();
  await dir?.cleanup();
});

/** A configuration directory with a repository; `lines` are the rest of vmvault.yaml. */
async function configWith(lines: string[], opts: { repo?: boolean } = {}): Promise<{ base: string; file: string }> {
  const base = join(dir.path, `c${n++}`);
  const { mkdir } = await import('node:fs/promises');
  await mkdir(base);
  const head: string[] = [];
  if (opts.repo !== false) {
    const repoUrl = join(base, 'repo');
    const passFile = join(base, 'password');
    await writeFile(passFile, `${PASSWORD}\n`, { mode: 0o600 });
    await Repository.init(new LocalStorage(repoUrl), PASSWORD, { kdf: 'weak' });
    head.push(`repository: { url: ${JSON.stringify(repoUrl)}, passwordFile: ${JSON.stringify(passFile)} }`);
  }
  const file = join(base, 'vmvault.yaml');
  await writeFile(file, [...head, ...lines, ''].join('\n'));
  return { base, file };
}

/**
 * One SIGTERM, sent as systemd or kill(1) would (execa's kill() would follow it with a
 * SIGKILL after 5 s). The exit code, or undefined when the process had to be killed
 * after `ms`; -1 when a signal ended it.
 */
async function terminate(p: Proc, ms: number): Promise<number | undefined> {
  let killed = false;
  const timer = setTimeout(() => { killed = true; p.kill('SIGKILL'); }, ms);
  process.kill(p.pid!, 'SIGTERM');
  try {
    const r = await p;
    return killed ? undefined : r.exitCode ?? -1;
  } finally {
    clearTimeout(timer);
  }
}

describe('a policies directory that does not exist', () => {
  test('the default one (policiesDir not set) is created, and serve runs', async () => {
    const { base, file } = await configWith([`redis: { url: ${JSON.stringify(redis.url)} }`, `stateDir: ${JSON.stringify(join(dir.path, 'st-default'))}`, 'api: { listen: "127.0.0.1:0" }', 'vms: []']);
    const serve = start(['serve', '--config', file], { VMVAULT_NO_CATCH_UP: '1' });
    try {
      await waitFor('the scheduler to start', () => serve.output().includes('scheduler started') || serve.exitCode !== null, 30_000, () => serve.output());
      assert.ok((await stat(join(base, 'policies'))).isDirectory(), serve.output());
      assert.doesNotMatch(serve.output(), /unexpected error/);
      assert.equal(await stopProc(serve), 0, serve.output());
    } finally {
      await stopProc(serve, 'SIGKILL').catch(() => {});
    }
  });

  test('a named one that is missing: serve exits 1 naming the directory and what to do', async () => {
    const missing = join(dir.path, 'no-such', 'policies');
    const { file } = await configWith([`redis: { url: ${JSON.stringify(redis.url)} }`, `policiesDir: ${JSON.stringify(missing)}`, 'api: { listen: "127.0.0.1:0" }', 'vms: []']);
    const serve = start(['serve', '--config', file]);
    const code = await serve.then((r) => r.exitCode);
    assert.equal(code, 1, serve.output());
    assert.ok(serve.output().includes(`vmvault: error: policiesDir ${missing} does not exist: create it (mkdir -p ${missing})`), serve.output());
    assert.doesNotMatch(serve.output(), /unexpected error|scandir/);
    assert.equal(existsSync(missing), false, 'a named directory is not created');
  });
});

describe('vmvault up --state-dir', () => {
  test('with a configuration naming no stateDir, snapshot records go to --state-dir', async () => {
    const token = 'ops-operator-token-0123456789';
    const vm = `web${process.pid}`;
    const disk = await makeImage(dir.path, `${vm}.qcow2`, 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x33 }]);
    const { base, file } = await configWith([
      'api:', '  tokens:', `    - { name: op, role: operator, sha256: ${createHash('sha256').update(token).digest('hex')} }`,
      'vms:', `  - { name: ${vm}, disks: [{ path: ${JSON.stringify(disk)} }] }`,
    ], { repo: false });
    const stateDir = join(base, 'state');
    const wrong = metaPath(DEFAULT_STATE_DIR, vm);
    const up = start(['up', '--config', file, '--state-dir', stateDir], { VMVAULT_API_LISTEN: '127.0.0.1:0', VMVAULT_NO_CATCH_UP: '1' });
    try {
      const api = await waitFor('up to listen', () => /API on (http:\/\/\S+)/.exec(up.output())?.[1], 60_000, () => up.output());
      const r = await fetch(`${api}/v1/vms/${vm}/snapshots`, {
        method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'before' }),
      });
      assert.equal(r.status, 202, await r.clone().text());
      const job = ((await r.json()) as { job: { id: string } }).job.id;
      const state = await waitFor(`job ${job}`, async () => {
        const j = (await (await fetch(`${api}/v1/jobs/${encodeURIComponent(job)}`, { headers: { authorization: `Bearer ${token}` } })).json()) as { state: string; error?: string };
        return j.state === 'completed' || j.state === 'failed' ? j : undefined;
      }, 60_000, () => up.output());
      assert.equal(state.state, 'completed', state.error);
      assert.ok(existsSync(metaPath(stateDir, vm)), `the snapshot record is in ${stateDir}`);
      assert.equal(existsSync(wrong), false, `nothing was written to ${wrong}`);
      assert.equal(await stopProc(up), 0, up.output());
    } finally {
      await stopProc(up, 'SIGKILL').catch(() => {});
      await rm(wrong, { force: true });
      await rm(wrong.replace(/\.json$/, '.lock'), { force: true, recursive: true });
    }
  });
});

describe('SIGTERM while a worker cannot reach Redis', () => {
  test('a worker whose Redis never answered stops on the first SIGTERM', async () => {
    const { file } = await configWith([`redis: { url: "unix://${join(dir.path, 'nobody-listens.sock')}" }`, 'vms: []']);
    const worker = start(['worker', '--config', file]);
    await waitFor('the worker to try Redis', () => worker.output().includes('redis connection error'), 30_000, () => worker.output());
    const code = await terminate(worker, 15_000);
    assert.notEqual(code, undefined, `still running 15 s after one SIGTERM:\n${worker.output()}`);
    assert.equal(code, 0, worker.output());
    assert.match(worker.output(), /stopping/);
  });

  test('a worker that lost Redis while running stops on the first SIGTERM', async () => {
    const own = await startRedis();
    let stopped = false;
    try {
      const { file } = await configWith([`redis: { url: ${JSON.stringify(own.url)} }`, 'vms: []']);
      const worker = start(['worker', '--config', file], { VMVAULT_CLOSE_TIMEOUT_MS: '1000' });
      await waitFor('the worker to start', () => worker.output().includes('worker started'), 30_000, () => worker.output());
      await own.stop();
      stopped = true;
      await waitFor('the worker to notice', () => worker.output().includes('redis connection error'), 30_000, () => worker.output());
      const code = await terminate(worker, 30_000);
      assert.notEqual(code, undefined, `still running 30 s after one SIGTERM:\n${worker.output()}`);
      assert.ok(code === 0 || code === 1, `exit code ${code}\n${worker.output()}`);
    } finally {
      if (!stopped) await own.stop();
    }
  });
});

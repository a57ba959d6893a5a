/**
 * Operator papercuts, through the real CLI: the version, durations that say what
 * they mean, and errors that name the CLI's own flags.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cli, cliJson, spawnCli, type Env } from '../helpers/cli.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { acquireLock, readLocks } from '../../src/repo/locks.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
let dir: TempDir;
let env: Env;
let disk: string;

before(async () => {
  dir = await tempDir('vmvault-cli-ops-');
  disk = await makeImage(dir.path, 'web.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x42 }]);
  const config = join(dir.path, 'vmvault.yaml');
  await writeFile(config, `stateDir: ${JSON.stringify(join(dir.path, 'state'))}\nvms:\n  - { name: web, disks: [{ path: ${JSON.stringify(disk)} }] }\n`);
  env = {
    PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR,
    VMVAULT_REPOSITORY: join(dir.path, 'repo'), VMVAULT_PASSWORD: 'ops test passphrase', VMVAULT_CONFIG: config,
  };
  const r = await cli(['init', '--kdf', 'weak'], env);
  assert.equal(r.code, 0, r.stderr);
});

after(async () => {
  await dir?.cleanup();
});

describe('vmvault --version', () => {
  test('prints package.json\'s version and exits 0, as -V too', async () => {
    for (const flag of ['--version', '-V']) {
      const r = await cli([flag]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), pkg.version);
    }
  });
});

describe('durations on the command line', () => {
  test('--expire-in 30m is refused as ambiguous, naming the flag; 30min is thirty minutes', async () => {
    const bad = await cli(['snapshot', 'create', 'web', '--name', 'm-ambiguous', '--expire-in', '30m'], env);
    assert.equal(bad.code, 1, bad.stderr);
    assert.match(bad.stderr, /--expire-in: "30m" is ambiguous: write 30min for minutes or 30mo for months/);
    const zero = await cli(['snapshot', 'create', 'web', '--name', 'zero', '--expire-in', '0min'], env);
    assert.match(zero.stderr, /--expire-in 0min is zero/);
    const before = Date.now();
    const made = await cli(['snapshot', 'create', 'web', '--name', 'half-hour', '--expire-in', '30min'], env);
    assert.equal(made.code, 0, made.stderr);
    const list = await cliJson<Array<{ name: string; expiresAt?: string }>>(['snapshot', 'list', 'web'], env);
    const snap = list.find((s) => s.name === 'half-hour');
    assert.ok(snap?.expiresAt, JSON.stringify(list));
    const inMs = Date.parse(snap.expiresAt) - before;
    assert.ok(inMs > 29 * 60_000 && inMs < 31 * 60_000, `expires in ${inMs} ms`);
    const months = await cli(['snapshot', 'create', 'web', '--name', 'months', '--expire-in', '3mo'], env);
    assert.equal(months.code, 0, months.stderr);
  });
});

describe('errors name the CLI\'s flags', () => {
  test('a restore over existing files says to pass --force', async () => {
    const made = await cliJson<{ id: string }>(['backup', '--vm', 'web', '--disk', disk], env);
    const to = join(dir.path, 'restored');
    await mkdir(to);
    await cliJson(['restore', made.id, '--to', to], env);
    const again = await cli(['restore', made.id, '--to', to], env);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already exist.*pass --force to replace them; nothing was written/);
    assert.doesNotMatch(again.stderr, /overwrite/);
  });
});

describe('--retry-lock: a backup that meets another process\'s lock', () => {
  /** Runs `vmvault <args>` and resolves once its stderr matches `re` (with what it printed so far). */
  const runUntil = (args: string[], re: RegExp) => {
    const p = spawnCli(args, env);
    let err = '';
    const seen = new Promise<string>((resolve) => {
      p.stderr!.on('data', (b: Buffer) => { err += String(b); if (re.test(err)) resolve(err); });
      void p.finally(() => resolve(err));
    });
    return { p, seen };
  };

  test('waits for gc\'s lock and backs up once it is released; without the flag it fails at once; a bad duration names the flag', async () => {
    const repo = await Repository.open(new LocalStorage(env.VMVAULT_REPOSITORY!), env.VMVAULT_PASSWORD!, { cacheDir: false });
    const gc = await acquireLock(repo, 'exclusive', { purpose: 'garbage collection' });
    try {
      const at = await cli(['backup', '--vm', 'web', '--disk', disk], env);
      assert.equal(at.code, 1);
      assert.match(at.stderr, /the repository is locked \(exclusive lock for garbage collection by .*\): try again when that finishes/);
      const bad = await cli(['--retry-lock', '5', 'backup', '--vm', 'web', '--disk', disk], env);
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, /--retry-lock: "5" is not a duration: no unit after 5 .*; or seconds, e.g\. 90s/);
      const { p, seen } = runUntil(['--retry-lock', '2min', 'backup', '--vm', 'web', '--disk', disk, '--json'], /waiting for the repository's lock/);
      assert.match(await seen, /warning: backup of web is waiting for the repository's lock \(exclusive lock for garbage collection by .*\), up to 1\d\d s more/);
      await gc.release();
      const r = await p;
      assert.equal(r.exitCode, 0, String(r.stderr));
      const made = JSON.parse(String(r.stdout)) as { id: string };
      const out = join(dir.path, 'after-wait');
      await mkdir(out);
      await cliJson(['restore', made.id, '--to', out], env);
      assert.deepEqual(await readLocks(repo), []);
    } finally {
      await gc.release();
    }
  });

  test('Ctrl-C while waiting ends the backup at once and leaves no lock of its own', async () => {
    const repo = await Repository.open(new LocalStorage(env.VMVAULT_REPOSITORY!), env.VMVAULT_PASSWORD!, { cacheDir: false });
    const gc = await acquireLock(repo, 'exclusive', { purpose: 'garbage collection' });
    try {
      const { p, seen } = runUntil(['--retry-lock', '1h', 'backup', '--vm', 'web', '--disk', disk], /waiting for the repository's lock/);
      assert.match(await seen, /up to 3\d\d\d s more/);
      p.kill('SIGINT');
      const r = await p;
      assert.equal(r.exitCode, 1, String(r.stderr));
      assert.match(String(r.stderr), /the backup was interrupted \(SIGINT\)/);
      assert.deepEqual((await readLocks(repo)).map((l) => l.lock?.purpose), ['garbage collection']);
    } finally {
      await gc.release();
    }
  });
});

/**
 * Operator papercuts, through the real CLI: the version, durations that say what
 * they mean, and errors that name the CLI's own flags.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cli, cliJson, type Env } from '../helpers/cli.js';
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

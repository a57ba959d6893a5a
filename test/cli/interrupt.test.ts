/**
 * A qemu-nbd that stops answering, and Ctrl-C, through the real CLI. qemu-nbd is the
 * real one, reached through a wrapper on PATH that records its pid (exec: the pid is
 * qemu-nbd's); the test SIGSTOPs it once the backup or restore is under way. A stalled
 * export fails the command within the reply timeout; SIGINT stops a restore and
 * removes its temporary file; a second SIGINT exits at once and says what is left.
 * Every case ends with no lock in the repository and nothing committed.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { chmod, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { cli, cliJson, type Env } from '../helpers/cli.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { start, waitFor, type Proc } from '../helpers/procs.js';

const MiB = 1024 * 1024;
let dir: TempDir;
let env: Env;
let raw: string;
let vmdk: string;
let clone: string;
let backupId: string;
const stopped = new Set<number>();

const pidsFile = () => join(dir.path, 'qemu-nbd.pids');
const pids = async () => (await readFile(pidsFile(), 'utf8').catch(() => '')).split('\n').filter(Boolean).map(Number);
const locks = async () => readdir(join(dir.path, 'repo', 'locks')).catch(() => []);
const manifests = async () => (await cliJson<unknown[]>(['backups'], env)).length;

/** What process `pid` has read so far (/proc/PID/io rchar), 0 when it cannot be told. */
const readBytes = (pid: number): number => {
  try {
    return Number(/^rchar: (\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
};

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/** SIGSTOPs the qemu-nbd this command started (the newest still running) once `ready` says so. */
async function stopQemuNbd(p: Proc, ready: (pid: number) => Promise<boolean>): Promise<number> {
  const known = new Set(await pids());
  const mine = async () => (await pids()).filter((pid) => !known.has(pid) && alive(pid)).at(-1);
  await waitFor('qemu-nbd to start', mine, 60_000, p.output);
  await waitFor('the command to be under way', async () => { const pid = await mine(); return pid !== undefined && ready(pid); }, 60_000, p.output, 10);
  const pid = await waitFor('qemu-nbd to run', mine, 10_000, p.output);
  process.kill(pid, 'SIGSTOP');
  stopped.add(pid);
  return pid;
}

before(async () => {
  dir = await tempDir('vmvault-cli-interrupt-');
  const bin = join(dir.path, 'bin');
  await execa('mkdir', [bin]);
  const real = (await execa('sh', ['-c', 'command -v qemu-nbd'])).stdout.trim();
  await writeFile(join(bin, 'qemu-nbd'), `#!/bin/sh\necho $$ >> ${pidsFile()}\nexec ${real} "$@"\n`);
  await chmod(join(bin, 'qemu-nbd'), 0o755);
  env = {
    PATH: `${bin}:${process.env.PATH}`, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, VMVAULT_PASSWORD: 'interrupt test passphrase',
    VMVAULT_CACHE_DIR: join(dir.path, 'cache'), VMVAULT_REPOSITORY: join(dir.path, 'repo'),
  };
  assert.equal((await cli(['init', '--kdf', 'weak', '--json'], env)).code, 0);
  // One pattern: the backup stores one chunk, quickly; the restore writes every byte through qemu-nbd.
  raw = await makeImage(dir.path, 'pattern.raw', 'raw', 256 * MiB, [{ offset: 0, length: 256 * MiB, pattern: 0x5a }]);
  backupId = (await cliJson<{ id: string }>(['backup', '--vm', 'p', '--disk', `root=${raw}`, '--format', 'raw'], env)).id;
  // Random data, read through qemu-nbd (vmdk): a backup of it takes seconds.
  const random = join(dir.path, 'random.raw');
  await execa('sh', ['-c', `head -c ${256 * MiB} /dev/urandom > ${random}`]);
  vmdk = join(dir.path, 'random.vmdk');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', random, vmdk]);
  // A linked clone: its snapshot is read through qemu-nbd (--allow-chain).
  const base = join(dir.path, 'base.qcow2');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', random, base]);
  clone = join(dir.path, 'clone.qcow2');
  await execa('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', clone]);
});

const snapshotsOf = async (image: string) => (await execa('qemu-img', ['snapshot', '-l', '-U', image])).stdout;
const bitmapsOf = async (image: string) => (JSON.parse((await execa('qemu-img', ['info', '-U', '--output=json', image])).stdout) as { 'format-specific'?: { data?: { bitmaps?: { name: string }[] } } })['format-specific']?.data?.bitmaps?.map((b) => b.name) ?? [];

afterEach(() => {
  for (const pid of stopped) {
    try {
      process.kill(pid, 'SIGCONT');
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
  stopped.clear();
});

after(async () => {
  await dir?.cleanup();
});

async function tmpFiles(target: string): Promise<string[]> {
  return (await readdir(target).catch(() => [] as string[])).filter((n) => n.includes('.vmvault-tmp-'));
}

/** Whether a qcow2 restore has written a few MiB into its temporary file. */
const writing = (target: string) => async () => {
  for (const n of await tmpFiles(target)) if (((await stat(join(target, n)).catch(() => undefined))?.size ?? 0) > 4 * MiB) return true;
  return false;
};

describe('a qemu-nbd that stops answering', { timeout: 300_000 }, () => {
  test('fails a restore within the reply timeout: no temporary file, no lock', async () => {
    const target = join(dir.path, 'restore-stall');
    const started = Date.now();
    const p = start(['restore', backupId, '--to', target, '--format', 'qcow2'], { ...env, VMVAULT_NBD_REPLY_TIMEOUT_MS: '2000' });
    await stopQemuNbd(p, writing(target));
    const r = await p;
    assert.notEqual(r.exitCode, 0, p.output());
    assert.match(p.output(), /qemu-nbd for .*\.vmvault-tmp-.* did not answer for 2 s/);
    assert.ok(Date.now() - started < 60_000, `took ${Date.now() - started} ms`);
    assert.deepEqual(await tmpFiles(target), []);
    assert.deepEqual(await locks(), []);
  });

  test('fails a backup of a vmdk within the reply timeout: nothing committed, no lock', async () => {
    const before = await manifests();
    const p = start(['backup', '--vm', 'v', '--disk', `root=${vmdk}`, '--format', 'vmdk'], { ...env, VMVAULT_NBD_REPLY_TIMEOUT_MS: '2000' });
    // Stopped once it serves the backup's reads (it has read 8 MiB of the image), not before it listens.
    await stopQemuNbd(p, async (pid) => readBytes(pid) > 8 * MiB);
    const r = await p;
    assert.notEqual(r.exitCode, 0, p.output());
    assert.match(p.output(), new RegExp(`qemu-nbd for ${vmdk.replace(/[.]/g, '\\.')} did not answer for 2 s`));
    assert.equal(await manifests(), before);
    assert.deepEqual(await locks(), []);
  });
});

describe('Ctrl-C', { timeout: 300_000 }, () => {
  test('stops a restore: its temporary file is removed, its lock released, and it says so', async () => {
    const target = join(dir.path, 'restore-int');
    const p = start(['restore', backupId, '--to', target, '--format', 'qcow2'], env);
    // qemu-nbd stopped: the restore is held where an interrupt must not wait for it.
    await stopQemuNbd(p, writing(target));
    p.kill('SIGINT');
    const r = await p;
    assert.equal(r.exitCode, 1, p.output());
    assert.match(p.output(), /SIGINT: stopping the restore/);
    assert.match(p.output(), /the restore was interrupted \(SIGINT\): its partly written files were removed/);
    assert.deepEqual(await tmpFiles(target), []);
    assert.deepEqual(await locks(), []);
  });

  test('twice: a backup exits at once, releases its lock and says what is left, which the next backup removes', async () => {
    const before = await manifests();
    const args = ['backup', '--vm', 'c', '--disk', `root=${clone}`, '--format', 'qcow2', '--allow-chain'];
    const p = start(args, env);
    const pid = await stopQemuNbd(p, async () => { await new Promise((r) => setTimeout(r, 500)); return true; });
    p.kill('SIGINT');
    // The cleanup now waits for the stopped qemu-nbd to exit: the second signal does not wait for it.
    await waitFor('the first signal to be taken', () => /stopping the backup/.test(p.output()), 20_000, p.output);
    const at = Date.now();
    p.kill('SIGINT');
    const r = await p;
    assert.equal(r.exitCode, 130, p.output());
    assert.ok(Date.now() - at < 4000, `took ${Date.now() - at} ms`);
    assert.match(p.output(), /SIGINT again: exiting without finishing the cleanup/);
    const left = /internal snapshot (vmvault-[0-9a-f]+) and dirty bitmap (vmvault-\S+) in (\S+): the next backup of this image removes them/.exec(p.output());
    assert.ok(left, p.output());
    assert.equal(left[3], clone);
    assert.deepEqual(await locks(), []);
    assert.equal(await manifests(), before);
    // What it says is there is there, and goes with the next backup.
    process.kill(pid, 'SIGCONT');
    process.kill(pid, 'SIGKILL');
    assert.match(await snapshotsOf(clone), new RegExp(left[1]!));
    assert.ok((await bitmapsOf(clone)).includes(left[2]!));
    await cliJson(args, env);
    assert.doesNotMatch(await snapshotsOf(clone), new RegExp(left[1]!));
    assert.ok(!(await bitmapsOf(clone)).includes(left[2]!));
  });
});

/**
 * Instant restore with a real qemu-system-x86_64 (software emulation, SeaBIOS, no
 * guest OS) started by `vmvault restore --instant --start`: the VM answers on QMP
 * within seconds while the rate-limited copy is still running; after the pivot the
 * final image equals the backup and the overlay, the export and the state file are
 * gone. Killing vmvault (which is the exporter) during the copy leaves the VM paused
 * on an I/O error, and `--resume` finishes with an identical image.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { lstat, mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import { backupVm } from '../../src/vm/drivers.js';
import { QmpClient } from '../../src/vm/qmp.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, waitForExit, type TempDir } from '../helpers/images.js';
import { cli } from '../helpers/cli.js';
import { start, waitFor, type Proc } from '../helpers/procs.js';

const MiB = 1024 * 1024;
const PASS = 'instant restore test';
let dir: TempDir;
let src: string;
let backupId: string;
let env: Record<string, string>;
const qemuPids: number[] = [];

before(async () => {
  dir = await tempDir('vmvault-instant-');
  const repoPath = join(dir.path, 'repo');
  const repo = await Repository.init(new LocalStorage(repoPath), PASS, { kdf: 'weak' });
  // 64 MiB: a pattern at the start, 16 MiB of random data in the middle, zeros elsewhere.
  src = await makeImage(dir.path, 'src.raw', 'raw', 64 * MiB, [{ offset: 0, length: MiB, pattern: 0x5a }]);
  await execa('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', 'count=16', 'seek=24', 'conv=notrunc', 'status=none']);
  backupId = (await backupVm(repo, { vm: 'web', driver: 'image', disks: [{ path: src, name: 'root', format: 'raw' }] })).manifest.id;
  env = { VMVAULT_REPOSITORY: repoPath, VMVAULT_PASSWORD: PASS };
});

after(async () => {
  for (const pid of qemuPids) {
    try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
  }
  await dir?.cleanup();
});

/** Connects to the operator's QMP monitor once it answers; resolves with the client and when it first answered. */
async function firstAnswer(socket: string, proc: Proc): Promise<{ qmp: QmpClient; at: number }> {
  return waitFor('the VM\'s QMP monitor', async () => {
    if (!existsSync(socket)) return undefined;
    try {
      const qmp = await QmpClient.connect(socket, { timeoutMs: 2000 });
      await qmp.execute('query-status');
      return { qmp, at: Date.now() };
    } catch {
      return undefined;
    }
  }, 30_000, () => proc.output(), 20);
}

async function rememberPid(to: string): Promise<number> {
  const pid = Number((await readFile(join(to, 'qemu.pid'), 'utf8')).trim());
  qemuPids.push(pid);
  return pid;
}

async function quit(qmp: QmpClient, pid: number): Promise<void> {
  await qmp.execute('quit').catch(() => undefined);
  await qmp.close();
  assert.ok(await waitForExit(pid, 10_000), 'QEMU exits');
}

describe('vmvault restore --instant --start', () => {
  test('the VM answers within seconds while the copy runs; after the pivot the final image equals the backup and nothing else is left', { timeout: 180_000 }, async () => {
    const to = join(dir.path, 'a');
    // A directory that existed, readable by all, with a symbolic link where the serial log goes: the link is replaced, not followed.
    await mkdir(to, { mode: 0o755 });
    const outside = join(dir.path, 'outside.txt');
    await writeFile(outside, 'keep');
    await symlink(outside, join(to, 'serial.log'));
    const t0 = Date.now();
    const proc = start(['restore', backupId.slice(0, 12), '--instant', '--to', to, '--start', '--machine', 'pc,accel=tcg', '--memory', '64', '--format', 'qcow2', '--rate', '4M', '--json'], env);
    const { qmp, at } = await firstAnswer(join(to, 'qmp.sock'), proc);
    const pid = await rememberPid(to);
    try {
      const answeredAfter = (at - t0) / 1000;
      process.stdout.write(`# first QMP answer ${answeredAfter.toFixed(2)} s after the command\n`);
      assert.ok(answeredAfter < 10, `QMP answered after ${answeredAfter} s`);
      assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running');
      // vmvault starts the copy right after the VM: it is running, and far from done, a moment later.
      const jobs = await waitFor('the copy job', async () => {
        const j = await qmp.execute<{ device: string; offset: number; len: number; ready: boolean }[]>('query-block-jobs');
        return j.length ? j : undefined;
      }, 10_000, () => proc.output(), 50);
      assert.ok(!jobs[0]!.ready && jobs[0]!.offset < jobs[0]!.len, JSON.stringify(jobs));
      assert.ok(existsSync(join(to, 'instant-restore.json')), 'the state file is there while the copy runs');

      const r = await proc;
      assert.equal(r.exitCode, 0, proc.output());
      const out = JSON.parse(String(r.stdout)) as { disks: { path: string; format: string }[]; qmpSocket: string };
      assert.deepEqual(out.disks, [{ name: 'root', path: join(to, 'root.qcow2'), format: 'qcow2' }]);
      assert.match(proc.output(), /the VM runs from the backup/);

      // The device runs on the final image; no overlay, export socket or state file is left.
      const blocks = await qmp.execute<{ inserted?: { file: string; 'backing_file'?: string } }[]>('query-block');
      assert.deepEqual(blocks.filter((b) => b.inserted).map((b) => b.inserted!.file), [join(to, 'root.qcow2')]);
      assert.equal(blocks.find((b) => b.inserted)!.inserted!.backing_file, undefined);
      const left = (await readdir(to)).sort();
      assert.deepEqual(left, ['.vmvault-qmp.sock', 'qemu.pid', 'qmp.sock', 'root.qcow2', 'serial.log'].sort());
      const serial = await lstat(join(to, 'serial.log'));
      assert.ok(serial.isFile(), 'the serial log is a file of its own');
      assert.equal(serial.mode & 0o777, 0o600, 'readable by its owner only');
      assert.equal(await readFile(outside, 'utf8'), 'keep', 'the link was not followed');
      assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running');
    } finally {
      await quit(qmp, pid);
    }
    await execa('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', src, join(to, 'root.qcow2')]);
    const info = JSON.parse((await execa('qemu-img', ['info', '-f', 'qcow2', '--output=json', join(to, 'root.qcow2')])).stdout) as { 'backing-filename'?: string };
    assert.equal(info['backing-filename'], undefined, 'the final image names no backing file');
  });

  test('Ctrl-C during the copy only warns; a second one exits (as a kill would): the VM pauses on an I/O error, and --resume completes with an identical image', { timeout: 300_000 }, async () => {
    const to = join(dir.path, 'b');
    const proc = start(['restore', backupId.slice(0, 12), '--instant', '--to', to, '--start', '--machine', 'pc,accel=tcg', '--memory', '64', '--rate', '2M'], env);
    const { qmp, at: _ } = await firstAnswer(join(to, 'qmp.sock'), proc);
    const pid = await rememberPid(to);
    try {
      await waitFor('the copy to start', async () => {
        const jobs = await qmp.execute<{ offset: number }[]>('query-block-jobs');
        return jobs.length === 1 && jobs[0]!.offset > 0;
      }, 30_000, () => proc.output());
      // The first Ctrl-C says what exiting would do to the VM, and the restore goes on.
      proc.kill('SIGINT');
      await waitFor('the warning', () => /exiting now pauses it \(I\/O error\) until "vmvault restore --resume /.test(proc.output()), 10_000, () => proc.output(), 50);
      const before = (await qmp.execute<{ offset: number }[]>('query-block-jobs'))[0]!.offset;
      await waitFor('the copy to go on', async () => (await qmp.execute<{ offset: number }[]>('query-block-jobs'))[0]!.offset > before, 30_000, () => proc.output());
      assert.equal(proc.exitCode, null, 'still running');
      // The second exits at once, as a kill would (the exports die with it).
      proc.kill('SIGINT');
      const ended = await proc.catch((e: { exitCode?: number }) => e);
      assert.equal(ended.exitCode, 130, proc.output());
      assert.match(proc.output(), new RegExp(`exiting; a VM running on this restore pauses .*Finish the restore with "vmvault restore --resume ${to}"`));
      // The guest reads its disk again (SeaBIOS after a reset): the read fails, and rerror=stop pauses the VM.
      // The reset is repeated every 15 s until then: a reset that lands while SeaBIOS is
      // still starting, or after it has given up on the disk, may not read it at all.
      // Generous: under software emulation on a loaded machine SeaBIOS may take long to reach the disk.
      let lastReset = 0;
      let status = '';
      let jobsSeen: unknown = [];
      await waitFor('the VM to stop on an I/O error', async () => {
        status = (await qmp.execute<{ status: string }>('query-status')).status;
        if (status === 'io-error') return true;
        jobsSeen = await qmp.execute('query-block-jobs');
        if (Date.now() - lastReset > 15_000) {
          await qmp.execute('system_reset');
          lastReset = Date.now();
        }
        return false;
      }, 90_000, () => `status ${status}, jobs ${JSON.stringify(jobsSeen)}`, 250);
      const jobs = await qmp.execute<{ paused: boolean; 'io-status': string; ready: boolean }[]>('query-block-jobs');
      assert.equal(jobs.length, 1);
      assert.ok(!jobs[0]!.ready, 'the copy was not finished');
      assert.ok(existsSync(join(to, 'instant-restore.json')), 'the state file is kept for --resume');

      // A resume needs the QMP monitor vmvault uses, not the operator's: it may stay connected.
      const resumed = await cli(['restore', '--resume', to, '--json'], env);
      assert.equal(resumed.code, 0, resumed.stderr);
      assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running', 'the VM runs again');
      assert.deepEqual(await qmp.execute('query-block-jobs'), []);
      assert.ok(!existsSync(join(to, 'instant-restore.json')));
      assert.ok(!existsSync(join(to, '.root.overlay.qcow2')));
      assert.ok(!existsSync(join(to, '.vv0.nbd.sock')));
    } finally {
      await quit(qmp, pid);
    }
    await execa('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, join(to, 'root.raw')]);
  });

  test('--qmp: an already running QEMU gets the disks hot-plugged, runs on them, and ends on the final image', { timeout: 180_000 }, async () => {
    const to = join(dir.path, 'q');
    const vmDir = join(dir.path, 'vm');
    await execa('mkdir', ['-p', vmDir]);
    const [theirs, ours] = [join(vmDir, 'qmp.sock'), join(vmDir, 'test.sock')];
    const pidFile = join(vmDir, 'qemu.pid');
    await execa('qemu-system-x86_64', ['-machine', 'pc,accel=tcg', '-m', '64', '-nodefaults', '-display', 'none', '-daemonize', '-pidfile', pidFile,
      '-qmp', `unix:${theirs},server=on,wait=off`, '-qmp', `unix:${ours},server=on,wait=off`]);
    const pid = Number((await readFile(pidFile, 'utf8')).trim());
    qemuPids.push(pid);
    const qmp = await QmpClient.connect(ours);
    try {
      const r = await cli(['restore', backupId.slice(0, 12), '--instant', '--to', to, '--qmp', theirs, '--json'], env);
      assert.equal(r.code, 0, r.stderr);
      const blocks = await qmp.execute<{ qdev?: string; inserted?: { file: string } }[]>('query-block');
      assert.deepEqual(blocks.filter((b) => b.inserted).map((b) => b.inserted!.file), [join(to, 'root.raw')]);
      assert.deepEqual((await readdir(to)).sort(), ['root.raw']);
    } finally {
      await quit(qmp, pid);
    }
    await execa('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, join(to, 'root.raw')]);
  });

  test('bad requests are refused with what to do', async () => {
    const none = await cli(['restore', '--resume', join(dir.path, 'nothing-here')], env);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /holds no unfinished instant restore/);
    const both = await cli(['restore', backupId.slice(0, 12), '--instant', '--to', join(dir.path, 'c')], env);
    assert.match(both.stderr, /exactly one of --start .* or --qmp SOCKET/);
    const notInstant = await cli(['restore', backupId.slice(0, 12), '--to', join(dir.path, 'c'), '--rate', '1M'], env);
    assert.match(notInstant.stderr, /--rate applies to --instant restores only/);
  });
});

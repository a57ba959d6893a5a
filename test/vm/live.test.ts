/**
 * The qemu driver on a real running qemu-system-x86_64 (TCG, no guest OS): the
 * instant of a live backup, several disks at one instant, recovery after a killed
 * run, and its errors. Writes go through the guest's view of the disks (HMP qemu-io
 * on the virtio device), as a guest's own writes would.
 */
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { VmvaultError } from '../../src/errors.js';
import { compareImages } from '../../src/disk/qemu.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import type { PointInTimeTarget } from '../../src/vm/point-in-time.js';
import type { BackupOptions } from '../../src/pipeline/backup.js';

const backupRunningVm = (repo: Repository, req: Omit<PointInTimeTarget, 'vm'> & BackupOptions) => backupVm(repo, { ...req, driver: 'qemu' });
import { spawnCli } from '../helpers/cli.js';
import { makeImage, processAlive, tempDir, verifyPatterns, writePattern, type TempDir } from '../helpers/images.js';
import { startTestVm, type TestVm } from '../helpers/qemu-vm.js';

const MiB = 1024 * 1024;
const PASSWORD = 'live test passphrase';
const A = 0xaa;
const B = 0xbb;

describe('qemu driver (running VM)', () => {
  let dir: TempDir;
  let repoDir: string;
  let repo: Repository;
  const vms: TestVm[] = [];
  const warnings: string[] = [];
  const warn = (m: string) => void warnings.push(m);

  before(async () => {
    dir = await tempDir();
    repoDir = path.join(dir.path, 'repo');
    repo = await Repository.init(new LocalStorage(repoDir), PASSWORD, { kdf: 'weak' });
  });
  after(async () => {
    for (const vm of vms) await vm.stop();
    await dir?.cleanup();
  });

  async function vmWith(names: string[], size: number, opts: { formats?: string[]; guestAgent?: boolean } = {}): Promise<{ vm: TestVm; disks: string[] }> {
    const sub = await fs.mkdtemp(path.join(dir.path, 'vm-'));
    const disks: string[] = [];
    for (const [i, n] of names.entries()) disks.push(await makeImage(sub, n, opts.formats?.[i] ?? 'qcow2', size));
    const vm = await startTestVm(disks, opts);
    vms.push(vm);
    return { vm, disks };
  }

  async function overlaysIn(d: string): Promise<string[]> {
    return (await fs.readdir(d)).filter((n) => n.includes('.vmvault-overlay-'));
  }

  /** The permission bits of the overlays in `d`, while a backup runs: they hold the guest's writes. */
  async function overlayModes(d: string): Promise<string[]> {
    return Promise.all((await overlaysIn(d)).map(async (n) => `${n}: ${((await fs.stat(path.join(d, n))).mode & 0o777).toString(8)}`));
  }

  /**
   * A running VM with one qcow2 disk of 128 MiB of random content, so a backup has real
   * work to do (compress, encrypt, store) and the window between overlay and commit is wide;
   * `original` is the same content as a raw file, and `env` runs the CLI on the test repository.
   */
  async function randomVm(name: string) {
    const where = await fs.mkdtemp(path.join(dir.path, 'vm-'));
    const original = path.join(where, 'original.raw');
    await fs.writeFile(original, randomBytes(128 * MiB));
    const disks = [path.join(where, `${name}.qcow2`)];
    await execa('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', original, disks[0]!]);
    const vm = await startTestVm(disks);
    vms.push(vm);
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, VMVAULT_REPOSITORY: repoDir, VMVAULT_PASSWORD: PASSWORD };
    return { where, original, disks, vm, env };
  }

  async function restoreTo(backupId: string): Promise<string> {
    const to = await fs.mkdtemp(path.join(dir.path, 'restore-'));
    await restore(repo, { backupId, to });
    return to;
  }

  it('backs up the instant it started at, while the guest keeps writing, and leaves the VM on its own image', async () => {
    const { vm, disks } = await vmWith(['root.qcow2'], 64 * MiB);
    await vm.write(0, 0, 48 * MiB, A);
    let bWritten: Promise<number> | undefined;
    let progressAtB = -1;
    let modes: Promise<string[]> | undefined;
    const result = await backupRunningVm(repo, {
      vm: 'web', disks: [{ path: disks[0]! }], qmpSocket: vm.qmpSocket, warn, inFlight: 2,
      onProgress: (p) => {
        if (bWritten || p.bytesDone === 0) return;
        modes = overlayModes(path.dirname(disks[0]!));
        progressAtB = p.bytesDone;
        // Pattern B while the backup reads: over what was read already and what is still to come.
        bWritten = (async () => {
          await vm.write(0, 0, 4 * MiB, B);
          await vm.write(0, 40 * MiB, 4 * MiB, B);
          return Date.now();
        })();
      },
    });
    const finished = Date.now();
    assert.ok(bWritten, 'the backup reported progress');
    const seen = await modes!;
    assert.equal(seen.length, 1, 'the overlay existed while the backup read');
    assert.match(seen[0]!, /: 600$/, 'the overlay, which holds the guest\'s writes, is readable by its owner only');
    assert.ok((await bWritten) <= finished, 'pattern B was written while the backup ran');
    assert.ok(progressAtB < 64 * MiB, 'pattern B went in before the backup had read everything');
    assert.equal(result.guestFrozen, false);
    assert.equal((await repo.loadManifest(result.manifest.id)).consistency, 'crash', 'the manifest says what the instant guarantees');
    assert.equal(result.recovered, 0);
    assert.equal(result.manifest.disks[0]!.sourcePath, disks[0]);

    // The restored disk holds A, not B.
    const to = await restoreTo(result.manifest.id);
    await verifyPatterns(path.join(to, 'root.qcow2'), 'qcow2', [{ offset: 0, length: 48 * MiB, pattern: A }]);

    // The VM runs on, on its original image, which has B; no overlay is left anywhere.
    assert.equal(await vm.status(), 'running');
    assert.deepEqual(await vm.activeFiles(), disks);
    await vm.expect(0, 0, 4 * MiB, B);
    await vm.expect(0, 40 * MiB, 4 * MiB, B);
    await vm.expect(0, 4 * MiB, 36 * MiB, A);
    assert.deepEqual(await overlaysIn(path.dirname(disks[0]!)), []);
    const nodes = await vm.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
    assert.ok(!nodes.some((n) => n['node-name'].startsWith('vmvault-')), 'no overlay node is left in QEMU');
    // And B is in the image file itself (read once QEMU has let go of it).
    await vm.stop();
    await verifyPatterns(disks[0]!, 'qcow2', [{ offset: 0, length: 4 * MiB, pattern: B }, { offset: 4 * MiB, length: 36 * MiB, pattern: A }]);
  });

  it('takes all disks of a VM from one instant', async () => {
    const { vm, disks } = await vmWith(['sys.qcow2', 'data.raw'], 32 * MiB, { formats: ['qcow2', 'raw'], guestAgent: true });
    await vm.write(0, 0, 24 * MiB, A);
    await vm.write(1, 0, 24 * MiB, A + 1);
    let wrote: Promise<void> | undefined;
    const result = await backupRunningVm(repo, {
      vm: 'db', disks: disks.map((p) => ({ path: p })), qmpSocket: vm.qmpSocket, warn, inFlight: 2,
      guestAgentSocket: vm.guestAgentSocket!, guestAgent: { syncTimeoutMs: 500 },
      onProgress: (p) => {
        // While the first disk is read, the guest writes to both: the second disk, read later, must not show it.
        if (wrote || p.disk !== 'sys' || p.bytesDone === 0) return;
        wrote = (async () => {
          await vm.write(0, 0, MiB, B);
          await vm.write(1, 0, MiB, B + 1);
        })();
      },
    });
    await wrote;
    assert.ok(wrote, 'the guest wrote during the backup');
    assert.deepEqual(result.manifest.disks.map((d) => [d.name, d.format]), [['sys', 'qcow2'], ['data', 'raw']]);
    // The guest agent channel exists but nothing answers on it: crash-consistent, with a warning.
    assert.equal(result.guestFrozen, false);
    assert.ok(warnings.some((w) => /guest agent not answering: backing up crash-consistent/.test(w)), warnings.join('\n'));

    const to = await restoreTo(result.manifest.id);
    await verifyPatterns(path.join(to, 'sys.qcow2'), 'qcow2', [{ offset: 0, length: 24 * MiB, pattern: A }]);
    await verifyPatterns(path.join(to, 'data.raw'), 'raw', [{ offset: 0, length: 24 * MiB, pattern: A + 1 }]);
    assert.deepEqual(await vm.activeFiles(), disks);
    await vm.expect(1, 0, MiB, B + 1);
    assert.deepEqual(await overlaysIn(path.dirname(disks[0]!)), []);
  });

  it('recovers after the backup process is killed between overlay and commit; the VM keeps running', async () => {
    const { where, original, disks, vm, env } = await randomVm('app');
    const child = spawnCli(['backup', '--vm', 'app', '--disk', disks[0]!, '--qmp', vm.qmpSocket, '--json'], env);
    const deadline = Date.now() + 60_000;
    // Until the VM runs on the overlay (the file itself is made, empty, just before).
    while (!(await vm.activeFiles()).some((f) => f.includes('.vmvault-overlay-'))) {
      assert.ok(Date.now() < deadline, 'the overlay became active');
      if (!processAlive(child.pid!)) {
        const r = await child;
        assert.fail(`the backup ended before its overlay was seen: exit ${r.exitCode}: ${r.stderr}${r.stdout}`);
      }
      await sleep(5);
    }
    child.kill('SIGKILL');
    const killed = await child;
    assert.equal(killed.signal, 'SIGKILL');

    // Left behind: the VM runs on the overlay. The guest writes on.
    const [overlay] = await overlaysIn(where);
    assert.deepEqual(await vm.activeFiles(), [path.join(where, overlay!)], 'the kill came before the commit');
    assert.equal(await vm.status(), 'running');
    await vm.write(0, 8 * MiB, MiB, B);

    const result = await backupRunningVm(repo, { vm: 'app', disks: [{ path: disks[0]! }], qmpSocket: vm.qmpSocket, warn });
    assert.equal(result.recovered, 1);
    assert.ok(warnings.some((w) => w.includes(`merging overlay ${path.join(where, overlay!)}`)), warnings.join('\n'));
    assert.deepEqual(await vm.activeFiles(), disks);
    assert.deepEqual(await overlaysIn(where), []);
    assert.equal(await vm.status(), 'running');
    await vm.write(0, 9 * MiB, MiB, B + 1); // Still writable.
    await vm.expect(0, 8 * MiB, MiB, B);
    // The new backup is the original content plus the write made while the overlay was left behind.
    const to = await restoreTo(result.manifest.id);
    await writePattern(original, 'raw', 8 * MiB, MiB, B);
    const cmp = await compareImages(path.join(to, 'app.qcow2'), original, 'qcow2', 'raw');
    assert.ok(cmp.identical, cmp.output);
    await vm.stop();
    await verifyPatterns(disks[0]!, 'qcow2', [{ offset: 8 * MiB, length: MiB, pattern: B }, { offset: 9 * MiB, length: MiB, pattern: B + 1 }]);
  });

  it('SIGTERM stops a backup of a running VM cleanly: overlays merged back, nothing saved, the VM on its own image', async () => {
    const { where, disks, vm, env } = await randomVm('term');
    const before = (await repo.backupIds()).length;
    const child = spawnCli(['backup', '--vm', 'term', '--disk', disks[0]!, '--qmp', vm.qmpSocket, '--json'], env);
    const deadline = Date.now() + 60_000;
    while ((await overlaysIn(where)).length === 0) {
      assert.ok(Date.now() < deadline && processAlive(child.pid!), 'the overlay appeared while the backup ran');
      await sleep(5);
    }
    child.kill('SIGTERM');
    const r = await child;
    assert.notEqual(r.exitCode, 0, String(r.stdout));
    assert.match(String(r.stderr), /interrupted \(SIGTERM\): nothing was saved/);
    assert.deepEqual(await vm.activeFiles(), disks, 'the VM is back on its own image');
    assert.deepEqual(await overlaysIn(where), []);
    assert.equal(await vm.status(), 'running');
    assert.equal((await repo.backupIds()).length, before, 'no backup was committed');
  });

  it('finishes a commit job a killed run left waiting, deletes empty overlay files nothing uses and sets aside those with data', async () => {
    const { vm, disks } = await vmWith(['job.qcow2'], 8 * MiB);
    const where = path.dirname(disks[0]!);
    await vm.write(0, 0, MiB, A);
    // The state of a run killed after it had started the commit: overlay active, job READY, never completed.
    const overlay = path.join(where, 'job.qcow2.vmvault-overlay-0badc0de.qcow2');
    await vm.qmp.execute('transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: { 'node-name': 'disk0', 'snapshot-file': overlay, 'snapshot-node-name': 'vmvault-ov-0badc0de-0', format: 'qcow2' } }] });
    await vm.write(0, MiB, MiB, B);
    const mark = vm.qmp.eventMark();
    await vm.qmp.execute('block-commit', { 'job-id': 'vmvault-commit-vmvault-ov-0badc0de-0', device: 'vmvault-ov-0badc0de-0', 'base-node': 'disk0' });
    await vm.qmp.waitEvent('BLOCK_JOB_READY', (d) => d.device === 'vmvault-commit-vmvault-ov-0badc0de-0', 30_000, { after: mark });
    // And overlay files of older runs that no device uses: an empty one (deleted), and one holding
    // writes that were never merged (the VM restarted on its base, say): set aside, never deleted.
    const orphan = path.join(where, 'job.qcow2.vmvault-overlay-deadbeef.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', orphan, `${8 * MiB}`]);
    // One this tool made (mode 0600) before QEMU formatted it, left by a run that ended then: not a qcow2 at all.
    const unformatted = path.join(where, 'job.qcow2.vmvault-overlay-0e0e0e0e.qcow2');
    await fs.writeFile(unformatted, '', { mode: 0o600 });
    const unmerged = path.join(where, 'job.qcow2.vmvault-overlay-feedface.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', unmerged, `${8 * MiB}`]);
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', unmerged]);

    const result = await backupRunningVm(repo, { vm: 'job', disks: [{ path: disks[0]! }], qmpSocket: vm.qmpSocket, warn });
    assert.equal(result.recovered, 1);
    assert.deepEqual(await vm.activeFiles(), disks);
    // The empty orphan is deleted; the one with data is set aside under a name no recovery picks up again.
    assert.deepEqual(await overlaysIn(where), [`${path.basename(unmerged)}.unmerged`]);
    assert.ok(warnings.some((w) => w.includes('may never have been merged') && w.includes('.unmerged')), warnings.join('\n'));
    assert.ok(warnings.some((w) => w.includes(`${unformatted} left empty`)), warnings.join('\n'));
    assert.ok(!warnings.some((w) => w.includes('may never have been merged') && w.includes(unformatted)), 'an empty file is no unmerged overlay');
    assert.deepEqual(await vm.qmp.execute('query-block-jobs'), []);
    const to = await restoreTo(result.manifest.id);
    await verifyPatterns(path.join(to, 'job.qcow2'), 'qcow2', [{ offset: 0, length: MiB, pattern: A }, { offset: MiB, length: MiB, pattern: B }]);
  });

  it('says which QMP socket is missing and which disk is not attached', async () => {
    const missing = path.join(dir.path, 'no-such-vm.sock');
    await assert.rejects(backupRunningVm(repo, { vm: 'x', disks: [{ path: '/nowhere.qcow2' }], qmpSocket: missing, warn }), (err: unknown) =>
      err instanceof VmvaultError && err.code === 'NOT_FOUND' && err.message.includes(`QMP socket ${missing} does not exist`));

    const { vm, disks } = await vmWith(['one.qcow2'], 4 * MiB);
    const stray = await makeImage(path.dirname(disks[0]!), 'stray.qcow2', 'qcow2', 4 * MiB);
    await assert.rejects(backupRunningVm(repo, { vm: 'one', disks: [{ path: disks[0]! }, { path: stray }], qmpSocket: vm.qmpSocket, warn }), (err: unknown) =>
      err instanceof VmvaultError && err.code === 'NOT_FOUND' && err.message.startsWith(`disk ${stray} is not attached to the VM`) && err.message.includes(disks[0]!));
    // Nothing was changed on the VM.
    assert.deepEqual(await vm.activeFiles(), disks);
    assert.deepEqual(await overlaysIn(path.dirname(disks[0]!)), []);

    const r = await spawnCli(['backup', '--vm', 'x', '--disk', disks[0]!, '--qmp', missing], { PATH: process.env.PATH, VMVAULT_REPOSITORY: repoDir, VMVAULT_PASSWORD: PASSWORD });
    assert.notEqual(r.exitCode, 0);
    assert.match(String(r.stderr), /QMP socket .*no-such-vm\.sock does not exist/);
  });
});

/**
 * Changed-block incrementals of a running VM (the qemu driver) on a real
 * qemu-system-x86_64 (TCG, no guest OS): persistent dirty bitmaps added in the same
 * transaction as the overlays, read through QEMU's NBD server, rotated once a backup
 * is saved. Every backup is restored and compared with a copy of the base image taken
 * at its instant (while the VM runs on the overlay, nothing writes to the base).
 * Writes go through the guest's device (HMP qemu-io on the virtio device).
 */
import { bitmapName } from '../../src/vm/change-tracking.js';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { compareImages, type ImageFormat } from '../../src/disk/qemu.js';
import { restore } from '../../src/pipeline/restore.js';
import type { BackupOptions } from '../../src/pipeline/backup.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm, type VmBackupResult } from '../../src/vm/drivers.js';
import { spawnCli } from '../helpers/cli.js';
import { makeImage, processAlive, tempDir, type TempDir } from '../helpers/images.js';
import { startTestVm, type TestVm } from '../helpers/qemu-vm.js';

const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;
const PASSWORD = 'live incremental passphrase';

describe('qemu driver: changed-block incrementals of a running VM', () => {
  let dir: TempDir;
  let repoDir: string;
  let repo: Repository;
  let disk: string;
  let vm: TestVm;
  const warnings: string[] = [];
  const warn = (m: string) => void warnings.push(m);
  let n = 0;

  before(async () => {
    dir = await tempDir();
    repoDir = path.join(dir.path, 'repo');
    repo = await Repository.init(new LocalStorage(repoDir), PASSWORD, { kdf: 'weak' });
    disk = await makeImage(dir.path, 'root.qcow2', 'qcow2', 256 * MiB, [{ offset: 0, length: 16 * MiB, pattern: 0x10 }]);
    vm = await startTestVm([disk]);
  });
  after(async () => {
    await vm?.stop();
    await dir?.cleanup();
  });

  /** The vmvault bitmaps QEMU has on the disk's node, and whether any is inconsistent. */
  async function bitmaps(): Promise<string[]> {
    const nodes = await vm.qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]>('query-named-block-nodes', { flat: true });
    return (nodes.find((x) => x['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? []).map((b) => b.name).filter((b) => b.startsWith('vmvault-')).sort();
  }

  /** 1 MiB into each of five separate 4 MiB regions, through the guest's device. */
  async function writeFive(pattern: number): Promise<void> {
    for (const region of [3, 11, 24, 40, 57]) await vm.write(0, region * CHUNK + MiB, MiB, pattern + region);
  }

  /**
   * Backs up, copying the base image at the instant (the VM writes to its overlay then),
   * restores the backup and checks it is that copy. `during` runs right after the copy:
   * guest writes there land after the instant.
   */
  async function backupAndCheck(opts: Partial<BackupOptions> & { fullRead?: boolean; during?: () => Promise<void> } = {}): Promise<VmBackupResult> {
    const instant = path.join(dir.path, `instant-${++n}.raw`);
    const { during, ...rest } = opts;
    const result = await backupVm(repo, {
      driver: 'qemu', vm: 'inc', disks: [{ path: disk }], qmpSocket: vm.qmpSocket, warn, ...rest,
      onPointInTime: async () => {
        await execa('qemu-img', ['convert', '-q', '-f', 'qcow2', '-O', 'raw', disk, instant]);
        await during?.();
      },
    });
    const to = await fs.mkdtemp(path.join(dir.path, 'restore-'));
    await restore(repo, { backupId: result.manifest.id, to });
    const cmp = await compareImages(path.join(to, 'root.qcow2'), instant, 'qcow2', 'raw');
    assert.ok(cmp.identical, `backup ${n}: ${cmp.output}`);
    await fs.rm(to, { recursive: true, force: true });
    await fs.rm(instant, { force: true });
    return result;
  }

  const bitmapOf = (r: VmBackupResult) => bitmapName(repo.id, r.manifest.id);

  it('reads only what the guest wrote since the previous backup, across a clean restart; a killed QEMU means one full read', async (t) => {
    const first = await backupAndCheck();
    assert.equal(first.manifest.disks[0]!.mode, 'full');
    assert.match(first.manifest.disks[0]!.reason!, /no earlier backup/);
    assert.deepEqual(await bitmaps(), [bitmapOf(first)]);

    await writeFive(0xa0);
    // A write after the instant goes to the overlay: not in this backup, but the next one's (the merge marks the new bitmap).
    const second = await backupAndCheck({ during: () => vm.write(0, 100 * MiB + 4096, MiB, 0x5a) });
    const d2 = second.manifest.disks[0]!;
    assert.equal(d2.mode, 'incremental', d2.reason);
    assert.match(d2.reason!, new RegExp(`changes since backup ${first.manifest.id.slice(0, 12)}`));
    assert.ok(second.stats.bytesRead <= 5 * CHUNK, `read ${second.stats.bytesRead} bytes`);
    assert.equal(second.stats.chunksNew, 5, JSON.stringify(second.stats));
    assert.equal(d2.bitmap, bitmapOf(second));
    assert.deepEqual(await bitmaps(), [bitmapOf(second)], 'the previous bitmap goes once the backup is saved');
    assert.deepEqual(await vm.qmp.execute('query-block-exports'), [], 'no export is left in QEMU');

    // A clean exit stores the bitmap in the image; the restarted VM goes on counting.
    await vm.stop();
    vm = await startTestVm([disk]);
    assert.deepEqual(await bitmaps(), [bitmapOf(second)]);
    await vm.write(0, 200 * MiB, MiB, 0x77);
    const third = await backupAndCheck();
    assert.equal(third.manifest.disks[0]!.mode, 'incremental', third.manifest.disks[0]!.reason);
    // The chunk written after the second backup's instant (100 MiB + 4 KiB spans two chunks at most) and the new write.
    assert.ok(third.stats.bytesRead <= 3 * CHUNK, `read ${third.stats.bytesRead} bytes`);

    // SIGKILL: QEMU never stores the bitmap; it comes back inconsistent or not at all.
    await vm.write(0, 150 * MiB, MiB, 0x66);
    await vm.kill();
    vm = await startTestVm([disk]);
    await vm.write(0, 160 * MiB, MiB, 0x67);
    const afterKill = await backupAndCheck();
    const dk = afterKill.manifest.disks[0]!;
    assert.equal(dk.mode, 'full');
    assert.match(dk.reason!, /inconsistent|missing/);
    t.diagnostic(`after SIGKILL: ${dk.reason}`);
    assert.deepEqual(await bitmaps(), [bitmapOf(afterKill)]);
    await writeFive(0xb0);
    const again = await backupAndCheck();
    assert.equal(again.manifest.disks[0]!.mode, 'incremental', again.manifest.disks[0]!.reason);
    assert.ok(again.stats.bytesRead <= 5 * CHUNK, `read ${again.stats.bytesRead} bytes`);
  });

  it('a failed incremental backup keeps the previous bitmap: the next is incremental and has every write', async () => {
    const before = await backupAndCheck();
    await writeFive(0xc0);
    await assert.rejects(backupVm(repo, {
      driver: 'qemu', vm: 'inc', disks: [{ path: disk }], qmpSocket: vm.qmpSocket, warn,
      beforeCommit: async () => { throw new Error('refused at commit'); },
    }), /refused at commit/);
    assert.deepEqual(await bitmaps(), [bitmapOf(before)], 'the failed backup took its own bitmap away and left the previous one');
    await vm.write(0, 230 * MiB, MiB, 0xc9);
    const next = await backupAndCheck();
    assert.equal(next.manifest.disks[0]!.mode, 'incremental', next.manifest.disks[0]!.reason);
    assert.ok(next.stats.bytesRead <= 6 * CHUNK, `read ${next.stats.bytesRead} bytes`);
    assert.deepEqual(await bitmaps(), [bitmapOf(next)]);
  });

  it('a backup killed while it reads a bitmap leaves nothing that costs the next one its incremental', async () => {
    const before = await backupAndCheck();
    // Enough changed data that the killed run is still reading when it is killed.
    await vm.write(0, 64 * MiB, 96 * MiB, 0xd0);
    const tmp = await fs.mkdtemp(path.join(dir.path, 'tmp-'));
    const env = { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: tmp, VMVAULT_REPOSITORY: repoDir, VMVAULT_PASSWORD: PASSWORD };
    const child = spawnCli(['backup', '--vm', 'inc', '--disk', disk, '--qmp', vm.qmpSocket, '--json'], env);
    const deadline = Date.now() + 120_000;
    for (;;) {
      const exports = await vm.qmp.execute<{ id: string }[]>('query-block-exports');
      if (exports.some((e) => e.id.startsWith('vmvault-export-'))) break;
      if (!processAlive(child.pid!) || Date.now() > deadline) {
        child.kill('SIGKILL');
        const r = await child;
        assert.fail(`the backup ended before its bitmap export was seen: exit ${r.exitCode}: ${r.stderr}${r.stdout}`);
      }
      await sleep(10);
    }
    child.kill('SIGKILL');
    assert.equal((await child).signal, 'SIGKILL');
    assert.equal((await bitmaps()).length, 2, 'the killed run left its new bitmap beside the previous one');

    await vm.write(0, 240 * MiB, MiB, 0xd9);
    const next = await backupAndCheck();
    assert.ok(next.recovered! >= 3, `recovered ${next.recovered}: the overlay, the export and the NBD server`);
    assert.ok(warnings.some((w) => w.includes('stopping the NBD server an earlier run started')), warnings.join('\n'));
    const dn = next.manifest.disks[0]!;
    assert.equal(dn.mode, 'incremental', dn.reason);
    assert.match(dn.reason!, new RegExp(before.manifest.id.slice(0, 12)));
    assert.ok(next.stats.bytesRead <= 26 * CHUNK, `read ${next.stats.bytesRead} bytes`);
    assert.deepEqual(await bitmaps(), [bitmapOf(next)], 'the killed run\'s bitmap is gone');
    assert.deepEqual(await vm.qmp.execute('query-block-exports'), []);
    const objects = await vm.qmp.execute<{ name: string }[]>('qom-list', { path: '/objects' });
    assert.ok(!objects.some((o) => o.name.startsWith('vmvault-')), JSON.stringify(objects));
  });

  it('does not use an NBD server someone else started: a full read with the reason, and tracking carries on', async () => {
    const before = await backupAndCheck();
    const foreign = path.join(dir.path, 'foreign-nbd.sock');
    await vm.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: foreign } } });
    await vm.write(0, 20 * MiB, MiB, 0xe0);
    try {
      const refused = await backupAndCheck();
      const d = refused.manifest.disks[0]!;
      assert.equal(d.mode, 'full');
      assert.match(d.reason!, /NBD server of its own.*already running/);
      assert.deepEqual(await bitmaps(), [bitmapOf(refused)]);
      assert.notEqual(refused.manifest.id, before.manifest.id);
    } finally {
      await vm.qmp.execute('nbd-server-stop');
    }
    await vm.write(0, 21 * MiB, MiB, 0xe1);
    const next = await backupAndCheck();
    assert.equal(next.manifest.disks[0]!.mode, 'incremental', next.manifest.disks[0]!.reason);
    assert.ok(next.stats.bytesRead <= CHUNK, `read ${next.stats.bytesRead} bytes`);
  });

  it('tracks the qcow2 disks of a VM that also has raw and qcow2 version 2 disks; those are read in full, with the reason', async () => {
    const sub = await fs.mkdtemp(path.join(dir.path, 'mixed-'));
    const files = [
      await makeImage(sub, 'sys.qcow2', 'qcow2', 32 * MiB, [{ offset: 0, length: 8 * MiB, pattern: 0x21 }]),
      path.join(sub, 'old.qcow2'),
      await makeImage(sub, 'data.raw', 'raw', 32 * MiB, [{ offset: 0, length: 8 * MiB, pattern: 0x23 }]),
    ];
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', files[1]!, String(32 * MiB)]);
    const formats: ImageFormat[] = ['qcow2', 'qcow2', 'raw'];
    const mixed = await startTestVm(files, { formats });
    try {
      const backupMixed = async () => {
        const copies = files.map((_, i) => path.join(sub, `instant-${i}.raw`));
        const result = await backupVm(repo, {
          driver: 'qemu', vm: 'mixed', disks: files.map((p) => ({ path: p })), qmpSocket: mixed.qmpSocket, warn,
          onPointInTime: async () => {
            for (const [i, f] of files.entries()) await execa('qemu-img', ['convert', '-q', '-f', formats[i]!, '-O', 'raw', f, copies[i]!]);
          },
        });
        const to = await fs.mkdtemp(path.join(sub, 'restore-'));
        await restore(repo, { backupId: result.manifest.id, to });
        for (const [i, f] of files.entries()) {
          const cmp = await compareImages(path.join(to, path.basename(f)), copies[i]!, formats[i]!, 'raw');
          assert.ok(cmp.identical, `${f}: ${cmp.output}`);
        }
        return result;
      };
      await backupMixed();
      for (const i of [0, 1, 2]) await mixed.write(i, 16 * MiB, MiB, 0x30 + i);
      const second = await backupMixed();
      const [sys, old, data] = second.manifest.disks;
      assert.equal(sys!.mode, 'incremental', sys!.reason);
      assert.equal(old!.mode, 'full');
      assert.match(old!.reason!, /qcow2 version 2 images cannot hold a dirty bitmap/);
      assert.equal(data!.mode, 'full');
      assert.match(data!.reason!, /raw disks of a running VM are read in full/);
      assert.equal(old!.bitmap, undefined);
      assert.equal(sys!.bitmap, bitmapOf(second));
    } finally {
      await mixed.stop();
    }
  });
});

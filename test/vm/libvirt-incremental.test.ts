/**
 * Changed-block incrementals of a running libvirt domain, on a real libvirtd (private,
 * session mode, test/helpers/libvirt.ts) running a real qemu-system-x86_64 (TCG, no
 * guest OS): libvirt's pull-mode backup with checkpoints. Writes go through the
 * guest's device; the expected disk is a copy of the starting image with the same
 * writes applied by qemu-io, and every backup's restore is compared with it.
 */
import { bitmapName } from '../../src/vm/change-tracking.js';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { compareImages } from '../../src/disk/qemu.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm, openPointInTime, type VmBackupResult } from '../../src/vm/drivers.js';
import { newBackupId } from '../../src/pipeline/backup.js';
import { defineDomain, guestWrite, libvirtMissing, startLibvirt, type TestLibvirt } from '../helpers/libvirt.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { execa } from 'execa';

const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;
const skip = libvirtMissing() ?? false;

describe('libvirt driver: changed-block incrementals of a running domain', { skip }, () => {
  let lv: TestLibvirt;
  let repo: Repository;
  let disk: string;
  let raw: string;
  let expected: string;
  let expectedRaw: string;
  const domain = `vv-inc-${process.pid}`;
  const warnings: string[] = [];
  let n = 0;

  before(async () => {
    lv = await startLibvirt();
    repo = await Repository.init(new LocalStorage(path.join(lv.imageDir, 'repo')), 'pw', { kdf: 'weak' });
    disk = await makeImage(lv.imageDir, 'root.qcow2', 'qcow2', 64 * MiB, [{ offset: 0, length: 8 * MiB, pattern: 0x10 }]);
    raw = await makeImage(lv.imageDir, 'data.raw', 'raw', 16 * MiB, [{ offset: MiB, length: MiB, pattern: 0x20 }]);
    expected = path.join(lv.imageDir, 'expected.qcow2');
    expectedRaw = path.join(lv.imageDir, 'expected.raw');
    await fs.copyFile(disk, expected);
    await fs.copyFile(raw, expectedRaw);
    for (const f of [disk, raw]) await lv.own(f);
    await defineDomain(lv, domain, [{ path: disk, format: 'qcow2' }, { path: raw, format: 'raw' }]);
  });
  after(async () => {
    await lv?.stop();
  });

  /** 1 MiB into each of the given 4 MiB regions of the qcow2 disk, through the guest, and into the expected copy. */
  async function write(regions: number[], pattern: number): Promise<void> {
    for (const r of regions) {
      await guestWrite(lv, domain, 0, r * CHUNK + MiB, MiB, pattern + r);
      await writePattern(expected, 'qcow2', r * CHUNK + MiB, MiB, pattern + r);
    }
  }

  async function checkpoints(): Promise<string[]> {
    return (await lv.virsh('checkpoint-list', domain, '--name')).split('\n').map((l) => l.trim()).filter(Boolean).sort();
  }

  async function backupAndCheck(opts: { fullRead?: boolean } = {}): Promise<VmBackupResult> {
    const result = await backupVm(repo, { driver: 'libvirt', vm: 'lv', disks: [], domain, warn: (m) => void warnings.push(m), ...opts });
    const to = await fs.mkdtemp(path.join(lv.imageDir, `restore-${++n}-`));
    await restore(repo, { backupId: result.manifest.id, to });
    for (const [name, want, format] of [['root.qcow2', expected, 'qcow2'], ['data.raw', expectedRaw, 'raw']] as const) {
      const cmp = await compareImages(path.join(to, name), want, format, format);
      assert.ok(cmp.identical, `backup ${n}, ${name}: ${cmp.output}`);
    }
    assert.deepEqual(await checkpoints(), [bitmapName(repo.id, result.manifest.id)], 'one checkpoint is left, the new backup\'s');
    assert.deepEqual(await fs.readdir(lv.imageDir).then((f) => f.filter((x) => x.includes('vmvault-scratch'))), [], 'no scratch file is left');
    assert.equal((await lv.virsh('domjobinfo', domain)).match(/Job type:\s+(\S+)/)?.[1], 'None', 'no backup job is left running');
    return result;
  }

  const mode = (r: VmBackupResult, name: string) => r.manifest.disks.find((d) => d.name === name)!;

  it('reads in full first, then only the regions written through the guest', async () => {
    const first = await backupAndCheck();
    assert.equal(mode(first, 'root').mode, 'full');
    assert.match(mode(first, 'root').reason!, /no earlier backup/);
    assert.equal(first.running, true);

    await write([3, 7, 11], 0x40);
    const second = await backupAndCheck();
    assert.equal(mode(second, 'root').mode, 'incremental', mode(second, 'root').reason);
    assert.match(mode(second, 'root').reason!, /libvirt checkpoint vmvault-/);
    assert.equal(mode(second, 'data').mode, 'full');
    assert.match(mode(second, 'data').reason!, /raw disks of a running libvirt domain are read in full/);
    // The raw disk is read in full: its one allocated MiB (holes are never read).
    assert.ok(second.stats.bytesRead <= 3 * CHUNK + MiB, `read ${second.stats.bytesRead} bytes for three written regions and the raw disk's MiB`);
    assert.ok(second.stats.bytesRead >= 3 * MiB + MiB, 'the written regions were read');
  });

  it('keeps tracking through a clean stop and start', async () => {
    await lv.virsh('destroy', domain, '--graceful');
    await lv.virsh('start', domain, '--paused');
    await write([5], 0x50);
    const r = await backupAndCheck();
    assert.equal(mode(r, 'root').mode, 'incremental', mode(r, 'root').reason);
    assert.ok(r.stats.bytesRead <= CHUNK + MiB, `read ${r.stats.bytesRead} bytes`);
  });

  it('reads a disk in full, with the reason, after QEMU was killed, and is incremental again after that', async () => {
    const pid = await lv.qemuPid(domain);
    process.kill(pid, 'SIGKILL');
    await waitFor('the domain to stop', async () => (await lv.virsh('domstate', domain)).trim() === 'shut off', 20_000);
    await lv.virsh('start', domain, '--paused');
    await write([9], 0x60);
    const full = await backupAndCheck();
    assert.equal(mode(full, 'root').mode, 'full');
    assert.match(mode(full, 'root').reason!, /libvirt refused to read checkpoint vmvault-[0-9a-f]{8}-[0-9a-f]{64} \(.*bitmap/);

    await write([13], 0x70);
    const again = await backupAndCheck();
    assert.equal(mode(again, 'root').mode, 'incremental', mode(again, 'root').reason);
  });

  it('keeps the previous checkpoint when a backup fails, and stays incremental', async () => {
    const before = await checkpoints();
    await write([2], 0x30);
    await assert.rejects(backupVm(repo, {
      driver: 'libvirt', vm: 'lv', disks: [], domain, warn: () => {},
      beforeCommit: () => Promise.reject(new Error('refused by the test before the manifest')),
    }), /refused by the test/);
    assert.deepEqual(await checkpoints(), before, 'the failed backup\'s checkpoint is gone and the previous one stays');
    const r = await backupAndCheck();
    assert.equal(mode(r, 'root').mode, 'incremental', mode(r, 'root').reason);
  });

  it('aborts the backup job a killed run left, and stays incremental', async () => {
    // What a run killed while it read leaves: libvirt's job, its export and its checkpoint.
    const left = await openPointInTime(repo, 'libvirt', { vm: 'lv', disks: [], domain, warn: () => {} }, newBackupId());
    assert.equal((await lv.virsh('domjobinfo', domain)).match(/Operation:\s+(\S+)/)?.[1], 'Backup');
    await write([4], 0x28);
    const r = await backupAndCheck();
    assert.equal(mode(r, 'root').mode, 'incremental', mode(r, 'root').reason);
    assert.match(warnings.join('\n'), /aborting the libvirt backup job an earlier run left/);
    assert.ok(left.disks.length > 0);
  });
});

describe('libvirt driver: a running linked clone whose template changed while it was off', { skip }, () => {
  let lv: TestLibvirt;
  const domain = `vv-clone-${process.pid}`;
  after(async () => {
    await lv?.stop();
  });

  it('is read in full (its checkpoint counts writes to the clone only), and restores as QEMU reads it', async () => {
    lv = await startLibvirt();
    const repo = await Repository.init(new LocalStorage(path.join(lv.imageDir, 'repo')), 'pw', { kdf: 'weak' });
    const base = await makeImage(lv.imageDir, 'template.qcow2', 'qcow2', 16 * MiB, [{ offset: 0, length: 4 * MiB, pattern: 0x11 }]);
    const clone = path.join(lv.imageDir, 'clone.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', clone]);
    for (const f of [base, clone]) await lv.own(f);
    await defineDomain(lv, domain, [{ path: clone, format: 'qcow2' }]);
    const backup = () => backupVm(repo, { driver: 'libvirt', vm: 'clone', disks: [], domain, warn: () => {} });
    const first = await backup();
    assert.equal(first.manifest.disks[0]!.chainStamps?.length, 1, 'the template\'s identity is recorded');
    const same = await backup();
    assert.equal(same.manifest.disks[0]!.mode, 'incremental', same.manifest.disks[0]!.reason);
    // The template changes while the domain is off; nothing is written to the clone.
    await lv.virsh('destroy', domain, '--graceful');
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 0 4M', base]);
    await lv.virsh('start', domain, '--paused');
    const after = await backup();
    assert.equal(after.manifest.disks[0]!.mode, 'full');
    assert.match(after.manifest.disks[0]!.reason!, /a file of the image's backing chain changed since backup/);
    const to = await fs.mkdtemp(path.join(lv.imageDir, 'restore-clone-'));
    await restore(repo, { backupId: after.manifest.id, to });
    await lv.virsh('destroy', domain); // QEMU holds the clone's lock while it runs
    const cmp = await compareImages(path.join(to, 'clone.qcow2'), clone, 'qcow2', 'qcow2');
    assert.ok(cmp.identical, cmp.output);
  });
});

/**
 * On-demand snapshots on real images and a real VM: the pre-update flow through the
 * CLI (create --export, write, revert) for a stopped VM, the same through QMP for a
 * running one, the expiry sweep, and the errors an operator must get.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { readFile, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { compareImages, snapshotList } from '../../src/disk/qemu.js';
import { VmvaultError } from '../../src/errors.js';
import { SNAPSHOT_PREFIX } from '../../src/vm/image-driver.js';
import { parseConfig } from '../../src/config/load.js';
import {
  createSnapshot, deleteSnapshot, expireSnapshots, listSnapshots, RESERVED_SNAPSHOT_PREFIX, revertSnapshot, snapshotTargetOf,
  type SnapshotInfo, type SnapshotTarget,
} from '../../src/vm/snapshots.js';
import { cli, cliJson, type Env } from '../helpers/cli.js';
import { holdImageLock, makeImage, qemuIo, tempDir, verifyPatterns, writePattern, type TempDir } from '../helpers/images.js';
import { startTestVm } from '../helpers/qemu-vm.js';

const MiB = 1024 * 1024;
const PASSWORD = 'snapshot test passphrase';

let tmp: TempDir;
before(async () => { tmp = await tempDir('vmvault-snap-'); });
after(async () => { await tmp.cleanup(); });

let n = 0;
/** A fresh directory with a 2-disk VM "web" (stopped, driver image) in a configuration file. */
async function setup(extraVm = '') {
  const dir = join(tmp.path, `case-${n++}`);
  await execa('mkdir', ['-p', dir]);
  const a = await makeImage(dir, 'a.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0xa1 }]);
  const b = await makeImage(dir, 'b.qcow2', 'qcow2', 8 * MiB, [{ offset: 2 * MiB, length: MiB, pattern: 0xb1 }]);
  const repo = join(dir, 'repo');
  await writeFile(join(dir, 'password'), `${PASSWORD}\n`);
  const yaml = [
    `stateDir: ${dir}/state`,
    `repository: { url: ${repo}, passwordFile: ${dir}/password }`,
    'vms:',
    '  - name: web',
    `    disks: [{ path: ${a} }, { path: ${b}, format: qcow2 }]`,
    '  - name: db',
    `    disks: [{ path: ${dir}/db.qcow2 }]`,
    extraVm,
  ].join('\n');
  const configFile = join(dir, 'vmvault.yaml');
  await writeFile(configFile, yaml);
  const env: Env = { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, VMVAULT_CONFIG: configFile };
  const config = parseConfig(yaml, configFile);
  return { dir, a, b, repo, env, config, stateDir: config.stateDir, web: snapshotTargetOf(config.vms[0]!) };
}

async function copyImage(from: string, to: string): Promise<string> {
  await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', from, to]);
  return to;
}

test('the reserved prefix is the one backups use for their temporary snapshots', () => {
  assert.equal(RESERVED_SNAPSHOT_PREFIX, SNAPSHOT_PREFIX);
});

describe('snapshots of a stopped VM (qemu-img)', () => {
  test('pre-update flow through the CLI: create --export, write, revert; both disks equal the snapshot again', async () => {
    const s = await setup();
    const init = await cli(['--repo', s.repo, '--password-file', join(s.dir, 'password'), 'init', '--kdf', 'weak'], s.env);
    assert.equal(init.code, 0, init.stderr);

    const created = await cliJson<SnapshotInfo>(['snapshot', 'create', 'web', '--name', 'before-upgrade', '--label', 'pre-update', '--expire-in', '7d', '--export'], s.env);
    assert.equal(created.name, 'before-upgrade');
    assert.equal(created.label, 'pre-update');
    assert.deepEqual(created.disks, ['a', 'b']);
    assert.match(created.backup ?? '', /^[0-9a-f]{64}$/);
    const expires = Date.parse(created.expiresAt!) - Date.parse(created.created);
    assert.equal(expires, 7 * 24 * 3600_000);
    // What the disks held at snapshot time.
    const copyA = await copyImage(s.a, join(s.dir, 'a-then.qcow2'));
    const copyB = await copyImage(s.b, join(s.dir, 'b-then.qcow2'));

    // The export is a backup in the repository (the configuration's), labelled as given.
    const backups = await cliJson<{ id: string; vm: string; labels: string[]; disks: { name: string }[] }[]>(
      ['--repo', s.repo, '--password-file', join(s.dir, 'password'), 'backups'], s.env);
    assert.equal(backups.length, 1);
    assert.equal(backups[0]!.id, created.backup);
    assert.equal(backups[0]!.vm, 'web');
    assert.deepEqual(backups[0]!.labels, ['pre-update']);
    assert.deepEqual(backups[0]!.disks.map((d) => d.name), ['a', 'b']);

    const listed = await cliJson<SnapshotInfo[]>(['snapshot', 'list', 'web'], s.env);
    assert.deepEqual(listed.map((x) => [x.name, x.label, x.expiresAt, x.backup]), [['before-upgrade', 'pre-update', created.expiresAt, created.backup]]);

    // The update: changes on both disks.
    await writePattern(s.a, 'qcow2', 0, MiB / 2, 0xee);
    await writePattern(s.b, 'qcow2', 5 * MiB, MiB, 0xef);
    assert.equal((await compareImages(s.a, copyA, 'qcow2', 'qcow2')).identical, false);
    assert.equal((await compareImages(s.b, copyB, 'qcow2', 'qcow2')).identical, false);

    const reverted = await cli(['snapshot', 'revert', 'web', 'before-upgrade'], s.env);
    assert.equal(reverted.code, 0, reverted.stderr);
    assert.match(reverted.stdout, /reverted web to snapshot before-upgrade/);
    assert.equal((await compareImages(s.a, copyA, 'qcow2', 'qcow2')).identical, true);
    assert.equal((await compareImages(s.b, copyB, 'qcow2', 'qcow2')).identical, true);
    await verifyPatterns(s.a, 'qcow2', [{ offset: 0, length: MiB, pattern: 0xa1 }]);

    // The snapshot is kept after a revert; delete removes it from both disks and from the metadata.
    assert.equal((await cliJson<SnapshotInfo[]>(['snapshot', 'list', 'web'], s.env)).length, 1);
    const del = await cli(['snapshot', 'delete', 'web', 'before-upgrade'], s.env);
    assert.equal(del.code, 0, del.stderr);
    assert.deepEqual(await cliJson(['snapshot', 'list', 'web'], s.env), []);
    assert.deepEqual((await snapshotList(s.a)).map((x) => x.name), []);
    assert.deepEqual((await snapshotList(s.b)).map((x) => x.name), []);
    const meta = JSON.parse(await readFile(join(s.stateDir, 'snapshots', 'web.json'), 'utf8'));
    assert.deepEqual(meta.snapshots, {});
  });

  test('clear errors: unknown VM, duplicate name, bad or reserved names, unknown snapshot', async () => {
    const s = await setup();
    const unknown = await cli(['snapshot', 'create', 'mail', '--name', 'x'], s.env);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /unknown VM "mail": the inventory has "web", "db"/);

    assert.equal((await cli(['snapshot', 'create', 'web', '--name', 'pre'], s.env)).code, 0);
    const dup = await cli(['snapshot', 'create', 'web', '--name', 'pre'], s.env);
    assert.equal(dup.code, 1);
    assert.match(dup.stderr, /VM "web" already has a snapshot "pre": choose another name, or delete it first/);
    assert.deepEqual((await snapshotList(s.a)).map((x) => x.name), ['pre'], 'no second snapshot of that name');

    for (const [name, why] of [['vmvault-1', /reserved for the temporary snapshots of backups/], ['12', /only digits/], ['a/b', /not a valid snapshot name/], ['-x', /not a valid snapshot name/]] as const) {
      const r = await cli(['snapshot', 'create', 'web', '--name', name], s.env);
      assert.equal(r.code, 1, name);
      assert.match(r.stderr, why, name);
    }
    const missing = await cli(['snapshot', 'revert', 'web', 'nope'], s.env);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /VM "web" has no snapshot "nope" \(it has "pre"\)/);
    const noConfig = await cli(['snapshot', 'list', 'web'], { PATH: process.env.PATH });
    assert.match(noConfig.stderr, /no configuration: pass --config FILE or set VMVAULT_CONFIG/);
  });

  test('a snapshot whose id is the name of another (an image can carry any id) makes a revert refuse, changing nothing', async () => {
    const s = await setup();
    // A snapshot whose 14-byte name becomes id "nightly" + name "planted!" in place (the same 15 bytes).
    await qemuIo(s.a, 'qcow2', ['write -P 0xaa 0 64k']);
    await execa('qemu-img', ['snapshot', '-c', 'ABCDEFGHIJKLMN', s.a]);
    const img = await readFile(s.a);
    const table = Number(img.readBigUInt64BE(64));
    const extra = img.readUInt32BE(table + 36);
    img.writeUInt16BE(7, table + 12);
    img.writeUInt16BE(8, table + 14);
    img.write('nightlyplanted!', table + 40 + extra, 'latin1');
    await writeFile(s.a, img);
    assert.deepEqual((await snapshotList(s.a)).map((x) => [x.id, x.name]), [['nightly', 'planted!']]);
    await qemuIo(s.a, 'qcow2', ['write -P 0x00 0 64k']);
    await createSnapshot(s.web, { name: 'nightly' }, { stateDir: s.stateDir });
    await qemuIo(s.a, 'qcow2', ['write -P 0xbb 0 64k']);
    await assert.rejects(revertSnapshot(s.web, 'nightly', { stateDir: s.stateDir }), (e: VmvaultError) =>
      e.code === 'AMBIGUOUS' && /snapshot name "nightly" means more than one snapshot of .*a\.qcow2 \(id \d+ named "nightly", id "nightly" named "planted!"\).*Nothing was changed/.test(e.message));
    await verifyPatterns(s.a, 'qcow2', [{ offset: 0, length: 64 * 1024, pattern: 0xbb }]);
  });

  test('a VM running under the offline driver is never reverted: IMAGE_LOCKED, no disk changed', async () => {
    const s = await setup();
    await createSnapshot(s.web, { name: 'pre' }, { stateDir: s.stateDir });
    await writePattern(s.a, 'qcow2', 0, MiB, 0xee);
    await writePattern(s.b, 'qcow2', 2 * MiB, MiB, 0xef);
    // A real QEMU runs with the second disk: reverting the first alone would already be wrong.
    const release = await holdImageLock(s.b, 'qcow2', { by: 'vm' });
    try {
      const r = await cli(['snapshot', 'revert', 'web', 'pre'], s.env);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /cannot revert VM "web" to snapshot "pre": disk image .*b\.qcow2 is in use/);
      assert.match(r.stderr, /Nothing was changed/);
      assert.match(r.stderr, /never reverted through qemu-img/);
    } finally {
      await release();
    }
    // Held by a writable qemu-nbd this time, through the function the worker uses.
    const releaseNbd = await holdImageLock(s.a, 'qcow2');
    try {
      await assert.rejects(revertSnapshot(s.web, 'pre', { stateDir: s.stateDir }), (err: Error & { code?: string }) => err.code === 'IMAGE_LOCKED');
    } finally {
      await releaseNbd();
    }
    await verifyPatterns(s.a, 'qcow2', [{ offset: 0, length: MiB, pattern: 0xee }]);
    await verifyPatterns(s.b, 'qcow2', [{ offset: 2 * MiB, length: MiB, pattern: 0xef }]);
    // Once the VM is stopped, the revert works.
    await revertSnapshot(s.web, 'pre', { stateDir: s.stateDir });
    await verifyPatterns(s.a, 'qcow2', [{ offset: 0, length: MiB, pattern: 0xa1 }]);
    await verifyPatterns(s.b, 'qcow2', [{ offset: 2 * MiB, length: MiB, pattern: 0xb1 }]);
  });

  test('a snapshot one disk lacks is listed as partial and never reverted', async () => {
    const s = await setup();
    await execa('qemu-img', ['snapshot', '-c', 'by-hand', s.a]);
    const [only] = await listSnapshots(s.web, { stateDir: s.stateDir });
    assert.deepEqual([only?.name, only?.disks, only?.missingDisks, only?.label], ['by-hand', ['a'], ['b'], undefined]);
    await assert.rejects(revertSnapshot(s.web, 'by-hand', { stateDir: s.stateDir }), /missing on disk\(s\) b: reverting only some disks/);
    await deleteSnapshot(s.web, 'by-hand', { stateDir: s.stateDir });
    assert.deepEqual(await listSnapshots(s.web, { stateDir: s.stateDir }), []);
  });

  test('the expiry sweep deletes expired snapshots and keeps the others', async () => {
    const s = await setup();
    const t0 = new Date('2026-01-10T12:00:00Z');
    const at = (t: Date) => ({ stateDir: s.stateDir, now: () => t });
    await createSnapshot(s.web, { name: 'hour', expireIn: '1h' }, at(t0));
    await createSnapshot(s.web, { name: 'week', expireIn: '7d', label: 'before-migration' }, at(t0));
    await createSnapshot(s.web, { name: 'forever' }, at(t0));
    const names = async () => (await listSnapshots(s.web, { stateDir: s.stateDir })).map((x) => x.name).sort();

    const early = await expireSnapshots(s.config, s.config.host, new Date(t0.getTime() + 59 * 60_000));
    assert.deepEqual(early, { deleted: [], failed: [], busy: [] });
    assert.deepEqual(await names(), ['forever', 'hour', 'week']);

    const r1 = await expireSnapshots(s.config, s.config.host, new Date(t0.getTime() + 2 * 3600_000));
    assert.deepEqual(r1.deleted.map((x) => x.name), ['hour']);
    assert.deepEqual(r1.failed, []);
    assert.deepEqual(await names(), ['forever', 'week']);
    assert.deepEqual((await snapshotList(s.a)).map((x) => x.name).sort(), ['forever', 'week']);
    assert.deepEqual((await snapshotList(s.b)).map((x) => x.name).sort(), ['forever', 'week']);

    const r2 = await expireSnapshots(s.config, s.config.host, new Date('2026-01-17T12:00:00Z'));
    assert.deepEqual(r2.deleted.map((x) => [x.name, x.label]), [['week', 'before-migration']]);
    assert.deepEqual(await names(), ['forever']);
    const meta = JSON.parse(await readFile(join(s.stateDir, 'snapshots', 'web.json'), 'utf8'));
    assert.deepEqual(Object.keys(meta.snapshots), ['forever']);
  });

  test('the sweep does not delete a snapshot taken again under an expired name while it waited for the VM', async () => {
    const s = await setup();
    const t0 = new Date('2026-01-10T12:00:00Z');
    await createSnapshot(s.web, { name: 'pre', expireIn: '1h' }, { stateDir: s.stateDir, now: () => t0 });
    const later = new Date(t0.getTime() + 2 * 3600_000);
    // Between the sweep's first look and its lock on the VM, an operator replaces "pre" with one kept for good.
    const exclusive = async <T>(_vm: string, fn: () => Promise<T>): Promise<T | undefined> => {
      await deleteSnapshot(s.web, 'pre', { stateDir: s.stateDir });
      await createSnapshot(s.web, { name: 'pre' }, { stateDir: s.stateDir, now: () => later });
      return fn();
    };
    const r = await expireSnapshots(s.config, s.config.host, later, { exclusive });
    assert.deepEqual(r, { deleted: [], failed: [], busy: [] });
    const listed = await listSnapshots(s.web, { stateDir: s.stateDir });
    assert.deepEqual(listed.map((x) => [x.name, x.expiresAt, x.disks.length]), [['pre', undefined, 2]]);
  });

  test('an expired snapshot whose image is in use is kept and reported; the next sweep deletes it', async () => {
    const s = await setup();
    const t0 = new Date('2026-01-10T12:00:00Z');
    await createSnapshot(s.web, { name: 'hour', expireIn: '1h' }, { stateDir: s.stateDir, now: () => t0 });
    const later = new Date(t0.getTime() + 2 * 3600_000);
    const release = await holdImageLock(s.a, 'qcow2');
    try {
      const r = await expireSnapshots(s.config, s.config.host, later);
      assert.deepEqual(r.deleted, []);
      assert.equal(r.failed.length, 1);
      assert.match(r.failed[0]!.error, /in use/);
    } finally {
      await release();
    }
    assert.deepEqual((await snapshotList(s.b)).map((x) => x.name), ['hour'], 'nothing was deleted from the other disk either');
    const r = await expireSnapshots(s.config, s.config.host, later);
    assert.deepEqual(r.deleted.map((x) => x.name), ['hour']);
  });
});

describe('snapshots of a running VM (QMP)', () => {
  test('pre-update flow: create, write in the guest, revert; the guest reads the snapshot again and keeps running', async () => {
    const dir = join(tmp.path, 'running');
    await execa('mkdir', ['-p', dir]);
    const a = await makeImage(dir, 'a.qcow2', 'qcow2', 8 * MiB);
    const b = await makeImage(dir, 'b.qcow2', 'qcow2', 8 * MiB);
    const vm = await startTestVm([a, b]);
    try {
      const target: SnapshotTarget = { vm: 'live', driver: 'qemu', qmpSocket: vm.qmpSocket, disks: [{ path: a, name: 'a' }, { path: b, name: 'b' }] };
      const opts = { stateDir: join(dir, 'state') };
      await vm.write(0, 0, MiB, 0xa1);
      await vm.write(1, MiB, MiB, 0xb1);

      const created = await createSnapshot(target, { name: 'pre', expireIn: '1d' }, opts);
      assert.equal(created.vmState, true, 'a running VM is snapshotted by QEMU, RAM included');
      assert.deepEqual(created.disks, ['a', 'b']);
      assert.equal(await vm.status(), 'running');
      const dup = createSnapshot(target, { name: 'pre' }, opts);
      await assert.rejects(dup, /VM "live" already has a snapshot "pre"/);

      // The update, as the guest writes it.
      await vm.write(0, 0, MiB, 0xee);
      await vm.write(1, MiB, MiB, 0xef);
      await vm.write(1, 4 * MiB, MiB, 0x44);

      await revertSnapshot(target, 'pre', opts);
      assert.equal(await vm.status(), 'running');
      await vm.expect(0, 0, MiB, 0xa1);
      await vm.expect(1, MiB, MiB, 0xb1);
      await vm.expect(1, 4 * MiB, MiB, 0x00);

      const listed = await listSnapshots(target, opts);
      assert.deepEqual(listed.map((x) => [x.name, x.label, x.expiresAt, x.vmState]), [['pre', 'pre-update', created.expiresAt, true]]);
      await deleteSnapshot(target, 'pre', opts);
      assert.deepEqual(await listSnapshots(target, opts), []);
      assert.equal(await vm.status(), 'running');
    } finally {
      await vm.stop();
    }
    // The VM is gone: the qemu driver falls back to qemu-img, and the images hold no snapshot.
    assert.deepEqual((await snapshotList(a)).map((x) => x.name), []);
    await qemuIo(a, 'qcow2', ['read -P 0xa1 0 1M']);
  });

  test('through the CLI: create --export of a running VM, revert through its QEMU; the image driver refuses to revert it', async () => {
    const dir = join(tmp.path, 'running-cli');
    await execa('mkdir', ['-p', dir]);
    const a = await makeImage(dir, 'a.qcow2', 'qcow2', 4 * MiB);
    const vm = await startTestVm([a]);
    try {
      await writeFile(join(dir, 'password'), `${PASSWORD}\n`);
      const yaml = [
        `stateDir: ${dir}/state`, `repository: { url: ${dir}/repo, passwordFile: ${dir}/password }`, 'vms:',
        `  - { name: live, driver: qemu, qmpSocket: ${vm.qmpSocket}, disks: [{ path: ${a} }] }`,
        `  - { name: same-as-image, disks: [{ path: ${a} }] }`,
      ].join('\n');
      await writeFile(join(dir, 'vmvault.yaml'), yaml);
      const env: Env = { PATH: process.env.PATH, VMVAULT_CONFIG: join(dir, 'vmvault.yaml') };
      const repoFlags = ['--repo', `${dir}/repo`, '--password-file', `${dir}/password`];
      assert.equal((await cli([...repoFlags, 'init', '--kdf', 'weak'], env)).code, 0);
      await vm.write(0, 0, MiB, 0x5e);
      const created = await cliJson<SnapshotInfo>(['snapshot', 'create', 'live', '--name', 'pre', '--expire-in', '12h', '--export'], env);
      assert.deepEqual([created.vmState, created.label], [true, 'pre-update']);
      // The export went through the running QEMU (overlay, backup, commit): the VM runs on its own image again.
      assert.equal(await vm.status(), 'running');
      assert.deepEqual(await vm.activeFiles(), [a]);
      const backups = await cliJson<{ id: string; vm: string; labels: string[] }[]>([...repoFlags, 'backups'], env);
      assert.deepEqual(backups.map((b) => [b.id, b.vm, b.labels]), [[created.backup, 'live', ['pre-update']]]);
      const restored = await cli([...repoFlags, 'restore', created.backup!, '--to', `${dir}/restored`], env);
      assert.equal(restored.code, 0, restored.stderr);
      await qemuIo(`${dir}/restored/a.qcow2`, 'qcow2', ['read -P 0x5e 0 1M']);
      await vm.write(0, 0, MiB, 0x77);

      // The same disk seen as an offline image: qemu-img must not touch it while the VM runs.
      const refused = await cli(['snapshot', 'revert', 'same-as-image', 'pre'], env);
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /cannot revert VM "same-as-image" to snapshot "pre": disk image .* is in use.*Nothing was changed/);
      await vm.expect(0, 0, MiB, 0x77);

      const reverted = await cli(['snapshot', 'revert', 'live', 'pre'], env);
      assert.equal(reverted.code, 0, reverted.stderr);
      await vm.expect(0, 0, MiB, 0x5e);
      assert.equal(await vm.status(), 'running');
      const listed = await cliJson<SnapshotInfo[]>(['snapshot', 'list', 'live'], env);
      assert.deepEqual(listed.map((x) => [x.name, x.expiresAt]), [['pre', created.expiresAt]]);
    } finally {
      await vm.stop();
    }
  });

  test('a VM left on a backup\'s overlay gets told to run a backup, not to fix its inventory', async () => {
    const dir = join(tmp.path, 'left-on-overlay');
    await execa('mkdir', ['-p', dir]);
    const a = await makeImage(dir, 'a.qcow2', 'qcow2', 4 * MiB);
    const vm = await startTestVm([a]);
    try {
      const overlay = join(dir, 'a.qcow2.vmvault-overlay-0badc0de.qcow2');
      await vm.qmp.execute('transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: { 'node-name': 'disk0', 'snapshot-file': overlay, 'snapshot-node-name': 'vmvault-ov-0badc0de-0', format: 'qcow2' } }] });
      const target: SnapshotTarget = { vm: 'left', driver: 'qemu', qmpSocket: vm.qmpSocket, disks: [{ path: a, name: 'a' }] };
      await assert.rejects(createSnapshot(target, { name: 'pre' }, { stateDir: join(dir, 'state') }), (err: unknown) =>
        err instanceof VmvaultError && err.code === 'QEMU' && err.message.includes(`runs on overlay ${overlay}`) && /back the VM up once/.test(err.message) && !/fix the inventory/.test(err.message));
      assert.deepEqual(await vm.activeFiles(), [overlay], 'nothing was changed');
    } finally {
      await vm.stop();
    }
  });

  test('a stopped qemu-driver VM is handled with qemu-img; its disk-only snapshot is not loaded into a running VM', async () => {
    const dir = join(tmp.path, 'stopped-qemu');
    await execa('mkdir', ['-p', dir]);
    const a = await makeImage(dir, 'a.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x11 }]);
    const target: SnapshotTarget = { vm: 'sleepy', driver: 'qemu', qmpSocket: join(dir, 'no-such.sock'), disks: [{ path: a, name: 'a' }] };
    const opts = { stateDir: join(dir, 'state') };
    const s = await createSnapshot(target, { name: 'cold' }, opts);
    assert.equal(s.vmState, false);
    const vm = await startTestVm([a]);
    try {
      const live = { ...target, qmpSocket: vm.qmpSocket };
      await assert.rejects(revertSnapshot(live, 'cold', opts), /holds no VM state .*Stop the VM, then revert it/);
      assert.equal(await vm.status(), 'running');
    } finally {
      await vm.stop();
    }
  });
});

test('configuration VMs map to snapshot targets with their driver and socket', () => {
  const config = parseConfig([
    `host: ${hostname()}`,
    'vms:',
    '  - { name: live, driver: qemu, qmpSocket: /run/live.sock, disks: [{ path: /images/live.qcow2, format: qcow2 }] }',
  ].join('\n'), '/etc/vmvault/vmvault.yaml');
  assert.deepEqual(snapshotTargetOf(config.vms[0]!), { vm: 'live', driver: 'qemu', qmpSocket: '/run/live.sock', disks: [{ path: '/images/live.qcow2', name: 'live', format: 'qcow2' }] });
});

/**
 * The qemu driver through the queue: an inventory VM mapped to its payload
 * (backupPayloadFor), run by a real host agent on a real redis-server against a real
 * running qemu-system-x86_64.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import type { VmConfig } from '../../src/config/schema.js';
import { enqueueBackup } from '../../src/queue/enqueue.js';
import { backupPayloadFor, parseHostJob } from '../../src/queue/payloads.js';
import { startHostWorker, type BackupJobResult } from '../../workers/host-agent.js';
import { makeImage } from '../helpers/images.js';
import { startTestVm } from '../helpers/qemu-vm.js';
import { queueHarness, silent, uniqueHost, watchQueue, PASSWORD } from '../queue/setup.js';

const MiB = 1024 * 1024;

function inventoryVm(over: Partial<VmConfig>): VmConfig {
  return { name: 'web', host: 'h', driver: 'image', disks: [{ path: '/vm/web.qcow2', name: 'web' }], configFiles: [], tags: [], ...over };
}

describe('backup payloads carry the driver', () => {
  test('each driver gets what it needs, and nothing else', () => {
    assert.deepEqual(parseHostJob('backup', backupPayloadFor(inventoryVm({}))).payload,
      { vm: 'web', disks: [{ path: '/vm/web.qcow2', name: 'web' }], configs: [], labels: [] });
    const qemu = parseHostJob('backup', backupPayloadFor(inventoryVm({ driver: 'qemu', qmpSocket: '/run/web.qmp', guestAgentSocket: '/run/web.qga' })));
    assert.deepEqual(qemu.payload, { vm: 'web', disks: [{ path: '/vm/web.qcow2', name: 'web' }], configs: [], labels: [], driver: 'qemu', qmpSocket: '/run/web.qmp', guestAgentSocket: '/run/web.qga' });
    const libvirt = parseHostJob('backup', backupPayloadFor(inventoryVm({ driver: 'libvirt', disks: [], qmpSocket: '/ignored' })));
    assert.deepEqual(libvirt.payload, { vm: 'web', disks: [], configs: [], labels: [], driver: 'libvirt', libvirtDomain: 'web' });
  });

  test('a payload missing what its driver needs is refused, naming the field', () => {
    assert.throws(() => parseHostJob('backup', { vm: 'web', disks: [{ path: '/vm/web.qcow2' }], driver: 'qemu' }), /qmpSocket: the qemu driver needs the QMP socket/);
    assert.throws(() => parseHostJob('backup', { vm: 'web', disks: [], driver: 'qemu', qmpSocket: '/q' }), /disks: at least one disk/);
    assert.throws(() => parseHostJob('backup', { vm: 'web', driver: 'libvirt' }), /libvirtDomain: the libvirt driver needs the domain name/);
    assert.throws(() => parseHostJob('backup', { vm: 'web', disks: [{ path: '/d' }], driver: 'vmware' }), /driver: /);
  });
});

describe('host agent, qemu driver', () => {
  const h = queueHarness();

  test('backs up a running inventory VM and leaves it on its own image', async () => {
    const dir = await fs.mkdtemp(path.join(h.fx.dir, 'vm-'));
    const disk = await makeImage(dir, 'svc.qcow2', 'qcow2', 16 * MiB);
    const vm = await startTestVm([disk]);
    h.cleanup(() => vm.stop());
    await vm.write(0, 0, 8 * MiB, 0x42);
    const host = uniqueHost();
    const q = await watchQueue(h.redis.url, host);
    h.cleanup(() => q.close());
    const w = await startHostWorker({ host, redisUrl: h.redis.url, repoUrl: h.fx.repoUrl, passphrase: PASSWORD, logger: silent, progressIntervalMs: 0 });
    h.cleanup(() => w.close());

    const inv = inventoryVm({ name: 'svc', host, driver: 'qemu', disks: [{ path: disk, name: 'svc' }], qmpSocket: vm.qmpSocket });
    const job = await enqueueBackup(q.queue, backupPayloadFor(inv, { labels: ['live'] }));
    const done = await q.finished(job);
    assert.equal(done.failedReason, undefined, `job failed: ${done.failedReason}`);
    const r = done.returnvalue as BackupJobResult;
    assert.equal(r.vm, 'svc');
    assert.deepEqual(r.labels, ['live']);
    assert.equal(await vm.status(), 'running');
    assert.deepEqual(await vm.activeFiles(), [disk]);
    assert.deepEqual((await fs.readdir(dir)).filter((n) => n.includes('.vmvault-overlay-')), []);
    const m = await h.fx.repo.loadManifest(r.id);
    assert.equal(m.disks[0]!.sourcePath, disk);
    assert.equal(m.disks[0]!.chunks.filter(Boolean).length > 0, true);
  });
});

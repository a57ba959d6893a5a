/**
 * The libvirt driver: parsing what virsh prints (always), and a backup of a real
 * libvirt domain on a private libvirtd (test/helpers/libvirt.ts): where libvirt is
 * not installed that test is skipped and says so; where it is, it must pass.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { execa } from 'execa';
import { describe, it } from 'node:test';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import { imageDisks, parseDomblklist } from '../../src/vm/libvirt.js';
import { restore } from '../../src/pipeline/restore.js';
import { compareImages } from '../../src/disk/qemu.js';
import { defineDomain, libvirtMissing, startLibvirt } from '../helpers/libvirt.js';
import { libvirtDisks } from '../../src/pipeline/libvirt-xml.js';
import { makeImage } from '../helpers/images.js';

const DOMBLKLIST = ` Type   Device   Target   Source
------------------------------------------------------------------------
 file   disk     vda      /var/lib/libvirt/images/web.qcow2
 file   disk     vdb      /var/lib/libvirt/images/web data.qcow2.vmvault-overlay-0a1b2c3d.qcow2
 block  disk     vdc      /dev/vg0/web-logs
 file   cdrom    sda      -
 network disk    vdd      pool/img

`;

const skip = libvirtMissing() ?? false;

describe('libvirt driver', () => {
  it('parses virsh domblklist --details and keeps the image disks', () => {
    const all = parseDomblklist(DOMBLKLIST);
    assert.equal(all.length, 5);
    assert.deepEqual(all[1], { type: 'file', device: 'disk', target: 'vdb', source: '/var/lib/libvirt/images/web data.qcow2.vmvault-overlay-0a1b2c3d.qcow2' });
    assert.deepEqual(imageDisks(all).map((e) => e.target), ['vda', 'vdb', 'vdc']);
    assert.deepEqual(parseDomblklist(''), []);
  });

  it('backs up a running libvirt domain with its XML', { skip }, async () => {
    const lv = await startLibvirt();
    const domain = `vmvault-test-${process.pid}`;
    try {
      const disk = await makeImage(lv.imageDir, 'lv.qcow2', 'qcow2', 8 * 1024 * 1024, [{ offset: 0, length: 1024 * 1024, pattern: 0x61 }]);
      await lv.own(disk);
      await defineDomain(lv, domain, [{ path: disk, format: 'qcow2' }]);
      const repo = await Repository.init(new LocalStorage(path.join(lv.imageDir, 'repo')), 'pw', { kdf: 'weak' });
      const r = await backupVm(repo, { vm: 'lv', driver: 'libvirt', disks: [], domain, warn: () => {} });
      assert.equal(r.running, true);
      assert.deepEqual(r.manifest.disks.map((d) => d.sourcePath), [disk]);
      const stored = r.manifest.configs.find((c) => c.name === 'lv.xml');
      assert.ok(stored, 'the domain XML is stored as lv.xml');
      assert.deepEqual(libvirtDisks(Buffer.from(stored.data, 'base64').toString()).map((d) => d.path), [disk]);
      const after = parseDomblklist((await execa('virsh', ['domblklist', domain, '--details'])).stdout);
      assert.equal(after[0]!.source, disk, 'the domain is still on its own image');
      const to = path.join(lv.imageDir, 'restored');
      await restore(repo, { backupId: r.manifest.id, to });
      await lv.virsh('destroy', domain, '--graceful');
      const cmp = await compareImages(path.join(to, 'lv.qcow2'), disk, 'qcow2', 'qcow2');
      assert.ok(cmp.identical, cmp.output);
    } finally {
      await lv.stop();
    }
  });
});

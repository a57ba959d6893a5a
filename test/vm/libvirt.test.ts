/**
 * The libvirt driver: parsing what virsh prints (always), and a backup of a real
 * libvirt domain, which needs virsh and a libvirt daemon: where virsh is missing
 * that test is skipped and says so; where virsh is present it must pass.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { describe, it } from 'node:test';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import { imageDisks, parseDomblklist, virshAvailable } from '../../src/vm/libvirt.js';
import { libvirtDisks } from '../../src/pipeline/libvirt-xml.js';
import { makeImage, tempDir } from '../helpers/images.js';

const DOMBLKLIST = ` Type   Device   Target   Source
------------------------------------------------------------------------
 file   disk     vda      /var/lib/libvirt/images/web.qcow2
 file   disk     vdb      /var/lib/libvirt/images/web data.qcow2.vmvault-overlay-0a1b2c3d.qcow2
 block  disk     vdc      /dev/vg0/web-logs
 file   cdrom    sda      -
 network disk    vdd      pool/img

`;

const skip = (await virshAvailable())
  ? false
  : 'virsh is not installed here, so the libvirt driver is not exercised (install libvirt-clients and libvirt-daemon-system to run this test)';

describe('libvirt driver', () => {
  it('parses virsh domblklist --details and keeps the image disks', () => {
    const all = parseDomblklist(DOMBLKLIST);
    assert.equal(all.length, 5);
    assert.deepEqual(all[1], { type: 'file', device: 'disk', target: 'vdb', source: '/var/lib/libvirt/images/web data.qcow2.vmvault-overlay-0a1b2c3d.qcow2' });
    assert.deepEqual(imageDisks(all).map((e) => e.target), ['vda', 'vdb', 'vdc']);
    assert.deepEqual(parseDomblklist(''), []);
  });

  it('backs up a running libvirt domain with its XML', { skip }, async () => {
    const dir = await tempDir();
    const domain = `vmvault-test-${process.pid}`;
    try {
      const disk = await makeImage(dir.path, 'lv.qcow2', 'qcow2', 8 * 1024 * 1024, [{ offset: 0, length: 1024 * 1024, pattern: 0x61 }]);
      const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>
        <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`;
      const xmlFile = path.join(dir.path, 'domain.xml');
      await fs.writeFile(xmlFile, xml);
      await execa('virsh', ['create', xmlFile, '--paused']);
      const repo = await Repository.init(new LocalStorage(path.join(dir.path, 'repo')), 'pw', { kdf: 'weak' });
      const r = await backupVm(repo, { vm: 'lv', driver: 'libvirt', disks: [], domain, warn: () => {} });
      assert.equal(r.running, true);
      assert.deepEqual(r.manifest.disks.map((d) => d.sourcePath), [disk]);
      const stored = r.manifest.configs.find((c) => c.name === 'lv.xml');
      assert.ok(stored, 'the domain XML is stored as lv.xml');
      assert.deepEqual(libvirtDisks(Buffer.from(stored.data, 'base64').toString()).map((d) => d.path), [disk]);
      const after = parseDomblklist((await execa('virsh', ['domblklist', domain, '--details'])).stdout);
      assert.equal(after[0]!.source, disk, 'the domain is back on its own image');
    } finally {
      await execa('virsh', ['destroy', domain], { reject: false });
      await dir.cleanup();
    }
  });
});

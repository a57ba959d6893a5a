/**
 * libvirt domain XML: listing disks and rewriting their paths for a restore.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { VmvaultError } from '../../src/errors.js';
import { libvirtDisks, rewriteLibvirtDiskPaths } from '../../src/pipeline/libvirt-xml.js';

const DOMAIN = `<?xml version="1.0"?>
<!-- edited by hand: keep this comment -->
<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>6d2b3a55-2f0e-4d8e-9a7c-0c1f43a4f8b1</uuid>
  <description>a &amp; b</description>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web1-root.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>
`;

describe('libvirt domain XML', () => {
  it('lists file and block disks with their targets, buses and formats', () => {
    assert.deepEqual(libvirtDisks(DOMAIN), [
      { type: 'file', device: 'disk', path: '/var/lib/libvirt/images/web1-root.qcow2', target: 'vda', bus: 'virtio', format: 'qcow2', backing: ['/var/lib/libvirt/images/base.qcow2'] },
      { type: 'block', device: 'disk', path: '/dev/vg0/web1-data', target: 'vdb', bus: 'virtio', format: 'raw', backing: [] },
      { type: 'file', device: 'cdrom', path: '/isos/debian.iso', target: 'sda', bus: 'sata', format: 'raw', backing: [] },
    ]);
  });

  it('rewrites disks matched by old path or by disk name, and nothing else', () => {
    const out = rewriteLibvirtDiskPaths(DOMAIN, {
      '/var/lib/libvirt/images/web1-root.qcow2': '/srv/restore/web1-root.qcow2',
      'web1-data': { path: '/srv/restore/web1-data.qcow2', format: 'qcow2' },
      'not-a-disk': '/nowhere',
    });
    assert.deepEqual(libvirtDisks(out), [
      { type: 'file', device: 'disk', path: '/srv/restore/web1-root.qcow2', target: 'vda', bus: 'virtio', format: 'qcow2', backing: [] },
      { type: 'file', device: 'disk', path: '/srv/restore/web1-data.qcow2', target: 'vdb', bus: 'virtio', format: 'qcow2', backing: [] },
      { type: 'file', device: 'cdrom', path: '/isos/debian.iso', target: 'sda', bus: 'sata', format: 'raw', backing: [] },
    ]);
    // The old chain is gone: a restored image has no backing file.
    assert.doesNotMatch(out, /backingStore|base\.qcow2/);
    assert.doesNotMatch(out, /\/dev\/vg0/);
    // What was not touched stays: comment, entities, other attributes, the network disk, the interface.
    assert.match(out, /<!-- edited by hand: keep this comment -->/);
    assert.match(out, /<description>a &amp; b<\/description>/);
    assert.match(out, /cache="none"/);
    assert.match(out, /index="2"/);
    assert.match(out, /protocol="rbd" name="pool\/img"/);
    assert.match(out, /<interface type="network"><source network="default"\/><\/interface>/);
    assert.match(out, /<uuid>6d2b3a55-2f0e-4d8e-9a7c-0c1f43a4f8b1<\/uuid>/);
  });

  it('accepts a Map, escapes paths that need it and leaves an unmatched document equal', () => {
    const out = rewriteLibvirtDiskPaths(DOMAIN, new Map([['web1-root', `/srv/a&b/"q"'s.qcow2`]]));
    assert.equal(libvirtDisks(out)[0]!.path, `/srv/a&b/"q"'s.qcow2`);
    const same = rewriteLibvirtDiskPaths(DOMAIN, {});
    assert.deepEqual(libvirtDisks(same), libvirtDisks(DOMAIN));
    assert.equal(same.replaceAll('"', "'"), DOMAIN.replace('<?xml version="1.0"?>', "<?xml version='1.0'?>").trimEnd());
  });

  it('refuses what is not a domain XML', () => {
    const bad = (xml: string, re: RegExp) => assert.throws(() => rewriteLibvirtDiskPaths(xml, {}), (err: unknown) =>
      err instanceof VmvaultError && err.code === 'BAD_INPUT' && re.test(err.message));
    bad('<domain><devices>', /cannot be parsed/);
    bad('<network><name>x</name></network>', /expected a libvirt domain XML .*<network>/);
    bad('', /cannot be parsed/);
  });
});

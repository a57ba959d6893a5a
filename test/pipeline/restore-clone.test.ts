/**
 * Restore as a new VM (`--name`) and per-disk targets (`--disk NAME=PATH`), through the
 * real CLI: the domain XML gets the new name, a new UUID, new MACs and the new disk
 * paths; each disk lands where asked and equals its source (qemu-img compare); paths
 * that escape the restore directory, lexically or through a symlink, are refused.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { compareImages } from '../../src/disk/qemu.js';
import { libvirtDisks, renameLibvirtDomain } from '../../src/pipeline/libvirt-xml.js';
import { cli, cliJson, type Env } from '../helpers/cli.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
const UUID = '6d2b3a55-2f0e-4d8e-9a7c-0c1f43a4f8b1';
const MAC = '52:54:00:aa:bb:cc';
let dir: TempDir;
let env: Env;
let root: string;
let data: string;
let backup: string;

const domainXml = (rootPath: string, dataPath: string) => `<domain type='kvm'>
  <name>web1</name>
  <uuid>${UUID}</uuid>
  <memory unit='KiB'>65536</memory>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${rootPath}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${dataPath}'/><target dev='vdb' bus='virtio'/></disk>
    <interface type='network'><mac address='${MAC}'/><source network='default'/></interface>
  </devices>
</domain>
`;

before(async () => {
  dir = await tempDir('vmvault-restore-clone-');
  root = await makeImage(dir.path, 'root.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x11 }, { offset: 6 * MiB, length: MiB, pattern: 0x22 }]);
  data = await makeImage(dir.path, 'data.raw', 'raw', 4 * MiB, [{ offset: MiB, length: MiB, pattern: 0x33 }]);
  const xml = join(dir.path, 'web1.xml');
  await writeFile(xml, domainXml(root, data));
  env = { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, VMVAULT_REPOSITORY: join(dir.path, 'repo'), VMVAULT_PASSWORD: 'clone test' };
  const init = await cli(['init', '--kdf', 'weak'], env);
  assert.equal(init.code, 0, init.stderr);
  backup = (await cliJson(['backup', '--vm', 'web1', '--disk', root, '--format', 'qcow2', '--disk', data, '--format', 'raw', '--config', xml], env)).id;
});

after(async () => { await dir?.cleanup(); });

describe('restore as a new VM', () => {
  test('--name and --disk NAME=PATH: new name, new UUID, new MAC, disks where asked and equal to their sources', async () => {
    const to = join(dir.path, 'clone');
    const r = await cliJson(['restore', backup, '--to', to, '--name', 'web1-clone', '--disk', 'root=images/clone-root.qcow2', '--disk', `data=${join(to, 'big', 'clone-data.raw')}`], env);
    const rootAt = join(to, 'images', 'clone-root.qcow2');
    const dataAt = join(to, 'big', 'clone-data.raw');
    assert.deepEqual(r.files.filter((f: any) => f.kind === 'disk').map((f: any) => [f.name, f.path]), [['root', rootAt], ['data', dataAt]]);
    assert.equal(r.clone.name, 'web1-clone');
    const cmpRoot = await compareImages(root, rootAt, 'qcow2', 'qcow2');
    assert.ok(cmpRoot.identical, cmpRoot.output);
    const cmpData = await compareImages(data, dataAt, 'raw', 'raw');
    assert.ok(cmpData.identical, cmpData.output);

    const xml = await readFile(join(to, 'web1.xml'), 'utf8');
    assert.match(xml, /<name>web1-clone<\/name>/);
    const uuid = /<uuid>([^<]+)<\/uuid>/.exec(xml)?.[1];
    assert.ok(uuid && /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(uuid), `a fresh v4 UUID, got ${uuid}`);
    assert.notEqual(uuid, UUID);
    assert.equal(uuid, r.clone.uuid);
    const mac = /<mac address='([^']+)'/.exec(xml)?.[1] ?? /<mac address="([^"]+)"/.exec(xml)?.[1];
    assert.ok(mac && /^52:54:00(:[0-9a-f]{2}){3}$/.test(mac) && mac !== MAC, `a fresh MAC, got ${mac}`);
    assert.deepEqual(libvirtDisks(xml).map((d) => [d.path, d.format]), [[rootAt, 'qcow2'], [dataAt, 'raw']]);
    assert.ok(!xml.includes('web1</name>') && !xml.includes(root) && !xml.includes(data), 'nothing of the original identity or paths is left');

    // Two clones never share a UUID.
    const again = await cliJson(['restore', backup, '--to', join(dir.path, 'clone2'), '--name', 'web1-clone2'], env);
    assert.notEqual(again.clone.uuid, uuid);
    assert.match(await readFile(join(dir.path, 'clone2', 'web1.xml'), 'utf8'), /<name>web1-clone2<\/name>/);
  });

  test('a plain restore keeps the name and UUID; --disk NAME alone restores only that disk, without configuration', async () => {
    const to = join(dir.path, 'plain');
    await cliJson(['restore', backup, '--to', to], env);
    const xml = await readFile(join(to, 'web1.xml'), 'utf8');
    assert.match(xml, new RegExp(`<name>web1</name>[\\s\\S]*<uuid>${UUID}</uuid>`));
    const only = join(dir.path, 'only-data');
    await cliJson(['restore', backup, '--to', only, '--disk', 'data=d.img'], env);
    assert.deepEqual(await readdir(only), ['d.img']);
    assert.ok((await compareImages(data, join(only, 'd.img'), 'raw', 'raw')).identical);
  });

  test('paths that escape the restore directory are refused, lexically or through a symlink, and nothing is written', async () => {
    const to = join(dir.path, 'escape');
    const outside = join(dir.path, 'outside');
    await mkdir(outside);
    await mkdir(to);
    await symlink(outside, join(to, 'link'));
    const cases: [string[], RegExp][] = [
      [['--disk', 'root=../outside/r.qcow2'], /disk "root" cannot go to \.\.\/outside\/r\.qcow2: it is outside the restore directory .*escape/],
      [['--disk', `root=${join(outside, 'r.qcow2')}`], /disk "root" cannot go to .*outside\/r\.qcow2: it is outside the restore directory/],
      [['--disk', 'root=link/r.qcow2'], /resolves to .*outside, which is outside the restore directory/],
      [['--disk', 'root=a.qcow2', '--disk', 'data=a.qcow2'], /two restored files would both be .*a\.qcow2/],
      [['--disk', 'nosuch=x.raw'], /has no disk "nosuch"; its disks are: root, data/],
      [['--disk', 'root=.hidden'], /not a plain file name/],
      [['--name', 'bad/name'], /"bad\/name" is not a VM name/],
      [['--disk', 'root', '--name', 'half'], /--name restores a whole VM/],
    ];
    for (const [args, message] of cases) {
      const r = await cli(['restore', backup, '--to', to, ...args], env);
      assert.equal(r.code, 1, `${args.join(' ')}: ${r.stdout}`);
      assert.match(r.stderr, message, args.join(' '));
    }
    assert.deepEqual(await readdir(outside), [], 'nothing was written outside');
    assert.deepEqual((await readdir(to)).sort(), ['link'], 'nothing was written inside');
    assert.ok(!existsSync(join(to, 'root.qcow2')));
  });
});

describe('a clone never shares a disk with the original', () => {
  test('--name is refused when the domain uses a disk the backup does not hold; a plain restore of it still works', async () => {
    const xml = join(dir.path, 'web2.xml');
    await writeFile(xml, domainXml(root, data));
    const partial = (await cliJson(['backup', '--vm', 'web2', '--disk', root, '--format', 'qcow2', '--config', xml], env)).id;
    const to = join(dir.path, 'web2-clone');
    const r = await cli(['restore', partial, '--to', to, '--name', 'web2-clone'], env);
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stderr, new RegExp(`web2\\.xml uses disk\\(s\\) ${data.replace(/[.]/g, '\\.')} that the backup does not hold: a clone would share them with the original`));
    assert.ok(!existsSync(to) || (await readdir(to)).length === 0, 'nothing was written');
    await cliJson(['restore', partial, '--to', to], env);
    assert.ok((await compareImages(root, join(to, 'root.qcow2'), 'qcow2', 'qcow2')).identical);
  });
});

describe('renameLibvirtDomain', () => {
  test('adds a <name> and <uuid> when the domain had none; refuses names libvirt would not take', () => {
    const out = renameLibvirtDomain("<domain type='kvm'><memory>1</memory></domain>", { name: 'n1', uuid: UUID, macs: [] });
    assert.match(out, /<domain type="kvm"><name>n1<\/name><uuid>6d2b3a55-[^<]+<\/uuid><memory>/);
    assert.throws(() => renameLibvirtDomain('<domain/>', { name: '../x', uuid: UUID, macs: [] }), /is not a VM name/);
    assert.throws(() => renameLibvirtDomain('<network/>', { name: 'x', uuid: UUID, macs: [] }), /expected a libvirt domain XML/);
  });
});

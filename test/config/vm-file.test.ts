/**
 * The state directory's VM file: checked like the configuration's vms (every problem
 * as FILE:LINE:COL: key.path: message), names unique across both files, written
 * atomically, and merged live into config.vms by the inventory.
 */
import assert from 'node:assert/strict';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { VmInventory } from '../../src/config/inventory.js';
import { ConfigFileError, parseConfig } from '../../src/config/load.js';
import { parseVmFile, writeVmFile } from '../../src/config/vm-file.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const base = { host: 'hv1', hosts: { hv2: { restoreRoots: [] } }, configured: ['db'] };

function problems(text: string): string[] {
  try {
    parseVmFile(text, '/s/vms.yaml', base);
  } catch (err) {
    assert.ok(err instanceof ConfigFileError, String(err));
    return err.message.split('\n');
  }
  return assert.fail('the file was accepted');
}

describe('VM file', () => {
  let dir: TempDir;
  before(async () => { dir = await tempDir('vv-vmfile-'); });
  after(async () => dir.cleanup());

  test('a valid file: host and disk names filled in as in the configuration', () => {
    const vms = parseVmFile('vms:\n  - name: web\n    disks: [{ path: /img/web.qcow2 }]\n  - name: mail\n    host: hv2\n    disks: [{ path: /img/m.raw, name: root }]\n', 'f', base);
    assert.deepEqual(vms.map((v) => [v.name, v.host, v.disks[0]!.name, v.driver]), [['web', 'hv1', 'web', 'image'], ['mail', 'hv2', 'root', 'image']]);
  });

  test('every problem with its line: relative path, unknown key, unknown host, duplicate, name of the configuration', () => {
    assert.deepEqual(problems([
      'vms:',
      '  - name: web',
      '    disks: [{ path: img/web.qcow2 }]',
      '  - name: web',
      '    disks: [{ path: /img/web2.qcow2 }]',
      '    tagz: [a]',
      '  - name: db',
      '    disks: [{ path: /img/db.qcow2 }]',
      '  - name: far',
      '    host: hv9',
      '    disks: [{ path: /img/far.qcow2 }]',
      '',
    ].join('\n')), [
      '/s/vms.yaml:3:21: vms[0].disks[0].path: a disk path must be an absolute path (it is read on the VM\'s host)',
      '/s/vms.yaml:4:11: vms[1].name: VM name "web" is already used by vms[0] (line 2)',
      '/s/vms.yaml:6:5: vms[1].tagz: unknown key (did you mean "tags"?)',
      '/s/vms.yaml:7:11: vms[2].name: VM name "db" is already used by the configuration file: choose another name, or edit the VM there',
      '/s/vms.yaml:10:11: vms[3].host: VM "far" is on host "hv9", which is neither this host ("hv1") nor listed under hosts',
    ]);
  });

  test('written atomically and reloaded into config.vms; an invalid write changes nothing', async () => {
    const stateDir = join(dir.path, 'state');
    const config = parseConfig(`host: hv1\nstateDir: ${JSON.stringify(stateDir)}\nvms:\n  - name: db\n    disks: [{ path: /img/db.qcow2 }]\n`, join(dir.path, 'vmvault.yaml'));
    const inv = new VmInventory(config);
    await inv.start();
    try {
      assert.deepEqual(config.vms.map((v) => v.name), ['db']);
      await inv.add({ name: 'web', disks: [{ path: '/img/web.qcow2' }] });
      assert.deepEqual(config.vms.map((v) => v.name), ['db', 'web']);
      await assert.rejects(inv.add({ name: 'bad', disks: [{ path: 'rel.qcow2' }] }), /vms\[1\]\.disks\[0\]\.path: a disk path must be an absolute path/);
      await assert.rejects(inv.remove('db'), /defined in the configuration file/);
      assert.deepEqual(config.vms.map((v) => v.name), ['db', 'web']);
      assert.doesNotMatch(await readFile(inv.file, 'utf8'), /bad/);
      assert.deepEqual((await readdir(stateDir)).filter((f) => f.endsWith('.tmp')), [], 'no temporary file left');
      // A hand edit is picked up by the watcher.
      await writeFile(inv.file, 'vms:\n  - name: mail\n    disks: [{ path: /img/mail.raw }]\n');
      for (let i = 0; i < 50 && config.vms.at(-1)?.name !== 'mail'; i++) await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(config.vms.map((v) => v.name), ['db', 'mail']);
      await inv.remove('mail');
      assert.deepEqual(config.vms.map((v) => v.name), ['db']);
    } finally {
      inv.stop();
    }
  });

  test('writeVmFile refuses a name the configuration uses', async () => {
    await assert.rejects(writeVmFile(join(dir.path, 'x', 'vms.yaml'), [{ name: 'db', disks: [{ path: '/a.raw' }] }], base), /already used by the configuration file/);
  });
});

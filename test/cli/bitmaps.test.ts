/**
 * `vmvault bitmaps list|remove` through the real CLI, on real qcow2 images that real
 * backups into two repositories left their dirty bitmaps on: listed by repository tag,
 * removed by tag or name, and a repository whose bitmap was removed reads in full once
 * while the other's tracking carries on.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { imageInfo } from '../../src/disk/qemu.js';
import { removeBitmaps } from '../../src/vm/bitmaps.js';
import { cli, cliJson, type Env } from '../helpers/cli.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
let dir: TempDir;
let disk: string;
let base: Env;
const repoA = () => ({ ...base, VMVAULT_REPOSITORY: join(dir.path, 'repo-a') });
const repoB = () => ({ ...base, VMVAULT_REPOSITORY: join(dir.path, 'repo-b') });
const GONE = `vmvault-deadbeef-${'c'.repeat(64)}`;
let tagA: string;
let tagB: string;

interface Listed { vm: string; repositoryTag?: string; bitmaps: { disk: string; name: string; tag?: string; backupId?: string; state: string }[] }
interface Backup { id: string; disks: { mode: string; reason: string }[] }

const backup = (env: Env) => cliJson<Backup>(['backup', '--vm', 'web', '--disk', `root=${disk}`, '--format', 'qcow2'], env);
const names = async () => (await imageInfo(disk, 'qcow2')).bitmaps.map((b) => b.name).sort();

before(async () => {
  dir = await tempDir('vmvault-cli-bitmaps-');
  disk = await makeImage(dir.path, 'web.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x42 }]);
  base = { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, VMVAULT_PASSWORD: 'bitmaps test passphrase', VMVAULT_CACHE_DIR: join(dir.path, 'cache') };
  for (const env of [repoA(), repoB()]) {
    const r = await cli(['init', '--kdf', 'weak', '--json'], env);
    assert.equal(r.code, 0, r.stderr);
  }
  // Two repositories back the disk up: each leaves its own bitmap. A third, gone since, left one too; "other" is not vmvault's.
  const a = await backup(repoA());
  const b = await backup(repoB());
  assert.deepEqual([a.disks[0]!.mode, b.disks[0]!.mode], ['full', 'full']);
  await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', disk, GONE]);
  await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', disk, 'other']);
  const now = await names();
  const tagOf = (id: string) => now.find((n) => n.endsWith(`-${id}`))!.slice('vmvault-'.length, 'vmvault-'.length + 8);
  [tagA, tagB] = [tagOf(a.id), tagOf(b.id)];
  assert.notEqual(tagA, tagB);
});

after(async () => {
  await dir?.cleanup();
});

describe('vmvault bitmaps', () => {
  test('list shows every vmvault bitmap with its repository tag and backup, and marks the given repository\'s', async () => {
    const l = await cliJson<Listed>(['bitmaps', 'list', '--qcow2', disk], repoA());
    assert.equal(l.repositoryTag, tagA);
    assert.deepEqual(l.bitmaps.map((b) => b.tag).sort(), [tagA, tagB, 'deadbeef'].sort());
    assert.ok(l.bitmaps.every((b) => b.disk === 'web.qcow2' && b.state === 'recording' && /^[0-9a-f]{64}$/.test(b.backupId!)));
    assert.ok(!l.bitmaps.some((b) => b.name === 'other'), 'a bitmap that is not vmvault\'s is not listed');
    const text = await cli(['bitmaps', 'list', '--qcow2', disk], repoA());
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /REPOSITORY TAG/);
    assert.match(text.stdout, /2 other repositories keep bitmaps here/);
  });

  test('remove refuses what is not a tag, not vmvault\'s, or not there, and changes nothing', async () => {
    const before = await names();
    const cases: [string[], RegExp][] = [
      [['--tag', 'xyz'], /"xyz" is not a repository tag/],
      [['--name', 'other'], /"other" is not a vmvault bitmap/],
      [['--tag', '12345678'], /no disk of VM .* has a vmvault bitmap of repository tag 12345678 \(its disks carry: .*tag deadbeef/],
      [[], /say what to remove: --tag TAG .* or --name NAME/],
      [['--tag', 'deadbeef', '--name', GONE], /say what to remove/],
    ];
    for (const [args, message] of cases) {
      const r = await cli(['bitmaps', 'remove', '--qcow2', disk, ...args], base);
      assert.notEqual(r.code, 0, args.join(' '));
      assert.match(r.stderr, message);
      assert.doesNotMatch(r.stderr, /unexpected error/);
    }
    assert.deepEqual(await names(), before);
  });

  test('remove --tag takes a gone repository\'s bitmaps and nothing else', async () => {
    const r = await cliJson<{ removed: { name: string }[] }>(['bitmaps', 'remove', '--qcow2', disk, '--tag', 'deadbeef'], base);
    assert.deepEqual(r.removed.map((b) => b.name), [GONE]);
    assert.ok(!(await names()).includes(GONE));
    assert.ok((await names()).includes('other'));
  });

  test('a repository whose bitmap was removed reads the disk in full once; the other stays incremental', async () => {
    const r = await cliJson<{ removed: { name: string }[] }>(['bitmaps', 'remove', '--qcow2', disk, '--tag', tagB], base);
    assert.equal(r.removed.length, 1);
    const b = await backup(repoB());
    assert.equal(b.disks[0]!.mode, 'full');
    assert.match(b.disks[0]!.reason, /missing from the image/);
    assert.equal((await backup(repoB())).disks[0]!.mode, 'incremental');
    assert.equal((await backup(repoA())).disks[0]!.mode, 'incremental');
  });

  test('an inventory VM is found by name, with the configuration', async () => {
    const config = join(dir.path, 'vmvault.yaml');
    await writeFile(config, `stateDir: ${JSON.stringify(join(dir.path, 'state'))}\nvms:\n  - { name: web, disks: [{ path: ${JSON.stringify(disk)}, format: qcow2 }] }\n`);
    const l = await cliJson<Listed>(['bitmaps', 'list', 'web', '-c', config], base);
    assert.equal(l.vm, 'web');
    assert.deepEqual(l.bitmaps.map((b) => b.tag).sort(), [tagA, tagB].sort());
    const unknown = await cli(['bitmaps', 'list', 'db', '-c', config], base);
    assert.match(unknown.stderr, /unknown VM "db"/);
    const neither = await cli(['bitmaps', 'list'], base);
    assert.match(neither.stderr, /which VM\?/);
  });

  test('a libvirt domain\'s bitmaps are its checkpoints: removal names virsh instead', async () => {
    await assert.rejects(removeBitmaps({ vm: 'dom', driver: 'libvirt', disks: [{ path: disk, name: 'root', format: 'qcow2' }] }, { tag: tagA }),
      (err: Error & { code?: string }) => err.code === 'UNSUPPORTED' && /virsh checkpoint-delete dom NAME/.test(err.message));
    assert.ok((await names()).some((n) => n.startsWith(`vmvault-${tagA}-`)), 'nothing was removed');
  });
});

/**
 * One damaged object costs only itself, on both backends: a garbage or foreign lock, a
 * lock of a process gone from this host, a damaged key file beside a good one, damaged
 * and swapped manifests beside good ones. Each is reported; every other operation works;
 * gc deletes nothing a damaged manifest might reference.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { compareImages } from '../../src/disk/qemu.js';
import { Catalogue } from '../../src/repo/catalogue.js';
import { acquireLock } from '../../src/repo/locks.js';
import { Repository } from '../../src/repo/repository.js';
import { openStorage } from '../../src/storage/open.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { BIN, cli, cliJson, spawnCli } from '../helpers/cli.js';
import { e2eFile, backupJson, initRepo, objects, PASSWORD } from './harness.js';

const MiB = 1024 * 1024;
const { all, work } = await e2eFile('vmvault-damaged-');
const chunkNames = (objs: Map<string, number>) => [...objs.keys()].filter((n) => n.startsWith('chunks/')).sort();

async function put(repo: string, name: string, data: Uint8Array): Promise<void> {
  const s = openStorage(repo);
  try { await s.put(name, data); } finally { await s.close(); }
}
async function get(repo: string, name: string): Promise<Uint8Array> {
  const s = openStorage(repo);
  try { return await s.get(name); } finally { await s.close(); }
}

for (const b of all) {
  describe(`damaged objects on the ${b.name} backend`, () => {
    test('a garbage lock and a foreign one are reported, do not stop backups, restores or verify, and unlock removes them; gc waits for that', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `lk-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 0, length: 2 * MiB, pattern: 0x71 }]);
      const made = await backupJson(env, 'lk', [img]);
      const garbage = randomBytes(16).toString('hex');
      await put(repo, `locks/${garbage}`, randomBytes(200));
      // A real lock of another repository, copied in (e.g. by a careless rsync).
      const { repo: otherUrl } = await initRepo(b);
      const other = await Repository.open(openStorage(otherUrl), PASSWORD);
      const foreign = await acquireLock(other, 'shared', { purpose: 'elsewhere' });
      await put(repo, `locks/${foreign.id}`, await get(otherUrl, `locks/${foreign.id}`));
      await foreign.release();
      await other.storage.close();

      const dir = join(work, `lk-out-${b.name}`);
      const restored = await cli(['restore', made.id, '--to', dir, '--json'], env);
      assert.equal(restored.code, 0, restored.stderr);
      assert.match(restored.stderr, new RegExp(`warning: lock locks/(${garbage}|${foreign.id}), locks/(${garbage}|${foreign.id}) cannot be read .*vmvault unlock.*restore goes on`));
      const cmp = await compareImages(img, JSON.parse(restored.stdout).files[0].path, 'qcow2', 'qcow2');
      assert.ok(cmp.identical, cmp.output);
      const again = await cli(['backup', '--vm', 'lk', '--disk', img, '--json'], env);
      assert.equal(again.code, 0, again.stderr);
      assert.equal((await cli(['verify'], env)).code, 0);

      const gc = await cli(['gc'], env);
      assert.equal(gc.code, 1);
      assert.match(gc.stderr, /garbage collection needs the exclusive lock, and lock .* cannot be read .*remove them with "vmvault unlock"/);
      const unlocked = await cli(['unlock'], env);
      assert.equal(unlocked.code, 0, unlocked.stderr);
      assert.match(unlocked.stdout, new RegExp(`removed locks/${garbage}: it cannot be read`));
      assert.match(unlocked.stdout, new RegExp(`removed locks/${foreign.id}: it cannot be read: .*failed authentication`));
      assert.match(unlocked.stdout, /removed 2 lock\(s\); 0 live lock\(s\) remain/);
      assert.equal((await cliJson(['gc'], env)).chunksDeleted, 0);
    });

    test('the lock of a process gone from this host is removed by unlock at once', async () => {
      const { repo, env } = await initRepo(b);
      const raw = join(work, `killed-${b.name}.raw`);
      await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=200', 'status=none']);
      const child = spawnCli(['backup', '--vm', 'killed', '--disk', raw], env);
      const locks = async () => [...(await objects(repo)).keys()].filter((n) => n.startsWith('locks/'));
      try {
        for (let i = 0; i < 2400 && (await locks()).length === 0; i++) await new Promise((r) => setTimeout(r, 25));
        assert.equal((await locks()).length, 1, 'the backup took its lock');
      } finally {
        child.kill('SIGKILL');
        await child;
      }
      const gc = await cli(['gc'], env);
      assert.match(gc.stderr, /locked .*backup of killed/, 'the lock is live: it has not expired');
      const unlocked = await cli(['unlock'], env);
      assert.match(unlocked.stdout, new RegExp(`removed locks/[0-9a-f]+: backup of killed: process ${child.pid} is gone from this host`));
      assert.deepEqual(await locks(), []);
      assert.equal((await cli(['gc'], env)).code, 0);
    });

    test('a damaged key file is skipped when another key opens the repository, and reported', async () => {
      const { repo, env } = await initRepo(b);
      const added = await cli(['key', 'add', '--kdf', 'weak'], { ...env, VMVAULT_NEW_PASSWORD: 'second passphrase' });
      assert.equal(added.code, 0, added.stderr);
      const keys = await cliJson(['key', 'list'], env);
      const spare = keys.find((k: { current: boolean }) => !k.current).id;
      await put(repo, `keys/${spare}`, Buffer.from('{"this is": "not a key'));
      const listed = await cli(['backups'], env);
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stderr, new RegExp(`warning: key file keys/${spare} is damaged .*vmvault key remove ${spare}`));
      const shown = await cliJson(['key', 'list'], env);
      assert.match(shown.find((k: { id: string }) => k.id === spare).damaged, /not valid JSON/);
      const wrong = await cli(['backups'], { ...env, VMVAULT_PASSWORD: 'second passphrase' });
      assert.equal(wrong.code, 1);
      assert.match(wrong.stderr, new RegExp(`wrong passphrase: it opens none of the 1 readable key\\(s\\).*keys/${spare}`));
      const removed = await cli(['key', 'remove', spare], env);
      assert.equal(removed.code, 0, removed.stderr);
      assert.doesNotMatch((await cli(['backups'], env)).stderr, /warning/);
    });

    test('with no readable key file (deleted, or a symlink, which is no object) the error says so, not "wrong passphrase"', async () => {
      const { repo, env } = await initRepo(b);
      const keys = await cliJson(['key', 'list'], env);
      const s = openStorage(repo);
      await s.delete(`keys/${keys[0].id}`);
      await s.close();
      if (b.name === 'local') await symlink(join(repo, 'config'), join(repo, `keys/${keys[0].id}`));
      const listed = await cli(['backups'], env);
      assert.equal(listed.code, 1);
      assert.doesNotMatch(listed.stderr, /wrong passphrase/);
      assert.match(listed.stderr, /has no readable key file .*put back a good copy of keys\/.*vmvault key import/);
      if (b.name !== 'local') return;
      assert.ok(listed.stderr.includes(`keys/${keys[0].id} (it is a symbolic link, not a key file vmvault wrote`), listed.stderr);
      // A directory at the key's name, with a file in it: called a directory, not a damaged key file.
      await rm(join(repo, `keys/${keys[0].id}`));
      await mkdir(join(repo, `keys/${keys[0].id}`));
      await writeFile(join(repo, `keys/${keys[0].id}/copy`), '{}');
      const inDir = await cli(['backups'], env);
      assert.equal(inDir.code, 1);
      assert.ok(inDir.stderr.includes(`keys/${keys[0].id} (it is a directory (holding keys/${keys[0].id}/copy), not a key file vmvault wrote: move it out of the repository`), inDir.stderr);
      assert.doesNotMatch(inDir.stderr, /not valid JSON|wrong passphrase/);
    });

    test('a key file asking for an absurd Argon2 cost is skipped as damaged, not computed: no command stalls on it', async () => {
      const { repo, env } = await initRepo(b);
      const keys = await cliJson(['key', 'list'], env);
      const real = JSON.parse(Buffer.from(await get(repo, `keys/${keys[0].id}`)).toString('utf8'));
      // The same key, at a cost of hours (and 4 GiB): every key is tried when a passphrase opens none.
      const planted = 'f'.repeat(keys[0].id.length);
      await put(repo, `keys/${planted}`, Buffer.from(JSON.stringify({ ...real, kdf: { ...real.kdf, opsLimit: 2_000_000_000, memLimit: 4 * 1024 ** 3 - 1 } })));
      const wrong = await execa(process.execPath, [BIN, 'backups'], { reject: false, env: { ...env, VMVAULT_PASSWORD: 'not the passphrase', VMVAULT_KEY_CACHE: 'off' }, timeout: 120_000, stdin: 'ignore' });
      assert.equal(wrong.timedOut, false, 'the planted key was computed');
      assert.equal(wrong.exitCode, 1);
      assert.match(wrong.stderr, new RegExp(`wrong passphrase: .*1 key file\\(s\\) are damaged and were skipped: keys/${planted}`));
      const listed = await cli(['backups'], env);
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stderr, new RegExp(`key file keys/${planted} is damaged`));
    });

    test('verify --read-data quarantines a damaged chunk only a damaged manifest uses, so the next backup uploads it again', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `orph-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x31 }]);
      await backupJson(env, 'o', [img]);
      const first = chunkNames(await objects(repo));
      await writePattern(img, 'qcow2', 4 * MiB, MiB, 0x32);
      const second = await backupJson(env, 'o', [img]);
      const only = chunkNames(await objects(repo)).filter((n) => !first.includes(n));
      assert.equal(only.length, 1, 'the second backup added one chunk');
      const bytes = Buffer.from(await get(repo, only[0]!));
      bytes[bytes.length - 20]! ^= 0x40;
      await put(repo, only[0]!, bytes);
      await put(repo, `backups/${second.id}`, randomBytes(300)); // the one manifest that uses it
      const verified = await cli(['verify', '--read-data'], env);
      assert.equal(verified.code, 1, 'the damaged manifest is a problem');
      assert.match(verified.stdout, new RegExp(`1 chunk\\(s\\) that no readable backup uses are damaged \\(${only[0]}\\): they were quarantined`));
      const again = await backupJson(env, 'o', [img]);
      const restored = await cliJson(['restore', again.id, '--to', join(work, `orph-out-${b.name}`)], env);
      const cmp = await compareImages(img, restored.files[0].path, 'qcow2', 'qcow2');
      assert.ok(cmp.identical, cmp.output);
    });

    test('damaged and swapped manifests are listed as damaged; every other backup lists, shows, restores and prunes; gc deletes no chunk', async () => {
      const { repo, env } = await initRepo(b);
      const imgA = await makeImage(work, `ma-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x11 }]);
      const imgB = await makeImage(work, `mb-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 4 * MiB, length: MiB, pattern: 0x12 }]);
      const imgC = await makeImage(work, `mc-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x13 }]);
      const a1 = await backupJson(env, 'a', [imgA]);
      const b1 = await backupJson(env, 'b', [imgB]);
      const a2 = await backupJson(env, 'a', [imgA], ['--label', 'second']);
      const c = await backupJson(env, 'c', [imgC]);
      const s = openStorage(repo);
      await s.delete(`backups/${c.id}`); // its chunk is now garbage, which gc would delete
      await s.close();
      const goodA1 = await get(repo, `backups/${a1.id}`);
      await put(repo, `backups/${a1.id}`, randomBytes(goodA1.length));
      await put(repo, `backups/${a2.id}`, await get(repo, `backups/${b1.id}`)); // swapped
      const chunksBefore = chunkNames(await objects(repo));

      const listed = await cli(['backups', '--json'], env);
      assert.equal(listed.code, 0, listed.stderr);
      const rows = JSON.parse(listed.stdout);
      assert.deepEqual(rows.filter((r: { damaged?: string }) => !r.damaged).map((r: { id: string }) => r.id), [b1.id]);
      assert.deepEqual(rows.filter((r: { damaged?: string }) => r.damaged).map((r: { id: string }) => r.id).sort(), [a1.id, a2.id].sort());
      assert.match(listed.stderr, new RegExp(`backups/${a2.id} failed authentication.*every other backup is unaffected`));
      const table = await cli(['backups'], env);
      assert.match(table.stdout, new RegExp(`${a1.id.slice(0, 12)} +- +\\(damaged\\)`));

      assert.equal((await cliJson(['show', b1.id], env)).vm, 'b');
      const bad = await cli(['show', a1.id], env);
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, new RegExp(`error: backup manifest backups/${a1.id} .*(damaged|failed authentication)`));
      const restored = await cliJson(['restore', b1.id, '--to', join(work, `mb-out-${b.name}`)], env);
      const cmp = await compareImages(imgB, restored.files[0].path, 'qcow2', 'qcow2');
      assert.ok(cmp.identical, cmp.output);

      const policy = join(work, `p-${b.name}.yaml`);
      await writeFile(policy, 'name: nightly\nschedule: "30 1 * * *"\nselect:\n  vms: [a, b]\nretention:\n  keepLast: 1\n');
      const pruned = await cli(['prune', '--policy', policy, '--dry-run', '--json'], env);
      assert.equal(pruned.code, 0, pruned.stderr);
      assert.deepEqual(JSON.parse(pruned.stdout).map((d: { id: string }) => d.id), [b1.id]);
      assert.match(pruned.stderr, new RegExp(`prune leaves backup ${a1.id} alone`));

      const gc = await cli(['gc', '--json'], env);
      assert.equal(gc.code, 1, 'gc says something is wrong');
      const report = JSON.parse(gc.stdout);
      assert.equal(report.chunksDeleted, 0);
      // c's chunk (really unused) and a's (used by the damaged manifests only): nothing proves either unused.
      assert.equal(report.chunksKept, 2);
      assert.deepEqual(report.damagedManifests.map((d: { id: string }) => d.id).sort(), [a1.id, a2.id].sort());
      assert.match(gc.stderr, /garbage collection deleted no chunk: 2 backup manifest\(s\) cannot be read.*Put a good copy of each back/);
      assert.deepEqual(chunkNames(await objects(repo)), chunksBefore);

      // The API's catalogue: the others list, the damaged one is an integrity error, not "not found".
      const warnings: string[] = [];
      const opened = await Repository.open(openStorage(repo), PASSWORD, { onWarning: (m) => warnings.push(m) });
      const catalogue = new Catalogue(opened, 0);
      assert.deepEqual((await catalogue.list()).map((e) => e.id), [b1.id]);
      await assert.rejects(catalogue.get(a1.id.slice(0, 12)), (e: { code?: string }) => e.code === 'INTEGRITY');
      assert.deepEqual((await catalogue.unreadable()).map((u) => u.kind), ['damaged', 'damaged']);
      assert.equal(warnings.length, 2, 'each damaged manifest reported once');
      await put(repo, `backups/${a1.id}`, goodA1); // a good copy put back
      assert.deepEqual((await catalogue.list()).map((e) => e.id).sort(), [a1.id, b1.id].sort());

      // Damaged in place after the catalogue read it, at the same size: read again, since the
      // listing shows a change. On S3 the ETag shows it even where the time cannot (Last-Modified
      // has whole seconds): here the listing's times are hidden, so only the ETag can tell.
      const plain = openStorage(repo);
      const timeless = { ...plain, list: async function* (prefix: string) { for await (const o of plain.list(prefix)) yield { ...o, modified: 0 }; } };
      const watched = b.name === 's3' ? new Catalogue(await Repository.open(timeless, PASSWORD), 0) : catalogue;
      assert.ok((await watched.list()).some((e) => e.id === a1.id));
      const flipped = Buffer.from(goodA1);
      flipped[flipped.length >> 1]! ^= 0x01;
      await put(repo, `backups/${a1.id}`, flipped);
      assert.deepEqual((await watched.unreadable()).map((u) => [u.id, u.kind]), [[a1.id, 'damaged'], [a2.id, 'damaged']].sort((x, y) => x[0]!.localeCompare(y[0]!)));
      assert.ok(!(await watched.list()).some((e) => e.id === a1.id));
      await put(repo, `backups/${a1.id}`, goodA1);
      assert.ok((await watched.list()).some((e) => e.id === a1.id));
      await plain.close();
      await opened.storage.close();
    });
  });
}

describe('a directory repository with something else at a manifest\'s name', () => {
  test('show and restore say what is there (a FIFO, a symbolic link), not that no backup has that id; an unknown id is still "no backup"', async () => {
    const local = all.find((b) => b.name === 'local')!;
    const { repo, env } = await initRepo(local);
    const img = await makeImage(work, 'stray-manifest.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x31 }]);
    const made = await backupJson(env, 'st', [img]);
    const manifest = join(repo, 'backups', made.id);
    for (const [plant, kind] of [
      [() => execa('mkfifo', [manifest]), 'a FIFO \\(named pipe\\)'],
      [() => symlink('/etc/hostname', manifest), 'a symbolic link'],
    ] as const) {
      await rm(manifest, { force: true });
      await plant();
      for (const args of [['show', made.id.slice(0, 12)], ['restore', made.id, '--to', join(work, 'stray-out')]]) {
        const r = await execa(process.execPath, [BIN, ...args], { env, reject: false, timeout: 30_000, stdin: 'ignore' });
        assert.equal(r.timedOut, false, `${args[0]} hung`);
        assert.equal(r.exitCode, 1, String(r.stderr));
        assert.match(String(r.stderr), new RegExp(`backups/${made.id} is ${kind}, not a backup manifest vmvault wrote.*move it out of the repository`), String(r.stderr));
      }
      // The listing shows it as a damaged backup, and gc deletes none of the chunks it may use.
      const listed = await cli(['backups', '--json'], env);
      assert.equal(listed.code, 0, listed.stderr);
      assert.deepEqual(JSON.parse(listed.stdout).map((b: { id: string }) => b.id), [made.id]);
      assert.match(JSON.parse(listed.stdout)[0].damaged, new RegExp(`^backups/${made.id} is ${kind}, not a backup manifest`));
      assert.match(listed.stderr, new RegExp(`warning: backups/${made.id} is ${kind}.*: backup ${made.id.slice(0, 12)} cannot be listed or restored`));
      const chunksBefore = [...(await objects(repo)).keys()].filter((o) => o.startsWith('chunks/'));
      const gc = await cli(['gc', '--json'], env);
      assert.equal(JSON.parse(gc.stdout).damagedManifests.length, 1, gc.stdout);
      assert.match(gc.stderr, /garbage collection deleted no chunk: 1 backup manifest\(s\) cannot be read/);
      assert.ok(chunksBefore.length > 0);
      assert.deepEqual([...(await objects(repo)).keys()].filter((o) => o.startsWith('chunks/')), chunksBefore);
      // The API's catalogue says the same, once.
      const warnings: string[] = [];
      const opened = await Repository.open(openStorage(repo), PASSWORD, { onWarning: (m) => warnings.push(m) });
      const catalogue = new Catalogue(opened, 0);
      assert.deepEqual(await catalogue.list(), []);
      await assert.rejects(catalogue.get(made.id.slice(0, 12)), (e: Error & { code?: string }) => e.code === 'INTEGRITY' && new RegExp(`backups/${made.id} is ${kind}`).test(e.message));
      assert.deepEqual((await catalogue.unreadable()).map((u) => [u.id, u.kind]), [[made.id, 'stray']]);
      assert.equal(warnings.filter((w) => w.includes(`backups/${made.id} is`)).length, 1, 'reported once');
      await opened.storage.close();
    }
    const unknown = await cli(['show', 'ffff0000'], env);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /no backup id starts with "ffff0000"/);
  });

  test('verify says what lies at a chunk\'s name (a FIFO, a directory) rather than only "missing"; a backup then stores the chunk again over the FIFO', async () => {
    const local = all.find((b) => b.name === 'local')!;
    const { repo, env } = await initRepo(local);
    const img = await makeImage(work, 'stray-chunk.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: 4 * MiB, pattern: 0x47 }, { offset: 4 * MiB, length: 4 * MiB, pattern: 0x48 }]);
    await backupJson(env, 'sc', [img]);
    const chunks = [...(await objects(repo)).keys()].filter((o) => o.startsWith('chunks/'));
    assert.ok(chunks.length >= 2);
    const [fifo, dir] = chunks as [string, string];
    await rm(join(repo, fifo));
    await execa('mkfifo', [join(repo, fifo)]);
    await rm(join(repo, dir));
    await mkdir(join(repo, dir));
    const verify = await cli(['verify'], env);
    assert.equal(verify.code, 1);
    assert.ok(verify.stdout.includes(`missing: ${fifo} is a FIFO (named pipe), not a chunk vmvault wrote (move it out of the repository`), verify.stdout);
    assert.ok(verify.stdout.includes(`missing: ${dir} is a directory, not a chunk vmvault wrote`), verify.stdout);
    await rm(join(repo, dir), { recursive: true });
    const again = await backupJson(env, 'sc', [img]);
    assert.ok(again.id);
    assert.equal((await cli(['verify', '--read-data'], env)).code, 0, 'the FIFO was replaced by the chunk, the directory\'s chunk stored again');
  });
});

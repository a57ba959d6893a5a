/**
 * The core engine end to end, through the real CLI, real qemu-img/qemu-nbd and a
 * real S3-protocol server: every test runs against both backends.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { lineChecksum } from '../../src/crypto/paper.js';
import { mkdtemp, readdir, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { execa } from 'execa';
import { compareImages, imageInfo } from '../../src/disk/qemu.js';
import { openStorage } from '../../src/storage/open.js';
import { makeImage, writePattern, holdImageLock } from '../helpers/images.js';
import { cli, cliJson, spawnCli } from '../helpers/cli.js';
import { e2eFile, backupJson, envFor, initRepo, objects, type Backend } from './harness.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const { all, work } = await e2eFile('vmvault-e2e-');

/** Distinct 1 MiB patterns, so that chunks differ from one another. */
function patterned(n: number, base = 0) {
  return Array.from({ length: n }, (_, i) => ({ offset: (base + i) * MiB, length: MiB, pattern: 1 + ((base + i) % 250) }));
}

const chunkNames = (objs: Map<string, number>) => [...objs.keys()].filter((n) => n.startsWith('chunks/'));

for (const b of all) {
  describe(`core engine on the ${b.name} backend`, () => {
    test('round trips qcow2→qcow2, qcow2→raw, raw→qcow2, vmdk→qcow2, vdi→qcow2 are identical', async () => {
      const { env } = await initRepo(b);
      const writes = [...patterned(3), { offset: 13 * MiB, length: 3 * MiB + 4096, pattern: 0x5a }, { offset: 63 * MiB, length: MiB, pattern: 0x11 }];
      for (const [from, to] of [['qcow2', 'qcow2'], ['qcow2', 'raw'], ['raw', 'qcow2'], ['vmdk', 'qcow2'], ['vdi', 'qcow2']] as const) {
        const src = await makeImage(work, `rt-${b.name}-${from}-${to}`, from, 64 * MiB, writes);
        const made = await backupJson(env, `vm-${from}`, [src]);
        assert.equal(made.disks[0].format, from);
        assert.equal(made.disks[0].virtualSize, (await imageInfo(src)).virtualSize);
        const dir = join(work, `out-${b.name}-${from}-${to}`);
        const restored = await cliJson(['restore', made.id, '--to', dir, '--format', to], env);
        const disk = restored.files.find((f: any) => f.kind === 'disk');
        assert.equal((await imageInfo(disk.path)).format, to);
        const cmp = await compareImages(src, disk.path, from, to);
        assert.ok(cmp.identical, `${from}→${to}: ${cmp.output}`);
      }
    });

    test('an unchanged image uploads nothing; 1 MiB rewritten uploads at most 2 chunks', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `dedup-${b.name}`, 'qcow2', 64 * MiB, patterned(40));
      const first = await backupJson(env, 'dedup', [img]);
      assert.equal(first.stats.chunksNew, 10);
      assert.equal(first.stats.chunksZero, 6);
      const before1 = await objects(repo);
      assert.equal(chunkNames(before1).length, 10);

      // Read in full, so that deduplication by content is what finds every chunk (an incremental would not read them).
      const second = await backupJson(env, 'dedup', [img], ['--full-read']);
      assert.equal(second.stats.chunksNew, 0);
      assert.equal(second.stats.bytesUploaded, 0);
      assert.equal(second.stats.chunksReused, 10);
      const before2 = await objects(repo);
      assert.deepEqual(chunkNames(before2).sort(), chunkNames(before1).sort(), 'no chunk object was added');

      await writePattern(img, 'qcow2', 7 * MiB + 512 * 1024, MiB, 0xee); // straddles chunks 1 and 2
      const third = await backupJson(env, 'dedup', [img]);
      assert.ok(third.stats.chunksNew >= 1 && third.stats.chunksNew <= 2, `chunksNew ${third.stats.chunksNew}`);
      const after3 = await objects(repo);
      const added = chunkNames(after3).filter((n) => !before2.has(n));
      assert.equal(added.length, third.stats.chunksNew);
      assert.equal(added.reduce((n, name) => n + after3.get(name)!, 0), third.stats.bytesUploaded, 'bytesUploaded is what landed in storage');
    });

    test('a 64 GiB disk holding 20 MiB reads about 20 MiB and restores sparse', async () => {
      const { env } = await initRepo(b);
      const writes = Array.from({ length: 20 }, (_, i) => ({ offset: i * 3 * GiB + 5 * MiB, length: MiB, pattern: 1 + i }));
      const img = await makeImage(work, `sparse-${b.name}`, 'qcow2', 64 * GiB, writes);
      const made = await backupJson(env, 'big', [img]);
      assert.ok(made.stats.bytesRead >= 20 * MiB && made.stats.bytesRead <= 24 * MiB, `read ${made.stats.bytesRead}`);
      assert.equal(made.disks[0].virtualSize, 64 * GiB);
      const dir = join(work, `sparse-out-${b.name}`);
      const restored = await cliJson(['restore', made.id.slice(0, 10), '--to', dir, '--format', 'raw'], env);
      const raw = restored.files[0].path;
      const st = await stat(raw);
      assert.equal(st.size, 64 * GiB);
      assert.ok(st.blocks * 512 < 200 * MiB, `restored raw uses ${st.blocks * 512} bytes on disk`);
      const cmp = await compareImages(img, raw, 'qcow2', 'raw');
      assert.ok(cmp.identical, cmp.output);
      // --no-sync: the same file, and the output says it is not durable yet.
      const fastDir = join(work, `sparse-out-nosync-${b.name}`);
      const fast = await cli(['restore', made.id, '--to', fastDir, '--format', 'raw', '--no-sync'], env);
      assert.equal(fast.code, 0, fast.stderr);
      assert.match(fast.stdout, /not synced \(--no-sync\).*run "sync"/);
      const fastCmp = await compareImages(img, join(fastDir, basename(raw)), 'qcow2', 'raw');
      assert.ok(fastCmp.identical, fastCmp.output);
      const instant = await cli(['restore', made.id, '--to', join(work, `sparse-instant-${b.name}`), '--instant', '--no-sync'], env);
      assert.notEqual(instant.code, 0, instant.stderr);
      assert.match(instant.stderr, /--no-sync applies to a plain restore only/);
    });

    test('one flipped byte, or a chunk copied over another, is found by verify and stops restore', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `flip-${b.name}`, 'qcow2', 32 * MiB, patterned(12));
      const made = await backupJson(env, 'flip', [img]);
      assert.equal((await cli(['verify', '--read-data'], env)).code, 0);
      const names = chunkNames(await objects(repo)).sort();
      const storage = openStorage(repo);
      try {
        const victim = names[0]!;
        const original = await storage.get(victim);
        const flipped = Buffer.from(original);
        flipped[flipped.length >> 1]! ^= 0x20;
        await storage.put(victim, flipped);

        const quick = await cli(['verify'], env);
        assert.equal(quick.code, 0, 'without --read-data only presence is checked');
        const deep = await cli(['verify', '--read-data'], env);
        assert.notEqual(deep.code, 0);
        assert.match(deep.stdout, new RegExp(victim));
        assert.match(deep.stdout, new RegExp(made.id));
        const report = await cli(['verify', '--read-data', '--json'], env);
        assert.deepEqual(JSON.parse(report.stdout).problems.map((p: any) => p.object), [victim]);

        const dir = join(work, `flip-out-${b.name}`);
        const r = await cli(['restore', made.id, '--to', dir], env);
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /failed authentication|damaged|does not match/);
        assert.deepEqual(existsSync(dir) ? await readdir(dir) : [], [], 'a failed restore leaves nothing behind');

        // Grown past the size of any sealed chunk (data appended): damaged, and not read whole.
        await storage.put(victim, Buffer.concat([original, Buffer.alloc(5 * MiB)]));
        const grown = await cli(['verify', '--read-data', '--json'], env);
        assert.notEqual(grown.code, 0);
        assert.deepEqual(JSON.parse(grown.stdout).problems.map((p: any) => p.object), [victim]);
        // verify knows it from the listing's size, without reading it; restore finds it by reading.
        assert.match(grown.stdout, /damaged: \d+ bytes, longer than any sealed chunk of \d+-byte chunks/);
        const grownOut = await cli(['restore', made.id, '--to', join(work, `grown-out-${b.name}`)], env);
        assert.notEqual(grownOut.code, 0);
        assert.match(grownOut.stderr, new RegExp(`chunk ${victim} is damaged: .*more than the \\d+ any valid one can be`));

        await storage.put(victim, original);
        assert.equal((await cli(['verify', '--read-data'], env)).code, 0);
        await storage.put(names[1]!, original); // a valid chunk object under another chunk's name
        const swapped = await cli(['verify', '--read-data', '--json'], env);
        assert.notEqual(swapped.code, 0);
        assert.deepEqual(JSON.parse(swapped.stdout).problems.map((p: any) => p.object), [names[1]]);
      } finally {
        await storage.close();
      }
    });

    test('bad input gives a clear error, a non-zero exit, and writes nothing', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `bad-${b.name}`, 'qcow2', 16 * MiB, patterned(2));
      const start = await objects(repo);
      const same = async (what: string) => assert.deepEqual(await objects(repo), start, `${what} wrote nothing`);

      const wrong = await cli(['backup', '--vm', 'x', '--disk', img], { ...env, VMVAULT_PASSWORD: 'not the passphrase' });
      assert.notEqual(wrong.code, 0);
      assert.match(wrong.stderr, /wrong passphrase/);
      await same('wrong passphrase');

      const missingRepo = await b.newRepo();
      const none = await cli(['backups'], envFor(b, missingRepo));
      assert.notEqual(none.code, 0);
      assert.match(none.stderr, /no vmvault repository at/);
      assert.equal((await objects(missingRepo)).size, 0);
      if (b.name === 'local') assert.equal(existsSync(missingRepo), false, 'the missing repository was not created');

      for (const typo of ['s3:/bucket/prefix', 's4://bucket/prefix', 's3://']) {
        const r = await cli(['backups'], envFor(b, typo));
        assert.notEqual(r.code, 0, typo);
        assert.match(r.stderr, /repository/i, typo);
        assert.ok(r.stderr.includes(typo), `the message quotes ${typo}: ${r.stderr}`);
      }

      const noDisk = await cli(['backup', '--vm', 'x', '--disk', join(work, 'does-not-exist.qcow2')], env);
      assert.notEqual(noDisk.code, 0);
      assert.match(noDisk.stderr, /does-not-exist\.qcow2 does not exist/);
      await same('missing disk');

      const release = await holdImageLock(img, 'qcow2');
      try {
        const locked = await cli(['backup', '--vm', 'x', '--disk', img], env);
        assert.notEqual(locked.code, 0);
        assert.match(locked.stderr, /in use|lock/i);
        assert.ok(locked.stderr.includes(img), locked.stderr);
      } finally {
        await release();
      }
      await same('locked image');
      assert.deepEqual((await imageInfo(img)).snapshots, [], 'no snapshot was left in the image');
    });

    test('object names reveal no VM, disk or file name', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `okapi-disk-${b.name}`, 'qcow2', 16 * MiB, patterned(3));
      const cfgDir = await mkdtemp(join(work, 'cfg-'));
      const cfg = join(cfgDir, 'lemur-domain.xml');
      await (await import('node:fs/promises')).writeFile(cfg, '<domain><name>zebra</name></domain>');
      await backupJson(env, 'zebra-vm', [`okapi=${img}`], ['--config', cfg, '--label', 'pre-update']);
      const names = [...(await objects(repo)).keys()];
      assert.ok(names.length > 3);
      for (const n of names) {
        assert.match(n, /^(config|keys\/[0-9a-f]+|chunks\/[0-9a-f]{2}\/[0-9a-f]{64}|backups\/[0-9a-f]{64}|index\/[0-9a-f]{64})$/);
        for (const secret of ['zebra', 'okapi', 'lemur', 'pre-update', b.name]) assert.ok(!n.includes(secret), `${n} contains ${secret}`);
      }
    });

    test('a backup killed half-way lists nothing; the next one completes and reuses its chunks', async () => {
      const { repo, env } = await initRepo(b);
      const raw = join(work, `kill-${b.name}.raw`);
      await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=400', 'status=none']);
      const img = join(work, `kill-${b.name}.qcow2`);
      await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
      const child = spawnCli(['backup', '--vm', 'killme', '--disk', img, '--json'], env);
      let uploaded = 0;
      for (let i = 0; i < 600 && uploaded < 5; i++) {
        await new Promise((r) => setTimeout(r, 25));
        uploaded = chunkNames(await objects(repo)).length;
      }
      child.kill('SIGKILL');
      await child;
      const kept = chunkNames(await objects(repo));
      assert.ok(kept.length >= 5 && kept.length < 100, `killed after ${kept.length} of 100 chunks`);
      assert.deepEqual(await cliJson(['backups'], env), []);

      // qemu-nbd exits once its client is gone; give it a moment before the next backup needs the image.
      let next: any;
      for (let attempt = 0; attempt < 20; attempt++) {
        const r = await cli(['backup', '--vm', 'killme', '--disk', img, '--json'], env);
        if (r.code === 0) { next = JSON.parse(r.stdout); break; }
        assert.match(r.stderr, /in use|lock/i, r.stderr);
        await new Promise((res) => setTimeout(res, 250));
      }
      assert.ok(next, 'the next backup succeeded');
      assert.ok(next.stats.chunksReused >= kept.length, `reused ${next.stats.chunksReused} of ${kept.length}`);
      assert.equal(next.stats.chunksNew + next.stats.chunksReused, 100);
      assert.equal((await cliJson(['backups'], env)).length, 1);
      assert.deepEqual((await imageInfo(img)).snapshots, [], 'the killed run\'s snapshot was cleaned up');
      const cmpDir = join(work, `kill-out-${b.name}`);
      const restored = await cliJson(['restore', next.id, '--to', cmpDir], env);
      assert.ok((await compareImages(img, restored.files[0].path, 'qcow2', 'qcow2')).identical);
    });

    test('keys: several passphrases, never the last one removed, paper export and import', async () => {
      const { repo, env } = await initRepo(b);
      const add = await cli(['key', 'add', '--kdf', 'weak', '--label', 'second'], { ...env, VMVAULT_NEW_PASSWORD: 'second pass' });
      assert.equal(add.code, 0, add.stderr);
      const keys = await cliJson(['key', 'list'], env);
      assert.equal(keys.length, 2);
      const second = { ...env, VMVAULT_PASSWORD: 'second pass' };
      assert.equal((await cli(['backups'], second)).code, 0);
      const first = keys.find((k: any) => k.current);
      const selfRemove = await cli(['key', 'remove', first.id], env);
      assert.notEqual(selfRemove.code, 0);
      assert.equal((await cli(['key', 'remove', first.id.slice(0, 6)], second)).code, 0);
      assert.match((await cli(['backups'], env)).stderr, /wrong passphrase/);
      const last = await cli(['key', 'remove', (await cliJson(['key', 'list'], second))[0].id], second);
      assert.notEqual(last.code, 0);

      const paper = await cli(['key', 'export', '--paper'], second);
      assert.equal(paper.code, 0);
      assert.match(paper.stdout, /^1: /m);
      const paperFile = join(work, `paper-${b.name}.txt`);
      await (await import('node:fs/promises')).writeFile(paperFile, paper.stdout);
      const imported = await cli(['key', 'import', paperFile, '--kdf', 'weak'], { ...env, VMVAULT_PASSWORD: 'from paper' });
      assert.equal(imported.code, 0, imported.stderr);
      assert.equal((await cli(['backups'], { ...env, VMVAULT_PASSWORD: 'from paper' })).code, 0);
      // A typo in line 2's first character that line 2's own checksum catches (it misses 1 in 1024; the final check catches those).
      const line2 = /^2: (\S+)/m.exec(paper.stdout)![1]!.replace(/-/g, '');
      const wrong = [...'0123456789ABCDEFGHJKMNPQRSTVWXYZ'].find((c) => c !== line2[0] && lineChecksum(2, c + line2.slice(1)) !== lineChecksum(2, line2))!;
      const typo = paper.stdout.replace(/^2: (.)/m, `2: ${wrong}`);
      await (await import('node:fs/promises')).writeFile(paperFile, typo);
      const bad = await cli(['key', 'import', paperFile, '--kdf', 'weak'], { ...env, VMVAULT_PASSWORD: 'typo' });
      assert.notEqual(bad.code, 0);
      assert.match(bad.stderr, /line 2/);
      assert.equal((await objects(repo)).size > 0, true);
    });

    test('listing, show and id prefixes', async () => {
      const { env } = await initRepo(b);
      const img = await makeImage(work, `list-${b.name}`, 'raw', 8 * MiB, patterned(1));
      const a = await backupJson(env, 'alpha', [img], ['--label', 'daily']);
      const c = await backupJson(env, 'beta', [img]);
      const list = await cliJson(['backups'], env);
      assert.deepEqual(list.map((x: any) => x.id).sort(), [a.id, c.id].sort());
      assert.equal(list[0].stats, undefined);
      assert.deepEqual(Object.keys(list[0]).sort(), ['consistency', 'disks', 'host', 'id', 'labels', 'time', 'verification', 'vm']);
      assert.equal(list[0].verification, null, 'never verified');
      assert.deepEqual((await cliJson(['backups', '--vm', 'alpha'], env)).map((x: any) => x.id), [a.id]);
      const shown = await cliJson(['show', a.id.slice(0, 8)], env);
      assert.equal(shown.id, a.id);
      assert.deepEqual(shown.labels, ['daily']);
      assert.equal(shown.consistency, 'offline');
      const missing = await cli(['show', 'ffffffffffff0000'], env);
      assert.notEqual(missing.code, 0);
      assert.match(missing.stderr, /no backup id starts with/);
    });
  });
}

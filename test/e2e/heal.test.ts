/**
 * Verify that heals, end to end through the CLI on both backends: a damaged or missing
 * chunk is quarantined by verify, the next backup that produces it uploads it again,
 * and every backup that uses it restores identical; repair removes only the backups
 * that cannot heal.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { compareImages } from '../../src/disk/qemu.js';
import { chunkName } from '../../src/repo/chunk.js';
import { Repository } from '../../src/repo/repository.js';
import { openStorage } from '../../src/storage/open.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { cli, cliJson, type Env } from '../helpers/cli.js';
import { e2eFile, backupJson, initRepo, objects, PASSWORD } from './harness.js';

const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;
const { all, work } = await e2eFile('vmvault-heal-');

/** Chunk i of an image holds `pattern` (4 MiB, one default-size chunk). */
const chunkOf = (i: number, pattern: number) => ({ offset: i * CHUNK, length: CHUNK, pattern });

async function chunkIds(repoUrl: string, backupId: string): Promise<(string | null)[]> {
  const storage = openStorage(repoUrl);
  try {
    const repo = await Repository.open(storage, PASSWORD);
    return (await repo.loadManifest(backupId)).disks[0]!.chunks;
  } finally {
    await storage.close();
  }
}

async function damage(repoUrl: string, chunk: string, how: 'flip' | 'delete'): Promise<void> {
  const storage = openStorage(repoUrl);
  try {
    if (how === 'delete') return await storage.delete(chunkName(chunk));
    const bytes = Buffer.from(await storage.get(chunkName(chunk)));
    bytes[bytes.length - 20]! ^= 0x40;
    await storage.put(chunkName(chunk), bytes);
  } finally {
    await storage.close();
  }
}

async function restoresIdentical(env: Env, id: string, source: string, name: string): Promise<void> {
  const restored = await cliJson(['restore', id, '--to', join(work, name)], env);
  const disk = restored.files.find((f: { kind: string }) => f.kind === 'disk');
  const cmp = await compareImages(source, disk.path, 'qcow2', 'qcow2');
  assert.ok(cmp.identical, `${name}: ${cmp.output}`);
}

const byId = (list: { id: string }[]) => new Map(list.map((b) => [b.id, b])) as Map<string, any>;

for (const b of all) {
  describe(`healing on the ${b.name} backend`, () => {
    for (const how of ['flip', 'delete'] as const) {
      test(`a ${how === 'flip' ? 'corrupt' : 'missing'} chunk: verify quarantines it, the next backup uploads it again, every backup using it restores identical`, async () => {
        const { repo, env } = await initRepo(b);
        const imgA = await makeImage(work, `a-${how}-${b.name}`, 'qcow2', 16 * MiB, [chunkOf(0, 0x31), chunkOf(1, 0x32)]);
        const imgB = await makeImage(work, `b-${how}-${b.name}`, 'qcow2', 16 * MiB, [chunkOf(0, 0x31), chunkOf(2, 0x33)]);
        const a = await backupJson(env, 'a', [imgA]);
        const bb = await backupJson(env, 'b', [imgB]);
        const shared = (await chunkIds(repo, a.id))[0]!;
        assert.equal((await chunkIds(repo, bb.id))[0], shared, 'both backups use the same chunk');
        await damage(repo, shared, how);

        // A corrupt chunk is found only by reading it; a missing one by the existence check.
        const v = await cli(['verify', ...(how === 'flip' ? ['--read-data'] : []), '--json'], env);
        assert.equal(v.code, 1, v.stderr);
        const report = JSON.parse(v.stdout);
        assert.equal(report.recorded, true);
        assert.deepEqual(report.problems.map((p: { object: string }) => p.object), [chunkName(shared)]);
        assert.deepEqual(report.problems[0].backups, [a.id, bb.id].sort());
        const healthNames = [...(await objects(repo)).keys()].filter((n) => n.startsWith('health/'));
        assert.ok(healthNames.length >= 3, healthNames.join(' '));
        for (const n of healthNames) assert.match(n, /^health\/(chunks\/[0-9a-f]{64}|backups\/[0-9a-f]{64}\/[0-9a-f]{16})$/, 'names carry ids only');

        const listed = byId(await cliJson(['backups'], env));
        for (const id of [a.id, bb.id]) {
          assert.equal(listed.get(id).verification.status, 'damaged');
          assert.deepEqual(listed.get(id).verification.damagedDisks, [id === a.id ? `a-${how}-${b.name}` : `b-${how}-${b.name}`]);
        }
        const rep = await cliJson(['repair'], env);
        assert.deepEqual(rep.backups.map((x: { healable: boolean }) => x.healable), [true, true], 'no backup of a or b since: both may heal');

        const healer = await backupJson(env, 'a', [imgA]);
        assert.equal(healer.stats.chunksNew, 1, 'the quarantined chunk is uploaded again');
        // The other chunk is unchanged since a's backup: taken from it without reading (incremental).
        assert.equal(healer.disks[0].mode, 'incremental');
        assert.equal(healer.stats.chunksUnchanged, 1);
        const after = byId(await cliJson(['backups'], env));
        for (const id of [a.id, bb.id]) assert.equal(after.get(id).verification.status, 'ok', 'healed without verifying again');
        assert.equal(after.get(healer.id).verification, null);
        const shown = await cliJson(['show', bb.id.slice(0, 10)], env);
        assert.equal(shown.verification.status, 'ok');

        await restoresIdentical(env, a.id, imgA, `out-a-${how}-${b.name}`);
        await restoresIdentical(env, bb.id, imgB, `out-b-${how}-${b.name}`);
        const ok = await cli(['verify', '--read-data'], env);
        assert.equal(ok.code, 0, ok.stdout + ok.stderr);
        const states = byId(await cliJson(['backups'], env));
        for (const id of [a.id, bb.id, healer.id]) {
          assert.equal(states.get(id).verification.status, 'ok');
          assert.equal(states.get(id).verification.readData, 'all');
        }
      });
    }

    test('repair says which backups are beyond healing and --remove deletes only those; gc takes their health objects', async () => {
      const { repo, env } = await initRepo(b);
      const imgC = await makeImage(work, `c-${b.name}`, 'qcow2', 8 * MiB, [chunkOf(0, 0x41)]);
      const imgD = await makeImage(work, `d-${b.name}`, 'qcow2', 8 * MiB, [chunkOf(0, 0x51)]);
      const c1 = await backupJson(env, 'c', [imgC]);
      const d1 = await backupJson(env, 'd', [imgD]);
      const lost = (await chunkIds(repo, c1.id))[0]!;
      await damage(repo, lost, 'flip');
      await damage(repo, (await chunkIds(repo, d1.id))[0]!, 'flip');
      assert.equal((await cli(['verify', '--read-data'], env)).code, 1);
      // c's disk changes: its next backup no longer produces the damaged chunk.
      await writePattern(imgC, 'qcow2', 0, CHUNK, 0x42);
      const c2 = await backupJson(env, 'c', [imgC]);
      assert.equal(c2.stats.chunksNew, 1);

      const report = await cliJson(['repair'], env);
      assert.deepEqual(report.backups.map((x: any) => [x.id, x.healable]), [[c1.id, false], [d1.id, true]]);
      assert.match(report.backups[0].reason, /not produced again by the backups of disk \S+ of c taken since/);
      const text = await cli(['repair'], env);
      assert.match(text.stdout, /beyond healing/);
      assert.match(text.stdout, /repair --remove/);
      assert.equal((await cliJson(['backups'], env)).length, 3, 'repair without --remove removes nothing');

      const removed = await cliJson(['repair', '--remove'], env);
      assert.deepEqual(removed.removed, [c1.id]);
      assert.deepEqual((await cliJson(['backups'], env)).map((x: { id: string }) => x.id).sort(), [c2.id, d1.id].sort());
      const health = () => objects(repo).then((o) => [...o.keys()].filter((n) => n.startsWith('health/')));
      assert.ok(!(await health()).some((n) => n.includes(c1.id)), 'the removed backup\'s verification records went with it');
      assert.ok((await health()).includes(`health/chunks/${lost}`));
      await cliJson(['gc'], env);
      assert.ok(!(await health()).includes(`health/chunks/${lost}`), 'gc drops the quarantine entry of a chunk nothing uses');
      assert.equal((await cliJson(['show', d1.id], env)).verification.status, 'damaged', 'd still waits for its next backup');
    });
  });
}

/** Prune then garbage collection, end to end, on both backends. */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeImage, writePattern } from '../helpers/images.js';
import { cli, cliJson } from '../helpers/cli.js';
import { backends, backupJson, initRepo, objects } from './harness.js';

const MiB = 1024 * 1024;
const all = await backends();
after(() => Promise.all(all.map((b) => b.stop())));
const chunkNames = (objs: Map<string, number>) => [...objs.keys()].filter((n) => n.startsWith('chunks/'));

for (const b of all) {
  describe(`prune on the ${b.name} backend`, () => {
    test('prune then gc reclaims the removed backups\' chunks, keeps every chunk of the kept ones, and verify passes', async (t) => {
      const work = await mkdtemp(join(tmpdir(), 'vmvault-prune-'));
      t.after(() => rm(work, { recursive: true, force: true }));
      const { repo, env } = await initRepo(b);
      const policyFile = join(work, 'p.yaml');
      await writeFile(policyFile, 'name: nightly\nschedule: "30 1 * * *"\nselect:\n  vms: [web1]\nretention:\n  keepLast: 2\n  byLabel:\n    pre-update:\n      keepLast: 1\n');
      const img = await makeImage(work, 'web1', 'qcow2', 16 * MiB, [{ offset: 0, length: MiB, pattern: 1 }]);
      const ids: string[] = [];
      for (let i = 0; i < 4; i++) {
        await writePattern(img, 'qcow2', 4 * MiB, MiB, 10 + i); // each backup has one chunk of its own
        ids.push((await backupJson(env, 'web1', [img], ['--policy', 'nightly'])).id);
      }
      const pre = await backupJson(env, 'web1', [img], ['--label', 'pre-update']);
      const other = await backupJson(env, 'db1', [img]);

      const dry = await cliJson(['prune', '--policy', policyFile, '--dry-run'], env);
      assert.deepEqual(dry.filter((d: any) => !d.keep).map((d: any) => d.id).sort(), [ids[0], ids[1]].sort());
      assert.equal((await cliJson(['backups'], env)).length, 6, 'dry run removed nothing');

      const before = await objects(repo);
      const done = await cliJson(['prune', '--policy', policyFile], env);
      assert.equal(done.filter((d: any) => !d.keep).length, 2);
      assert.equal(done.find((d: any) => d.id === pre.id).keep, true);
      const left = (await cliJson(['backups'], env)).map((x: any) => x.id).sort();
      assert.deepEqual(left, [ids[2], ids[3], pre.id, other.id].sort());

      const gc = await cliJson(['gc'], env);
      assert.equal(gc.chunksDeleted, 2, 'the two pruned backups each had one chunk of their own');
      const after1 = await objects(repo);
      assert.equal(chunkNames(after1).length, chunkNames(before).length - 2);
      const v = await cli(['verify', '--read-data'], env);
      assert.equal(v.code, 0, v.stdout + v.stderr);
      const bad = await cli(['prune', '--policy', join(work, 'missing.yaml')], env);
      assert.notEqual(bad.code, 0);
      assert.match(bad.stderr, /missing\.yaml/);
    });
  });
}

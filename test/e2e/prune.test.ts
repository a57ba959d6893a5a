/** Prune then garbage collection, end to end, on both backends. */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeImage, writePattern } from '../helpers/images.js';
import { cli, cliJson } from '../helpers/cli.js';
import { openStorage } from '../../src/storage/open.js';
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

    test('a backup verify found damaged is kept and takes no slot: the older, restorable one stays through prune and gc', async (t) => {
      const work = await mkdtemp(join(tmpdir(), 'vmvault-prune-'));
      t.after(() => rm(work, { recursive: true, force: true }));
      const { repo, env } = await initRepo(b);
      const policyFile = join(work, 'p.yaml');
      await writeFile(policyFile, 'name: p1\nschedule: "30 1 * * *"\nselect:\n  vms: [v1]\nretention:\n  keepLast: 1\n');
      const img = await makeImage(work, 'v1', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 1 }]);
      const good = await backupJson(env, 'v1', [img]);
      const before = new Set(chunkNames(await objects(repo)));
      await writePattern(img, 'qcow2', 4 * MiB, MiB, 2);
      const newest = await backupJson(env, 'v1', [img]);
      const own = chunkNames(await objects(repo)).filter((n) => !before.has(n));
      assert.equal(own.length, 1, 'the newest backup has one chunk of its own');
      const storage = openStorage(repo);
      try { await storage.delete(own[0]!); } finally { await storage.close(); }
      assert.equal((await cli(['verify'], env)).code, 1);

      const plan = await cliJson(['prune', '--policy', policyFile], env);
      assert.deepEqual(plan.map((d: any) => [d.id, d.keep, d.reasons]), [[newest.id, true, ['damaged']], [good.id, true, ['last']]]);
      assert.equal((await cli(['gc'], env)).code, 0);
      const restored = await cliJson(['restore', good.id, '--to', join(work, 'out')], env);
      assert.ok(restored.files.some((f: { kind: string }) => f.kind === 'disk'));
    });

    test('with --config, the other policies of its policiesDir keep the on-demand backups they would keep, and tags resolve through its inventory', async (t) => {
      const work = await mkdtemp(join(tmpdir(), 'vmvault-prune-'));
      t.after(() => rm(work, { recursive: true, force: true }));
      const { env } = await initRepo(b);
      const img = await makeImage(work, 'web1', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 1 }]);
      const policies = join(work, 'policies');
      await mkdir(policies);
      await writeFile(join(policies, 'web.yaml'), 'name: web-weekly\nschedule: "0 0 3 * * 0"\nselect: { tags: [web] }\nretention:\n  keepWeekly: 8\n  byLabel:\n    pre-update: { keepLast: 2 }\n');
      await writeFile(join(policies, 'nightly.yaml'), 'name: nightly\nschedule: "30 1 * * *"\nselect: { vms: [web1] }\nretention:\n  keepLast: 1\n');
      const config = join(work, 'vmvault.yaml');
      await writeFile(config, `host: h1\nstateDir: ${JSON.stringify(join(work, 'state'))}\npoliciesDir: ${JSON.stringify(policies)}\n` +
        `vms:\n  - { name: web1, host: h1, tags: [web], disks: [{ path: ${JSON.stringify(img)}, format: qcow2 }] }\n`);
      const pre: string[] = [];
      for (let i = 0; i < 3; i++) pre.unshift((await backupJson(env, 'web1', [img], ['--label', 'pre-update'])).id);

      const alone = await cli(['prune', '--policy', join(policies, 'nightly.yaml'), '--dry-run', '--json'], env);
      assert.deepEqual(JSON.parse(alone.stdout).map((d: any) => d.keep), [true, false, false]);
      assert.match(alone.stderr, /without a configuration .* prune knows no other policy/);
      const untagged = await cli(['prune', '--policy', join(policies, 'web.yaml'), '--dry-run', '--json'], env);
      assert.deepEqual(JSON.parse(untagged.stdout), [], 'without the inventory, its tags select nothing');
      assert.match(untagged.stderr, /selects VMs by tag \(web\).*leaves the on-demand backups of the VMs it selects by tag alone/);

      const withConfig = await cliJson(['prune', '--policy', join(policies, 'nightly.yaml'), '--config', config], env);
      assert.deepEqual(withConfig.map((d: any) => [d.id, d.keep, d.reasons]), [
        [pre[0], true, ['last']], [pre[1], true, ['kept by policy web-weekly']], [pre[2], false, []],
      ]);
      const tagged = await cliJson(['prune', '--policy', join(policies, 'web.yaml'), '--dry-run'], { ...env, VMVAULT_CONFIG: config });
      assert.deepEqual(tagged.map((d: any) => [d.id, d.keep]), [[pre[0], true], [pre[1], true]]);
      assert.deepEqual((await cliJson(['backups'], env)).map((x: any) => x.id).sort(), [pre[0], pre[1]].sort());
    });
  });
}

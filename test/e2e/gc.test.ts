/** Garbage collection end to end, on both backends. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { execa } from 'execa';
import { openStorage } from '../../src/storage/open.js';
import { makeImage } from '../helpers/images.js';
import { cli, cliJson, spawnCli } from '../helpers/cli.js';
import { waitFor } from '../helpers/procs.js';
import { e2eFile, backupJson, initRepo, objects } from './harness.js';

const MiB = 1024 * 1024;
const { all, work } = await e2eFile('vmvault-gc-');
const chunkNames = (objs: Map<string, number>) => [...objs.keys()].filter((n) => n.startsWith('chunks/'));
const writes = (n: number, base: number) => Array.from({ length: n }, (_, i) => ({ offset: i * MiB, length: MiB, pattern: base + i }));

for (const b of all) {
  describe(`garbage collection on the ${b.name} backend`, () => {
    test('deleting a backup and collecting reclaims its chunks and keeps every chunk of the others', async () => {
      const { repo, env } = await initRepo(b);
      const shared = writes(8, 1); // chunks 0-1 identical in both images
      const imgA = await makeImage(work, `a-${b.name}`, 'qcow2', 32 * MiB, [...shared, ...writes(8, 100).map((w) => ({ ...w, offset: w.offset + 8 * MiB }))]);
      const imgB = await makeImage(work, `b-${b.name}`, 'qcow2', 32 * MiB, [...shared, ...writes(8, 150).map((w) => ({ ...w, offset: w.offset + 8 * MiB }))]);
      const a = await backupJson(env, 'a', [imgA]);
      const bb = await backupJson(env, 'b', [imgB]);
      assert.equal(bb.stats.chunksReused, 2);
      const before1 = chunkNames(await objects(repo));
      assert.equal(before1.length, 6);

      const nothing = await cliJson(['gc'], env);
      assert.equal(nothing.chunksDeleted, 0);

      const storage = openStorage(repo);
      await storage.delete(`backups/${a.id}`); // what prune does
      await storage.close();
      const dry = await cliJson(['gc', '--dry-run'], env);
      assert.equal(dry.chunksDeleted, 2);
      assert.equal(chunkNames(await objects(repo)).length, 6, 'dry run deleted nothing');
      const sizes = await objects(repo);
      const done = await cliJson(['gc'], env);
      assert.equal(done.chunksDeleted, 2);
      const left = await objects(repo);
      assert.equal(chunkNames(left).length, 4);
      const gone = chunkNames(sizes).filter((n) => !left.has(n));
      assert.equal(done.bytesDeleted, gone.reduce((n, name) => n + sizes.get(name)!, 0));
      const v = await cli(['verify', '--read-data'], env);
      assert.equal(v.code, 0, v.stdout + v.stderr);
    });

    test('gc started during a backup deletes nothing that backup uses', async () => {
      const { repo, env } = await initRepo(b);
      const raw = join(work, `gcrun-${b.name}.raw`);
      await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=300', 'status=none']);
      // An orphan chunk from an earlier, crashed run would be garbage: make one.
      const orphanImg = await makeImage(work, `orphan-${b.name}`, 'raw', 4 * MiB, writes(4, 200));
      const orphan = await backupJson(env, 'orphan', [orphanImg]);
      const st = openStorage(repo);
      await st.delete(`backups/${orphan.id}`);
      await st.close();

      const child = spawnCli(['backup', '--vm', 'big', '--disk', raw, '--json'], env);
      try {
        // Three chunks of its own beside the orphan's: the backup holds its lock and is under way.
        await waitFor('the backup to store its first chunks', async () => chunkNames(await objects(repo)).length >= 4, 60_000, undefined, 25);
        // Freeze the backup half-way, so gc certainly starts while it runs, however loaded the machine.
        assert.ok(child.kill('SIGSTOP'));
        let during;
        try {
          during = await cli(['gc'], env);
        } finally {
          child.kill('SIGCONT');
        }
        assert.notEqual(during.code, 0, 'gc refuses while a backup holds its shared lock');
        assert.match(during.stderr, /locked.*backup of big/);
        const done = await child;
        assert.equal(done.exitCode, 0, String(done.stderr));
      } finally {
        // A failure above: the backup ends before its repository is removed.
        if (child.exitCode === null) {
          child.kill('SIGCONT');
          child.kill('SIGKILL');
          await child;
        }
      }
      const after1 = await cliJson(['gc'], env);
      assert.equal(after1.chunksDeleted, 1, 'only the orphan chunk is garbage');
      const v = await cli(['verify', '--read-data'], env);
      assert.equal(v.code, 0, v.stdout + v.stderr);
    });
  });
}

/**
 * Objects far larger than any valid one of their kind (a sparse file of 5 GiB, and one
 * of a few hundred MiB) under backups/, locks/, index/ and keys/, on both backends: each
 * is refused as damaged before it is read (repo/object-limits.ts), with a message naming
 * it, its size and the bound; memory stays far below its size; every other backup still
 * lists, verifies and restores identical; unlock removes the locks; gc deletes no chunk
 * while a manifest cannot be read.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { compareImages } from '../../src/disk/qemu.js';
import { MANIFEST_MAX_BYTES, SMALL_OBJECT_MAX_BYTES } from '../../src/repo/object-limits.js';
import { INDEX_OBJECT_MAX_BYTES } from '../../src/repo/chunk-index.js';
import { makeImage } from '../helpers/images.js';
import { BIN, cli, type CliResult, type Env } from '../helpers/cli.js';
import { e2eFile, backupJson, initRepo, objects } from './harness.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const HUGE = 5 * GiB;
/** What a command may use at its peak: a fraction of the smallest object planted. */
const RSS_LIMIT = 200 * MiB;
const { all, work } = await e2eFile('vmvault-oversized-');
const hex = (bytes: number) => randomBytes(bytes).toString('hex');

/** Runs vmvault under /usr/bin/time: its result and its peak resident memory in bytes. */
async function measured(args: string[], env: Env): Promise<CliResult & { maxRss: number }> {
  const out = join(work, `time-${hex(4)}`);
  const r = await execa('/usr/bin/time', ['-f', '%M', '-o', out, process.execPath, BIN, ...args], { reject: false, env: { ...env }, stdin: 'ignore' });
  const kib = Number((await readFile(out, 'utf8')).trim().split('\n').at(-1));
  return { code: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr), maxRss: kib * 1024 };
}

function bounded(r: { maxRss: number; stderr: string }, what: string): void {
  assert.ok(r.maxRss < RSS_LIMIT, `${what} peaked at ${Math.round(r.maxRss / MiB)} MiB resident (${r.stderr})`);
}

for (const b of all) {
  describe(`objects far too large on the ${b.name} backend`, () => {
    test('are refused unread as damaged, with size, bound and advice; other backups list, verify and restore; unlock removes the locks; gc keeps every chunk', async () => {
      const { repo, env } = await initRepo(b);
      const img = await makeImage(work, `big-${b.name}.qcow2`, 'qcow2', 8 * MiB, [{ offset: 0, length: 3 * MiB, pattern: 0x3c }]);
      const made = await backupJson(env, 'big', [img]);
      const planted = {
        manifests: [hex(32), hex(32)],
        locks: [hex(16), hex(16)],
        index: [hex(32), hex(32)],
        keys: [hex(8), hex(8)],
      };
      await b.plantSparse(repo, `backups/${planted.manifests[0]}`, HUGE);
      await b.plantSparse(repo, `backups/${planted.manifests[1]}`, 600 * MiB);
      await b.plantSparse(repo, `locks/${planted.locks[0]}`, HUGE);
      await b.plantSparse(repo, `locks/${planted.locks[1]}`, 300 * MiB);
      await b.plantSparse(repo, `index/${planted.index[0]}`, HUGE);
      await b.plantSparse(repo, `index/${planted.index[1]}`, 300 * MiB);
      await b.plantSparse(repo, `keys/${planted.keys[0]}`, HUGE);
      await b.plantSparse(repo, `keys/${planted.keys[1]}`, 300 * MiB);
      const chunks = () => objects(repo).then((o) => [...o.keys()].filter((n) => n.startsWith('chunks/')).sort());
      const before = await chunks();

      const listed = await measured(['backups', '--json'], env);
      assert.equal(listed.code, 0, listed.stderr);
      bounded(listed, 'backups');
      const rows = JSON.parse(listed.stdout) as Array<{ id: string; damaged?: string }>;
      assert.deepEqual(rows.filter((r) => !r.damaged).map((r) => r.id), [made.id]);
      for (const [id, size] of [[planted.manifests[0], HUGE], [planted.manifests[1], 600 * MiB]] as const) {
        const row = rows.find((r) => r.id === id);
        assert.ok(row?.damaged, `backup ${id} is listed as damaged`);
        assert.match(row.damaged, new RegExp(`backup manifest backups/${id} is damaged: object "backups/${id}" in .* is ${size} bytes, more than the ${MANIFEST_MAX_BYTES} any valid one can be.*vmvault repair --remove`));
      }
      for (const [id, size] of [[planted.keys[0], HUGE], [planted.keys[1], 300 * MiB]] as const) {
        assert.match(listed.stderr, new RegExp(`key file keys/${id} is damaged \\(object "keys/${id}" .* is ${size} bytes, more than the ${SMALL_OBJECT_MAX_BYTES} .*\\) and was skipped; remove it with "vmvault key remove ${id}"`));
      }

      const verified = await measured(['verify', '--json'], env);
      bounded(verified, 'verify');
      assert.equal(verified.code, 1, verified.stderr);
      const report = JSON.parse(verified.stdout) as { backupsChecked: number; problems: Array<{ object: string; problem: string }>; backups: Array<{ id: string; ok: boolean }> };
      assert.deepEqual(report.backups.map((x) => [x.id, x.ok]), [[made.id, true]]);
      assert.deepEqual(report.problems.map((p) => p.object).sort(), planted.manifests.map((id) => `backups/${id}`).sort());
      assert.match(verified.stderr, /warning: lock locks\/\w+, locks\/\w+ cannot be read .*"vmvault unlock".*verify goes on/);

      const dir = join(work, `out-${b.name}`);
      const restored = await measured(['restore', made.id, '--to', dir, '--json'], env);
      assert.equal(restored.code, 0, restored.stderr);
      const cmp = await compareImages(img, JSON.parse(restored.stdout).files[0].path, 'qcow2', 'qcow2');
      assert.ok(cmp.identical, cmp.output);

      const again = await measured(['backup', '--vm', 'big', '--disk', img, '--json'], env);
      assert.equal(again.code, 0, again.stderr);
      bounded(again, 'backup');
      for (const [id, size] of [[planted.index[0], HUGE], [planted.index[1], 300 * MiB]] as const) {
        assert.match(again.stderr, new RegExp(`object "index/${id}" .* is ${size} bytes, more than the ${INDEX_OBJECT_MAX_BYTES} .*its chunks will be uploaded again when met; "vmvault gc" rewrites the index`));
      }

      const refused = await measured(['gc'], env);
      assert.equal(refused.code, 1);
      bounded(refused, 'gc');
      assert.match(refused.stderr, /garbage collection needs the exclusive lock, and lock .* cannot be read .*remove them with "vmvault unlock"/);
      const unlocked = await measured(['unlock'], env);
      assert.equal(unlocked.code, 0, unlocked.stderr);
      bounded(unlocked, 'unlock');
      for (const [id, size] of [[planted.locks[0], HUGE], [planted.locks[1], 300 * MiB]] as const) {
        assert.match(unlocked.stdout, new RegExp(`removed locks/${id}: it cannot be read: object "locks/${id}" .* is ${size} bytes, more than the ${SMALL_OBJECT_MAX_BYTES} `));
      }

      const gc = await measured(['gc', '--json'], env);
      bounded(gc, 'gc');
      assert.equal(gc.code, 1, 'a manifest it cannot read makes gc fail, deleting nothing');
      assert.equal(JSON.parse(gc.stdout).chunksDeleted, 0);
      assert.match(gc.stderr, /garbage collection deleted no chunk: 2 backup manifest\(s\) cannot be read/);
      const after = await chunks();
      assert.deepEqual(before.filter((n) => !after.includes(n)), [], 'no chunk of before is gone');

      const final = await cli(['restore', made.id, '--to', join(work, `out2-${b.name}`), '--json'], env);
      assert.equal(final.code, 0, final.stderr);
      const cmp2 = await compareImages(img, JSON.parse(final.stdout).files[0].path, 'qcow2', 'qcow2');
      assert.ok(cmp2.identical, cmp2.output);
    });
  });
}

describe('many large manifests and verification records at once', () => {
  test('are read within a byte budget, not sixteen at a time, and so are verification records: memory stays near one of them', async () => {
    const b = all.find((x) => x.name === 'local')!;
    const { repo, env } = await initRepo(b);
    const img = await makeImage(work, 'budget.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x3d }]);
    const made = await backupJson(env, 'budget', [img]);
    // Under the size bound each, so each is read (and found damaged); six at once would be 2.4 GiB of reads and decryption.
    const planted = Array.from({ length: 6 }, () => hex(32));
    for (const id of planted) await b.plantSparse(repo, `backups/${id}`, 200 * MiB);
    // And six verification records of the real backup, read (with every backup's records) to list its state.
    for (let i = 0; i < 6; i++) await b.plantSparse(repo, `health/backups/${made.id}/${hex(8)}`, 200 * MiB);
    const listed = await measured(['backups', '--json'], env);
    assert.equal(listed.code, 0, listed.stderr);
    assert.ok(listed.maxRss < 900 * MiB, `backups peaked at ${Math.round(listed.maxRss / MiB)} MiB resident reading six 200 MiB manifests and six 200 MiB records`);
    const rows = JSON.parse(listed.stdout) as Array<{ id: string; damaged?: string }>;
    assert.deepEqual(rows.filter((r) => !r.damaged).map((r) => r.id), [made.id]);
    assert.equal(rows.filter((r) => r.damaged).length, 6);
  });
});


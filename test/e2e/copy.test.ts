/**
 * `vmvault copy`: backups of a directory repository copied to an S3 one (another key,
 * so other chunk ids), through the real CLI, restored from the copy and compared with
 * the images as they were backed up; the second copy of a VM reads only what changed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { makeImage, writePattern } from '../helpers/images.js';
import { cli, cliJson } from '../helpers/cli.js';
import { e2eFile, backupJson, initRepo, objects, PASSWORD } from './harness.js';

const MiB = 1024 * 1024;
const { all, work } = await e2eFile('vmvault-copy-');
const local = all.find((b) => b.name === 'local')!;
const s3 = all.find((b) => b.name === 's3')!;

interface Copied { id: string; vm: string; chunksRead: number; chunksUploaded: number; chunksKnown: number; bytesUploaded: number; replaced?: true }
interface Result { copied: Copied[]; skipped: Array<{ id: string; skipped: string; failed: boolean }> }

/** Six chunks of data (4 MiB chunks), each its own pattern, and two of zeros. */
const six = (base: number) => Array.from({ length: 6 }, (_, i) => ({ offset: i * 4 * MiB, length: MiB, pattern: base + i }));

test('copy to S3: restores identical from the copy, the second copy of a VM reads and uploads only the chunk that changed, a copy made or pruned there is not made again', async () => {
  const src = await initRepo(local);
  const dst = await initRepo(s3);
  const env = { ...dst.env, VMVAULT_FROM_PASSWORD: PASSWORD };
  const web = await makeImage(work, 'web.qcow2', 'qcow2', 32 * MiB, six(0x10));
  const b1 = await backupJson(src.env, 'web', [web]);
  await copyFile(web, join(work, 'web-1.qcow2'));
  await writePattern(web, 'qcow2', 4 * MiB + MiB, MiB, 0x77);
  const b2 = await backupJson(src.env, 'web', [web]);
  await copyFile(web, join(work, 'web-2.qcow2'));
  const db = await makeImage(work, 'db.qcow2', 'qcow2', 16 * MiB, [{ offset: 0, length: MiB, pattern: 0x51 }, { offset: 8 * MiB, length: MiB, pattern: 0x52 }]);
  const b3 = await backupJson(src.env, 'db', [db]);

  // One backup by its id's prefix: every chunk read and uploaded.
  const first = await cliJson<Result>(['copy', '--from-repo', src.repo, b1.id.slice(0, 12)], env);
  assert.deepEqual(first.copied.map((c) => [c.id, c.vm, c.chunksRead, c.chunksUploaded, c.chunksKnown]), [[b1.id, 'web', 6, 6, 0]]);
  // The VM's next backup: only the changed chunk is read; the five others are known from the first copy.
  const second = await cliJson<Result>(['copy', '--from-repo', src.repo, '--vm', 'web'], env);
  assert.deepEqual(second.copied.map((c) => [c.id, c.chunksRead, c.chunksUploaded, c.chunksKnown]), [[b2.id, 1, 1, 5]]);
  assert.deepEqual(second.skipped.map((s) => [s.id, s.skipped, s.failed]), [[b1.id, 'the destination has it', false]]);
  const stored = [...(await objects(dst.repo)).keys()].filter((n) => n.startsWith('chunks/'));
  assert.equal(stored.length, 7, 'each distinct chunk uploaded once');
  // Everything else: the other VM's backup; a text run says what it does.
  const rest = await cli(['copy', '--from-repo', src.repo], env);
  assert.equal(rest.code, 0, rest.stderr);
  assert.match(rest.stdout, new RegExp(`copied ${b3.id.slice(0, 12)} of db .*: read 2 chunk\\(s\\), uploaded 2 `));
  assert.match(rest.stdout, /copied 1 backup\(s\); 0 could not be copied; skipped 2 /);

  // The destination's retention prunes web's first copy: the next run does not bring it back;
  // named by id, it comes back, reading only the chunk its nearest copied backup lacks.
  const policy = join(work, 'keep1.yaml');
  await writeFile(policy, 'name: keep1\nschedule: "0 2 * * *"\nselect:\n  vms: [web]\nretention:\n  keepLast: 1\n');
  assert.equal((await cli(['prune', '--policy', policy], dst.env)).code, 0);
  const after = await cliJson<Result>(['copy', '--from-repo', src.repo], env);
  assert.deepEqual(after.copied, []);
  assert.match(after.skipped.find((x) => x.id === b1.id)?.skipped ?? '', /the destination has a newer backup of this VM/);
  const back = await cliJson<Result>(['copy', '--from-repo', src.repo, b1.id], env);
  assert.deepEqual(back.copied.map((c) => [c.id, c.chunksRead, c.chunksUploaded, c.chunksKnown]), [[b1.id, 1, 0, 5]]);

  // The copies keep their ids, VMs and times, and restore identical from the destination alone.
  const listed = await cliJson<Array<{ id: string; vm: string; time: string }>>(['backups'], dst.env);
  const original = await cliJson<Array<{ id: string; vm: string; time: string }>>(['backups'], src.env);
  const brief = (l: Array<{ id: string; vm: string; time: string }>) => l.map((b) => `${b.id} ${b.vm} ${b.time}`).sort();
  assert.deepEqual(brief(listed), brief(original));
  for (const [b, image] of [[b1, join(work, 'web-1.qcow2')], [b2, join(work, 'web-2.qcow2')], [b3, db]] as const) {
    const to = join(work, `restored-${b.id.slice(0, 8)}`);
    await mkdir(to);
    const r = await cliJson<{ files: Array<{ kind: string; path: string }> }>(['restore', b.id, '--to', to, '--format', 'qcow2'], dst.env);
    const disks = r.files.filter((f) => f.kind === 'disk');
    assert.equal(disks.length, 1);
    await execa('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', image, disks[0]!.path]);
  }
  const verified = await cli(['verify', '--read-data'], dst.env);
  assert.equal(verified.code, 0, verified.stdout + verified.stderr);
  // A copy carries no dirty bitmap of the source's chain: the first backup made into the destination reads in full.
  const direct = await backupJson(dst.env, 'web', [web]);
  assert.equal(direct.disks[0].mode, 'full');
});

test('copy refuses what it cannot do; a damaged source chunk fails only that backup (named, nothing of it committed) and the run goes on', async () => {
  const src = await initRepo(local);
  const dst = await initRepo(local);
  const env = { ...dst.env, VMVAULT_FROM_PASSWORD: PASSWORD };
  const img = await makeImage(work, 'bad.qcow2', 'qcow2', 32 * MiB, six(0x30));
  const good = await backupJson(src.env, 'ok', [await makeImage(work, 'ok.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x61 }])]);
  const chunksOf = async () => [...(await objects(src.repo)).keys()].filter((n) => n.startsWith('chunks/'));
  const before = new Set(await chunksOf());
  const bad = await backupJson(src.env, 'bad', [img]);
  const badChunks = (await chunksOf()).filter((n) => !before.has(n));
  assert.equal(badChunks.length, 6);

  const wrong = await cli(['copy', '--from-repo', src.repo], { ...env, VMVAULT_FROM_PASSWORD: 'not the passphrase' });
  assert.equal(wrong.code, 1);
  assert.match(wrong.stderr, new RegExp(`wrong passphrase: it opens none of the 1 readable key\\(s\\) of the repository at ${src.repo}`));
  const itself = await cli(['copy', '--from-repo', dst.repo], { ...env, VMVAULT_FROM_PASSWORD: PASSWORD });
  assert.match(itself.stderr, /the source and the destination are the same repository/);
  const small = await initRepo(local, ['--chunk-size', '1M']);
  const sizes = await cli(['copy', '--from-repo', src.repo], { ...small.env, VMVAULT_FROM_PASSWORD: PASSWORD });
  assert.equal(sizes.code, 1);
  assert.match(sizes.stderr, /the source repository's chunks are 4194304 bytes and the destination's 1048576: .*nothing was copied/);
  const unknown = await cli(['copy', '--from-repo', src.repo, '--vm', 'nosuch'], env);
  assert.match(unknown.stderr, /the source repository has no backup of "nosuch"; nothing was copied/);

  // One of the bad backup's chunks, altered in the source.
  const chunk = badChunks[3]!.split('/').pop()!;
  const file = join(src.repo, badChunks[3]!);
  const bytes = await readFile(file);
  bytes[bytes.length - 1]! ^= 0x40;
  await writeFile(file, bytes);
  // The whole run: the bad backup is not copied, named with its chunk; the good one is.
  const failed = await cli(['copy', '--from-repo', src.repo], env);
  assert.equal(failed.code, 1, failed.stdout);
  assert.match(failed.stderr, new RegExp(`not copied: ${bad.id.slice(0, 12)} of bad .*: backup ${bad.id.slice(0, 12)} of bad cannot be copied: chunk chunks/${chunk.slice(0, 2)}/${chunk} .*nothing of it was committed`));
  assert.match(failed.stdout, new RegExp(`copied ${good.id.slice(0, 12)} of ok `));
  assert.match(failed.stdout, /copied 1 backup\(s\); 1 could not be copied; skipped 0 /);
  assert.deepEqual((await cliJson<Array<{ id: string }>>(['backups'], dst.env)).map((b) => b.id), [good.id], 'nothing of the bad one was committed');
  // Its manifest damaged in the destination: a copy naming it puts a good one back.
  const manifest = join(dst.repo, 'backups', good.id);
  const sealed = await readFile(manifest);
  sealed[sealed.length - 5]! ^= 0x01;
  await writeFile(manifest, sealed);
  const shown = await cliJson<Array<{ id: string; damaged?: string }>>(['backups'], dst.env);
  assert.deepEqual(shown.map((b) => [b.id, !!b.damaged]), [[good.id, true]], 'the copy is listed as damaged');
  // A run over every backup takes the listing's word; one naming the backup reads it there too.
  assert.deepEqual((await cliJson<Result>(['copy', '--from-repo', src.repo, '--vm', 'ok'], env)).copied, []);
  const healed = await cliJson<Result>(['copy', '--from-repo', src.repo, good.id], env);
  assert.deepEqual(healed.copied.map((c) => [c.id, c.chunksRead, c.chunksUploaded, c.replaced]), [[good.id, 1, 0, true]]);
  assert.deepEqual((await cliJson<Array<{ id: string; damaged?: string }>>(['backups'], dst.env)).map((b) => [b.id, !!b.damaged]), [[good.id, false]]);
  const to = join(work, 'healed');
  await mkdir(to);
  await cliJson(['restore', good.id, '--to', to], dst.env);
  // --no-lock reads the source without a lock; the destination, which is written, still takes its own.
  const unlocked = await cli(['--no-lock', 'copy', '--from-repo', src.repo, good.id], env);
  assert.equal(unlocked.code, 0, unlocked.stderr);
  assert.match(unlocked.stdout, /copied 0 backup\(s\); 0 could not be copied; skipped 1 /);
});

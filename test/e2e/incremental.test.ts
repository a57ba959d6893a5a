/**
 * Changed-block incrementals of offline images, through the real CLI with real qemu
 * tools on the directory backend: persistent dirty bitmaps for qcow2, file identity
 * for raw, and a full read with a reason whenever tracking cannot be trusted. Every
 * backup is restored and compared with the image as it was.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execa } from 'execa';
import { copyFile, rm, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { compareImages, imageInfo } from '../../src/disk/qemu.js';
import { cli, cliJson } from '../helpers/cli.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { backupJson, e2eFile, initRepo, objects } from './harness.js';

const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;
const { all, work } = await e2eFile('vmvault-incr-');
const local = all.find((b) => b.name === 'local')!;
type Env = Record<string, string | undefined>;

/** 40 MiB of distinct 1 MiB patterns in a 64 MiB image. */
const BASE = Array.from({ length: 40 }, (_, i) => ({ offset: i * MiB, length: MiB, pattern: 1 + i }));

let n = 0;
/** Backs `img` up (qcow2 unless told), restores it, and checks the restore equals a copy taken at the instant. */
async function backupAndCheck(env: Env, img: string, format: 'qcow2' | 'raw' = 'qcow2', more: string[] = []): Promise<any> {
  const at = join(work, `instant-${++n}.${format}`);
  await copyFile(img, at);
  const made = await backupJson(env, 'vm', [`root=${img}`], ['--format', format, ...more]);
  const out = await cliJson(['restore', made.id, '--to', join(work, `restored-${n}`), '--format', format], env);
  const disk = out.files.find((f: any) => f.kind === 'disk').path;
  const cmp = await compareImages(at, disk, format, format);
  assert.ok(cmp.identical, `backup ${n}: ${cmp.output}`);
  await rm(at);
  return { ...made, disk: made.disks[0] };
}

async function bitmaps(img: string): Promise<string[]> {
  return (await imageInfo(img, 'qcow2')).bitmaps.map((b) => b.name);
}

describe('incremental backups of offline images', () => {
  test('qcow2: 1 MiB written into each of 5 regions is read as at most 5 chunks; failures and leftovers never lose tracking', async () => {
    const { env, id: repoId } = await initRepo(local);
    const ours = (backupId: string) => `vmvault-${repoId.slice(0, 8)}-${backupId}`;
    const img = await makeImage(work, 'inc.qcow2', 'qcow2', 64 * MiB, BASE);
    const first = await backupAndCheck(env, img);
    assert.equal(first.disk.mode, 'full');
    assert.match(first.disk.reason, /no earlier backup/);
    assert.deepEqual(await bitmaps(img), [ours(first.id)]);

    for (const region of [1, 3, 6, 9, 12]) await writePattern(img, 'qcow2', region * CHUNK + 1024 * 1024, MiB, 0xc0 + region);
    const second = await backupAndCheck(env, img);
    assert.equal(second.disk.mode, 'incremental', second.disk.reason);
    assert.ok(second.stats.bytesRead <= 5 * CHUNK, `read ${second.stats.bytesRead} bytes`);
    assert.equal(second.stats.chunksNew, 5);
    assert.ok(second.stats.chunksUnchanged >= 5, JSON.stringify(second.stats));
    assert.deepEqual(await bitmaps(img), [ours(second.id)], 'the old bitmap goes once the new backup is saved');

    // A backup that fails after its point in time: the old bitmap stays, the new one goes.
    await writePattern(img, 'qcow2', 20 * MiB, MiB, 0x77);
    const failed = await cli(['backup', '--vm', 'vm', '--disk', `root=${img}`, '--format', 'qcow2', '--config', join(work, 'no-such-config')], env);
    assert.notEqual(failed.code, 0);
    assert.deepEqual(await bitmaps(img), [ours(second.id)]);
    // What a killed run leaves: a snapshot and a bitmap of its own (here named as before
    // bitmaps carried their repository, which is taken as its own); and the bitmap of
    // another repository backing up the same disk, which is not this backup's to remove.
    await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', img, `vmvault-${'e'.repeat(64)}`]);
    await execa('qemu-img', ['bitmap', '--add', '-f', 'qcow2', img, `vmvault-0000beef-${'d'.repeat(64)}`]);
    await execa('qemu-img', ['snapshot', '-c', 'vmvault-0123456789abcdef', img]);
    const third = await backupAndCheck(env, img);
    assert.equal(third.disk.mode, 'incremental', third.disk.reason);
    assert.ok(third.stats.bytesRead <= CHUNK, `read ${third.stats.bytesRead} bytes`);
    assert.deepEqual((await bitmaps(img)).sort(), [`vmvault-0000beef-${'d'.repeat(64)}`, ours(third.id)].sort(), 'leftover bitmaps are removed; another repository\'s stays');
    assert.deepEqual((await imageInfo(img, 'qcow2')).snapshots, [], 'leftover snapshots are removed');

    const shown = await cli(['show', third.id], env);
    assert.match(shown.stdout, /read incrementally: changes since backup/);
    const forced = await backupAndCheck(env, img, 'qcow2', ['--full-read']);
    assert.equal(forced.disk.mode, 'full');
    assert.match(forced.disk.reason, /full read was asked/);
  });

  test('qcow2: a bitmap left in use by a killed writer, or a resize, means one full read; the next is incremental again', async () => {
    const { env } = await initRepo(local);
    const img = await makeImage(work, 'crash.qcow2', 'qcow2', 64 * MiB, BASE);
    await backupAndCheck(env, img);
    // A qemu program that writes and is then killed leaves the bitmap marked in-use.
    // Its output line-buffered (stdbuf): killed once it says it has written (the image open, its bitmap marked in use), however slow its start.
    const writer = execa('stdbuf', ['-oL', 'qemu-io', '-f', 'qcow2', '-c', `write -P 0x99 ${8 * MiB} ${MiB}`, '-c', 'sleep 60000', img], { reject: false });
    let said = '';
    await new Promise<void>((resolve) => {
      writer.stdout!.on('data', (b: Buffer) => { said += String(b); if (/wrote 1048576\/1048576 bytes/.test(said)) resolve(); });
      void writer.finally(() => resolve());
    });
    writer.kill('SIGKILL');
    await writer;
    const info = await imageInfo(img, 'qcow2');
    assert.ok(info.bitmaps[0]!.flags.includes('in-use'), JSON.stringify(info.bitmaps));
    const afterCrash = await backupAndCheck(env, img);
    assert.equal(afterCrash.disk.mode, 'full');
    assert.match(afterCrash.disk.reason, /inconsistent/);
    await writePattern(img, 'qcow2', 30 * MiB, MiB, 0x31);
    const next = await backupAndCheck(env, img);
    assert.equal(next.disk.mode, 'incremental', next.disk.reason);

    await execa('qemu-img', ['resize', '-f', 'qcow2', img, `${72 * MiB}`]);
    const resized = await backupAndCheck(env, img);
    assert.equal(resized.disk.mode, 'full');
    assert.match(resized.disk.reason, /resized/);
  });

  test('in one VM, a resized disk and a newly added disk are read in full while the others stay incremental', async () => {
    const { env } = await initRepo(local);
    const [a, b, c] = await Promise.all(['multi-a', 'multi-b', 'multi-c'].map((name) => makeImage(work, `${name}.qcow2`, 'qcow2', 64 * MiB, BASE))) as [string, string, string];
    const disks = (list: string[]) => list.flatMap((d) => ['--disk', d, '--format', 'qcow2']);
    const run = async (list: string[]) => {
      const instants = await Promise.all(list.map(async (d) => {
        const at = join(work, `multi-instant-${++n}-${d.split('=')[0]}.qcow2`);
        await copyFile(d.split('=')[1]!, at);
        return at;
      }));
      const made = await cliJson(['backup', '--vm', 'multi', ...disks(list)], env);
      const out = await cliJson(['restore', made.id, '--to', join(work, `multi-restored-${n}`), '--format', 'qcow2'], env);
      for (const [i, d] of list.entries()) {
        const name = d.split('=')[0]!;
        const file = out.files.find((f: any) => f.kind === 'disk' && f.name === name).path;
        assert.ok((await compareImages(instants[i]!, file, 'qcow2', 'qcow2')).identical, `disk ${name} of backup ${n}`);
      }
      return (name: string) => made.disks.find((d: any) => d.name === name);
    };
    await run([`a=${a}`, `b=${b}`]);
    for (const img of [a, b]) await writePattern(img, 'qcow2', 44 * MiB, MiB, 0x5a);
    await execa('qemu-img', ['resize', '-f', 'qcow2', b, `${80 * MiB}`]);
    const second = await run([`a=${a}`, `b=${b}`, `c=${c}`]);
    assert.equal(second('a').mode, 'incremental', second('a').reason);
    assert.equal(second('b').mode, 'full');
    assert.match(second('b').reason, /resized \(67108864 bytes at backup [0-9a-f]{12}, 83886080 now\)/);
    assert.equal(second('c').mode, 'full');
    assert.match(second('c').reason, /no earlier backup of this disk/);
    for (const img of [a, b, c]) await writePattern(img, 'qcow2', 50 * MiB, MiB, 0x5b);
    const third = await run([`a=${a}`, `b=${b}`, `c=${c}`]);
    for (const name of ['a', 'b', 'c']) assert.equal(third(name).mode, 'incremental', `${name}: ${third(name).reason}`);
  });

  test('an audit finds the writes a bitmap missed, and its own backup is right', async () => {
    const { env, id: repoId } = await initRepo(local);
    const img = await makeImage(work, 'audit.qcow2', 'qcow2', 64 * MiB, BASE);
    const first = await backupAndCheck(env, img);
    const clean = await backupAndCheck(env, img, 'qcow2', ['--audit']);
    assert.equal(clean.disk.mode, 'full');
    assert.match(clean.disk.reason, /audit \(an audit was asked for\)/);
    assert.deepEqual(clean.disk.audit, { unchanged: 16, differing: 0, offsets: [] }, 'tracking agrees with a full read');
    // Tracking made wrong on purpose: data changes, then the bitmap that should count it is cleared.
    await writePattern(img, 'qcow2', 5 * CHUNK, MiB, 0xab);
    await writePattern(img, 'qcow2', 9 * CHUNK, MiB, 0xac);
    await execa('qemu-img', ['bitmap', '--clear', '-f', 'qcow2', img, `vmvault-${repoId.slice(0, 8)}-${clean.id}`]);
    const at = join(work, 'audit-instant.qcow2');
    await copyFile(img, at);
    const r = await cli(['backup', '--vm', 'vm', '--disk', `root=${img}`, '--format', 'qcow2', '--audit', '--json'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /AUDIT: change tracking missed writes on disk "root" of VM "vm": 2 of the 16 chunk\(s\)/);
    const audited = JSON.parse(r.stdout);
    assert.deepEqual(audited.disks[0].audit, { unchanged: 16, differing: 2, offsets: [5 * CHUNK, 9 * CHUNK] });
    const out = await cliJson(['restore', audited.id, '--to', join(work, 'audit-out'), '--format', 'qcow2'], env);
    const disk = out.files.find((f: any) => f.kind === 'disk').path;
    assert.ok((await compareImages(at, disk, 'qcow2', 'qcow2')).identical, 'the audited backup holds the writes tracking missed');
    assert.match((await cli(['show', audited.id], env)).stdout, /CHANGE TRACKING MISSED 2 of 16 chunk/);
    assert.ok(first.id);
  });

  test('a chunk the previous backup used but storage lost is read and uploaded again before the incremental commits, with no verify in between', async () => {
    const { repo, env } = await initRepo(local);
    const img = await makeImage(work, 'lost.qcow2', 'qcow2', 64 * MiB, BASE);
    await backupAndCheck(env, img);
    const chunks = [...(await objects(repo)).keys()].filter((k) => k.startsWith('chunks/'));
    // Lost behind vmvault's back: the chunk index still lists it, and change tracking calls its data unchanged.
    await rm(join(repo, chunks[0]!));
    await writePattern(img, 'qcow2', 50 * MiB, MiB, 0x50);
    const healed = await backupAndCheck(env, img);
    assert.equal(healed.disk.mode, 'incremental');
    assert.equal(healed.stats.chunksNew, 2, 'the changed chunk and the lost one');
    // The lost chunk is back under its id, so the first backup is whole again too.
    const v = await cliJson(['verify', '--read-data'], env);
    assert.equal(v.ok, true, JSON.stringify(v.problems));
  });

  test('raw: an untouched image is not read at all; a touched one is read in full', async () => {
    const { env } = await initRepo(local);
    const img = await makeImage(work, 'plain.raw', 'raw', 32 * MiB, BASE.slice(0, 20));
    const first = await backupAndCheck(env, img, 'raw');
    assert.equal(first.disk.mode, 'full');
    const again = await backupAndCheck(env, img, 'raw');
    assert.equal(again.disk.mode, 'incremental', again.disk.reason);
    assert.equal(again.stats.bytesRead, 0);
    assert.equal(again.stats.chunksUnchanged, 5);
    await writePattern(img, 'raw', 2 * MiB, 4096, 0xee);
    const changed = await backupAndCheck(env, img, 'raw');
    assert.equal(changed.disk.mode, 'full');
    assert.match(changed.disk.reason, /changed since/);
    // Times put back by hand do not fool it: ctime moves whatever utimes says.
    const before = await backupAndCheck(env, img, 'raw');
    assert.equal(before.disk.mode, 'incremental');
    await writePattern(img, 'raw', 3 * MiB, 4096, 0xef);
    await utimes(img, new Date(0), new Date(0));
    const sneaky = await backupAndCheck(env, img, 'raw');
    assert.equal(sneaky.disk.mode, 'full');
  });
});

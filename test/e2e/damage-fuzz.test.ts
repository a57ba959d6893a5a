/**
 * A seeded damage fuzzer for a repository, on both backends: a repository can be partly
 * damaged on the day it is needed. One small repository (two VMs, a full and an incremental
 * backup each, a verify's health records and a quarantine entry) is built once; each
 * iteration copies it, applies 1–3 random damages to random objects, and runs what an
 * operator would: list, restore every backup (raw and qcow2), verify, verify
 * --read-data, a new backup, gc, and every restore again. Invariants:
 *
 * - I1 every command ends, exit 0 or 1, with a clear message (no stack trace, no
 *   "undefined", no signal death) that names an object or what to do;
 * - I2 a restore that exits 0 is identical to its source; one that fails leaves no file;
 * - I3 a backup that restored identical before gc restores identical after it;
 * - I4 a backup made after the damage restores identical, unless config or keys are
 *   damaged (then it refuses);
 * - I5 nothing hangs on a FIFO, and damaged chunks (planted symlinks to host files
 *   included) fail verify --read-data.
 *
 * On S3 the damage is what a bucket can suffer (objects overwritten, cut, emptied,
 * swapped, replaced by another repository's or deleted); on a directory also what a file
 * system can hold at an object's name (a directory, a FIFO, symlinks, a stray temporary).
 *
 * VMVAULT_FUZZ_ITERATIONS and VMVAULT_FUZZ_SEED run it longer or elsewhere by hand
 * (VMVAULT_FUZZ_S3_ITERATIONS for S3); VMVAULT_FUZZ_ONLY=I runs iteration I alone, to
 * replay one that failed.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { cp, copyFile, lstat, mkdir, mkdtemp, readdir, readFile, rm, symlink, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { execa } from 'execa';
import { compareImages, type ImageFormat } from '../../src/disk/qemu.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { BIN, type Env } from '../helpers/cli.js';
import { backends, envFor, initRepo, type Backend } from './harness.js';
import { openStorage } from '../../src/storage/open.js';
import { prng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const ITERATIONS = Number(process.env.VMVAULT_FUZZ_ITERATIONS ?? 6);
const S3_ITERATIONS = Number(process.env.VMVAULT_FUZZ_S3_ITERATIONS ?? 4);
const SEED = Number(process.env.VMVAULT_FUZZ_SEED ?? 20261202);
const ONLY = process.env.VMVAULT_FUZZ_ONLY === undefined ? undefined : Number(process.env.VMVAULT_FUZZ_ONLY);
const COMMAND_TIMEOUT_MS = 60_000;
const workRoot = await mkdtemp(join(tmpdir(), 'vmvault-dmgfuzz-'));
const [local, s3] = await backends();
after(async () => {
  await Promise.all([local!.stop(), s3!.stop()]);
  await rm(workRoot, { recursive: true, force: true });
});

/** A repository's objects, as the fuzzer reads, writes and damages them. */
interface Objects {
  /** Every object's name (a directory's dot-files and temporaries left out). */
  list(): Promise<string[]>;
  read(name: string): Promise<Buffer>;
  write(name: string, data: Uint8Array): Promise<void>;
  remove(name: string): Promise<void>;
  /** A copy of the whole repository at a new URL of the same backend. */
  copy(to: string): Promise<void>;
}

/** A directory repository's objects: its files. */
function dirObjects(root: string): Objects {
  return {
    list: async () => (await filesUnder(root)).map((p) => p.slice(root.length + 1)).filter((n) => !n.split('/').some((x) => x.startsWith('.'))),
    read: async (name) => {
      // Never a planted FIFO (a read would wait for a writer) or what a symlink points at.
      if (!(await lstat(join(root, name))).isFile()) throw new Error(`${name} is not a file`);
      return readFile(join(root, name));
    },
    write: async (name, data) => { await mkdir(dirname(join(root, name)), { recursive: true }); await writeFile(join(root, name), data); },
    remove: (name) => rm(join(root, name), { force: true }),
    copy: (to) => cp(root, to, { recursive: true }),
  };
}

/** An S3 repository's objects, through vmvault's own S3 storage (the AWS SDK). */
function s3Objects(url: string): Objects {
  const withStorage = async <T>(fn: (st: ReturnType<typeof openStorage>) => Promise<T>): Promise<T> => {
    const st = openStorage(url);
    try { return await fn(st); } finally { await st.close(); }
  };
  const list = () => withStorage(async (st) => { const out: string[] = []; for await (const o of st.list('')) out.push(o.name); return out; });
  return {
    list,
    read: (name) => withStorage(async (st) => Buffer.from(await st.get(name))),
    write: (name, data) => withStorage((st) => st.put(name, data)),
    remove: (name) => withStorage((st) => st.delete(name)),
    copy: async (to) => {
      const names = await list();
      await withStorage(async (from) => {
        const dest = openStorage(to);
        try { for (const n of names) await dest.put(n, await from.get(n)); } finally { await dest.close(); }
      });
    },
  };
}

const objectsOf = (b: Backend, repo: string): Objects => (b.name === 's3' ? s3Objects(repo) : dirObjects(repo));

type Rand = () => number;
const int = (r: Rand, n: number) => Math.floor(r() * n);
const pick = <T>(r: Rand, xs: readonly T[]): T => xs[int(r, xs.length)]!;

interface Run { args: string[]; code: number | undefined; signal: string | undefined; timedOut: boolean; stdout: string; stderr: string }

async function run(args: string[], env: Env): Promise<Run> {
  const r = await execa(process.execPath, [BIN, ...args], { reject: false, env, stdin: 'ignore', timeout: COMMAND_TIMEOUT_MS });
  return { args, code: r.exitCode, signal: r.signal ?? undefined, timedOut: r.timedOut, stdout: String(r.stdout), stderr: String(r.stderr) };
}

/** I1: ended, exit 0 or 1, and a failure says what is wrong in words. */
function assertClear(r: Run, ctx: string): void {
  const what = `${ctx}: vmvault ${r.args.join(' ')} (exit ${r.code}, signal ${r.signal})\n${r.stderr}`;
  assert.equal(r.timedOut, false, `I1/I5 timed out: ${what}`);
  assert.equal(r.signal, undefined, `I1 died of a signal: ${what}`);
  assert.ok(r.code === 0 || r.code === 1, `I1 exit code: ${what}`);
  assert.doesNotMatch(r.stderr, /^\s+at .+:\d+:\d+\)?$/m, `I1 stack trace: ${what}`);
  assert.doesNotMatch(`${r.stderr}\n${r.stdout}`, /\bundefined\b|\[object Object\]|\bNaN\b|TypeError|RangeError|ReferenceError/, `I1 internal detail: ${what}`);
  if (r.code !== 0) {
    // verify's report of what it found goes to stdout, headed FAILED; gc's refusal is a warning.
    assert.match(`${r.stderr}\n${r.stdout}`, /^(vmvault: )?(error|warning): |^FAILED: /m, `I1 no error line: ${what}\n${r.stdout}`);
    assert.match(`${r.stderr}\n${r.stdout}`, /(chunks|backups|keys|locks|index|health)\/|\bconfig\b|vmvault [a-z]|passphrase|repository|no backup id/, `I1 names nothing: ${what}`);
  }
}

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  let entries;
  try { entries = await readdir(dir, { withFileTypes: true }); } catch { return out; }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...await filesUnder(p)); else out.push(p);
  }
  return out;
}

interface Backup { id: string; vm: string; source: string }

/** Restores `b` and checks I1 and I2; true when it restored identical. */
async function restoreChecked(env: Env, b: Backup, format: ImageFormat, to: string, ctx: string, failOk = true): Promise<boolean> {
  const r = await run(['restore', b.id, '--to', to, '--format', format, '--no-sync', '--json'], env);
  assertClear(r, ctx);
  if (r.code !== 0) {
    assert.ok(failOk, `restore of ${b.id} (${b.vm}, ${format}) failed: ${ctx}\n${r.stderr}`);
    assert.deepEqual(await filesUnder(to), [], `I2 a failed restore left files: ${ctx}\n${r.stderr}`);
    return false;
  }
  const files = (JSON.parse(r.stdout) as { files: { path: string }[] }).files;
  assert.equal(files.length, 1, ctx);
  const cmp = await compareImages(b.source, files[0]!.path, 'qcow2', format);
  assert.ok(cmp.identical, `I2 restore exited 0 but differs from its source: ${ctx}\n${cmp.output}`);
  await rm(to, { recursive: true, force: true });
  return true;
}

async function backup(env: Env, vm: string, image: string, copyTo: string): Promise<Backup> {
  const r = await run(['backup', '--vm', vm, '--disk', image, '--json'], env);
  assert.equal(r.code, 0, r.stderr);
  await copyFile(image, copyTo);
  return { id: (JSON.parse(r.stdout) as { id: string }).id, vm, source: copyTo };
}

/** An object's kind: its first path segments. */
const kindOf = (name: string) => name.startsWith('health/') ? name.split('/').slice(0, 2).join('/') : name.split('/')[0]!;

const DAMAGES = ['flip', 'truncate', 'empty', 'delete', 'swap', 'foreign', 'directory', 'fifo', 'symlink-host', 'symlink-object', 'stray-tmp'] as const;
type Damage = typeof DAMAGES[number];
/** What a bucket can suffer: no file types, no temporaries (S3 has no rename). */
const S3_DAMAGES: readonly Damage[] = ['flip', 'truncate', 'empty', 'delete', 'swap', 'foreign'];
interface Applied { name: string; kind: string; damage: Damage }

/**
 * Damages object `name` of `store`; `foreign` is another repository's. `root` is the
 * repository's directory, for what only a file system can hold at a name (local only).
 */
async function damageObject(r: Rand, store: Objects, foreign: Objects, root: string | undefined, name: string, damage: Damage, objs: string[], foreignObjs: string[]): Promise<void> {
  const existing = objs.includes(name) ? await store.read(name).catch(() => undefined) : undefined;
  const sameKind = objs.filter((o) => o !== name && kindOf(o) === kindOf(name));
  switch (damage) {
    case 'flip': {
      const bytes = existing ?? Buffer.alloc(0);
      if (bytes.length === 0) return store.write(name, Buffer.from([int(r, 256)]));
      for (let i = 0, n = 1 + int(r, 4); i < n; i++) { const at = int(r, bytes.length); bytes[at] = bytes[at]! ^ (1 << int(r, 8)); }
      return store.write(name, bytes);
    }
    case 'truncate': {
      const size = existing?.length ?? 0;
      return store.write(name, size > 1 ? existing!.subarray(0, 1 + int(r, size - 1)) : Buffer.alloc(0));
    }
    case 'empty': return store.write(name, Buffer.alloc(0));
    case 'delete': return store.remove(name);
    case 'swap': {
      if (sameKind.length === 0) return store.write(name, Buffer.from('not an object'));
      const other = pick(r, sameKind);
      const b = await store.read(other);
      await store.write(name, b);
      return store.write(other, existing ?? Buffer.alloc(0));
    }
    case 'foreign': {
      const same = foreignObjs.includes(name) ? name : pick(r, foreignObjs.filter((o) => kindOf(o) === kindOf(name)).concat(foreignObjs.filter((o) => o.startsWith('chunks/'))));
      return store.write(name, await foreign.read(same));
    }
  }
  if (!root) throw new Error(`${damage} needs a directory repository`);
  const file = join(root, name);
  await mkdir(dirname(file), { recursive: true });
  switch (damage) {
    case 'directory':
      await rm(file, { force: true });
      await mkdir(file);
      return writeFile(join(file, 'inside'), 'x');
    case 'fifo':
      await rm(file, { force: true });
      await execa('mkfifo', [file]);
      return;
    case 'symlink-host':
      await rm(file, { force: true });
      return symlink('/etc/hostname', file);
    case 'symlink-object':
      await rm(file, { force: true });
      return symlink(join(root, sameKind.length ? pick(r, sameKind) : pick(r, objs.filter((o) => o !== name))), file);
    case 'stray-tmp':
      return writeFile(join(dirname(file), `.tmp-${Math.floor(r() * 1e12).toString(16)}`), Buffer.from('half a put'));
  }
}

/** Damage that changes what a chunk's name reads as (a stray temporary file does not). */
const changesContent = (d: Applied) => d.damage !== 'stray-tmp';

test(`damage fuzzer: ${ITERATIONS} iteration(s) from seed ${SEED} on a directory repository`, { timeout: 30 * 60_000 }, () => fuzz(local!, ITERATIONS, DAMAGES));
test(`damage fuzzer: ${S3_ITERATIONS} iteration(s) from seed ${SEED} on an S3 repository`, { timeout: 30 * 60_000 }, () => fuzz(s3!, S3_ITERATIONS, S3_DAMAGES));

async function fuzz(backend: Backend, iterations: number, damages: readonly Damage[]): Promise<void> {
  const started = Date.now();
  const { repo, env } = await initRepo(backend, ['--chunk-size', '64K']);
  const { repo: foreign, env: foreignEnv } = await initRepo(backend, ['--chunk-size', '64K']);
  const store = objectsOf(backend, repo);
  const foreignStore = objectsOf(backend, foreign);
  const work = join(workRoot, backend.name);
  await mkdir(work);
  const src = join(work, 'sources');
  await mkdir(src);
  const a = await makeImage(work, 'a.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x11 }, { offset: 2 * MiB, length: 256 * 1024, pattern: 0x12 }]);
  const b = await makeImage(work, 'b.qcow2', 'qcow2', 4 * MiB, [{ offset: MiB, length: MiB, pattern: 0x21 }]);
  const backups: Backup[] = [];
  backups.push(await backup(env, 'a', a, join(src, 'a-full.qcow2')));
  backups.push(await backup(env, 'b', b, join(src, 'b-full.qcow2')));
  await writePattern(a, 'qcow2', 512 * 1024, 256 * 1024, 0x13);
  await writePattern(a, 'qcow2', 3 * MiB, 64 * 1024, 0x14);
  await writePattern(b, 'qcow2', 0, 128 * 1024, 0x22);
  backups.push(await backup(env, 'a', a, join(src, 'a-incr.qcow2')));
  backups.push(await backup(env, 'b', b, join(src, 'b-incr.qcow2')));
  await backup(foreignEnv, 'a', a, join(src, 'foreign-a.qcow2'));
  await backup(foreignEnv, 'b', b, join(src, 'foreign-b.qcow2'));
  // Health objects: a quarantine entry (a chunk damaged, found by verify, then put back
  // intact: the entry stays until a verify reads it) and verification records.
  const someChunk = (await store.list()).find((n) => n.startsWith('chunks/'))!;
  const good = await store.read(someChunk);
  await store.write(someChunk, Buffer.concat([good.subarray(0, good.length - 1), Buffer.from([good.at(-1)! ^ 1])]));
  assert.equal((await run(['verify', '--read-data'], env)).code, 1);
  await store.write(someChunk, good);
  for (const e of [foreignEnv]) assert.equal((await run(['verify'], e)).code, 0);
  const objs = await store.list();
  const foreignObjs = await foreignStore.list();
  const kinds = [...new Set(objs.map(kindOf)), 'locks'];
  assert.ok(kinds.includes('health/chunks') && kinds.includes('health/backups') && kinds.includes('config') && kinds.includes('keys'), kinds.join(' '));

  // The comparison works: every backup restores identical, and a wrong source is told apart.
  for (const bk of backups) assert.ok(await restoreChecked(env, bk, 'qcow2', join(work, `base-${bk.id}`), 'undamaged', false));
  const r0 = await run(['restore', backups[0]!.id, '--to', join(work, 'wrong'), '--format', 'raw', '--no-sync', '--json'], env);
  const wrong = await compareImages(backups[2]!.source, JSON.parse(r0.stdout).files[0].path, 'qcow2', 'raw');
  assert.equal(wrong.identical, false, 'the comparison tells a wrong restore apart');
  console.log(`setup ${((Date.now() - started) / 1000).toFixed(1)} s; kinds ${kinds.join(', ')}`);

  // Chunks and manifests are most of a repository, and what restores depend on.
  const weighted = kinds.flatMap((k) => k === 'chunks' ? [k, k, k] : k === 'backups' ? [k, k] : [k]);
  const failures: string[] = [];
  const tally = { restoresOk: 0, restoresFailed: 0, backupsRefused: 0, verifyFailed: 0 };
  for (let it = ONLY ?? 0; it < (ONLY === undefined ? iterations : ONLY + 1); it++) {
    // One generator per iteration: "seed S iteration I" replays alone, whatever came before.
    const rand = prng(Math.imul(SEED, 0x9e3779b1) + it);
    const root = join(work, `it-${it}`);
    await mkdir(root, { recursive: true });
    const copy = backend.name === 's3' ? await backend.newRepo() : join(root, 'repo');
    await store.copy(copy);
    const copyStore = objectsOf(backend, copy);
    const itEnv = envFor(backend, copy);
    const applied: Applied[] = [];
    const copyObjs = await copyStore.list();
    for (let d = 0, n = 1 + int(rand, 3); d < n; d++) {
      const kind = pick(rand, weighted);
      let name: string;
      const ofKind = copyObjs.filter((o) => kindOf(o) === kind);
      if (ofKind.length === 0) name = `${kind}/${Math.floor(rand() * 2 ** 48).toString(16).padStart(12, '0')}${'0'.repeat(52)}`;
      else name = pick(rand, ofKind);
      const damage = pick(rand, damages);
      await damageObject(rand, copyStore, foreignStore, backend.name === 'local' ? copy : undefined, name, damage, copyObjs, foreignObjs);
      applied.push({ name, kind, damage });
    }
    const ctx = `${backend.name}, seed ${SEED} iteration ${it}: ${applied.map((d) => `${d.damage} ${d.name}`).join(', ')}`;
    const t0 = Date.now();
    try {
      await exercise(ctx);
    } catch (err) {
      // Go on: one run by hand can find several problems. The test fails at the end.
      failures.push(err instanceof Error ? err.message : String(err));
      console.log(`FAILED ${err instanceof Error ? err.message : String(err)}`);
    }
    console.log(`iteration ${it} (${((Date.now() - t0) / 1000).toFixed(1)} s): ${applied.map((d) => `${d.damage} ${d.kind}`).join(', ')}`);
    await rm(root, { recursive: true, force: true });

    async function exercise(ctx: string): Promise<void> {
      assertClear(await run(['backups', '--json'], itEnv), ctx);
      const before = new Set<string>();
      for (const bk of backups) {
        const fmt = pick(rand, ['raw', 'qcow2'] as const);
        if (await restoreChecked(itEnv, bk, fmt, join(root, `r1-${bk.id}-${fmt}`), ctx)) { before.add(bk.id); tally.restoresOk++; } else tally.restoresFailed++;
      }
      const verify = await run(['verify'], itEnv);
      assertClear(verify, ctx);
      const readData = await run(['verify', '--read-data'], itEnv);
      assertClear(readData, ctx);
      if (readData.code !== 0) tally.verifyFailed++;
      if (applied.some((d) => d.kind === 'chunks' && changesContent(d)) && !applied.some((d) => ['config', 'keys', 'backups'].includes(d.kind))) {
        // I5 and verify's job: every chunk is referenced by a manifest that can still be
        // read (none was damaged), so damage to one is found.
        assert.notEqual(readData.code, 0, `verify --read-data missed a damaged chunk: ${ctx}\n${readData.stdout}`);
      }

      const keysOrConfig = applied.some((d) => (d.kind === 'config' || d.kind === 'keys') && d.damage !== 'stray-tmp');
      const made = await run(['backup', '--vm', 'a', '--disk', a, '--json'], itEnv);
      assertClear(made, ctx);
      let fresh: Backup | undefined;
      if (made.code === 0) fresh = { id: JSON.parse(made.stdout).id, vm: 'a', source: backups[2]!.source };
      else {
        tally.backupsRefused++;
        // A directory planted at a chunk's name is not removed (it is not vmvault's to
        // delete): the backup refuses, naming it.
        const planted = applied.find((d) => d.damage === 'directory' && d.kind === 'chunks' && made.stderr.includes(d.name));
        if (planted) assert.match(made.stderr, /is a directory: check the repository directory for stray directories/, `${ctx}\n${made.stderr}`);
        else assert.ok(keysOrConfig, `I4 a backup failed with neither config nor keys damaged: ${ctx}\n${made.stderr}`);
        // One at a key's name is called what it is, not a damaged key file.
        const keyDir = applied.find((d) => d.damage === 'directory' && d.kind === 'keys' && made.stderr.includes(d.name));
        if (keyDir) assert.ok(made.stderr.includes(`${keyDir.name} (it is a directory (holding ${keyDir.name}/`), `${ctx}\n${made.stderr}`);
      }

      assertClear(await run(['gc', '--json'], itEnv), ctx);
      for (const bk of backups) {
        const fmt = pick(rand, ['raw', 'qcow2'] as const);
        const ok = await restoreChecked(itEnv, bk, fmt, join(root, `r2-${bk.id}-${fmt}`), ctx);
        if (before.has(bk.id)) assert.ok(ok, `I3 ${bk.id} restored identical before gc, not after: ${ctx}`);
        if (ok) tally.restoresOk++; else tally.restoresFailed++;
      }
      if (fresh) {
        // I4: it re-uploaded what it needed; it restores identical even after gc.
        for (const fmt of ['raw', 'qcow2'] as const) {
          assert.ok(await restoreChecked(itEnv, fresh, fmt, join(root, `r3-${fmt}`), ctx, false), ctx);
        }
      }
    }
  }
  assert.deepEqual(failures, [], `${failures.length} iteration(s) broke an invariant`);
  console.log(`tally ${JSON.stringify(tally)} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  if (iterations >= 4 && ONLY === undefined) {
    // The fuzzer still exercises damage: some restores fail, some succeed.
    assert.ok(tally.restoresFailed > 0, `no restore failed: the damage does not reach anything (${JSON.stringify(tally)})`);
    assert.ok(tally.restoresOk > 0, `no restore succeeded (${JSON.stringify(tally)})`);
  }
}

/**
 * bin/vmvault.js runs the CLI's CommonJS bundle (dist/cli/main.cjs) compiled with the
 * V8 code cache the build made beside it. The cache is used for the source it was made
 * from only, and whole: a bundle changed since (same length, which V8's own check does
 * not tell apart) runs as it now is; a damaged or missing cache only costs the compilation.
 * On a copy of the built launcher and bundle, run as operators run it.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { cp, mkdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { execa } from 'execa';
import { tempDir, type TempDir } from '../helpers/images.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const TAGLINE = 'encrypted, deduplicated backups of virtual machines';
const CHANGED = 'ENCRYPTED, DEDUPLICATED BACKUPS OF VIRTUAL MACHINES';

describe('the launcher and the bundle\'s code cache', () => {
  let dir: TempDir;
  let app: string;
  let bundle: string;
  let cache: string;
  let original: Buffer;
  let originalCache: Buffer;

  const run = async (...args: string[]) => {
    const r = await execa(process.execPath, [path.join(app, 'bin', 'vmvault.js'), ...args], { reject: false, stdin: 'ignore' });
    return { code: r.exitCode, stdout: String(r.stdout), stderr: String(r.stderr) };
  };

  before(async () => {
    dir = await tempDir();
    app = path.join(dir.path, 'app');
    await mkdir(path.join(app, 'dist'), { recursive: true });
    // The bundle alone (no tsc output beside it): the launcher runs it.
    await cp(path.join(ROOT, 'bin'), path.join(app, 'bin'), { recursive: true });
    await cp(path.join(ROOT, 'dist', 'cli'), path.join(app, 'dist', 'cli'), { recursive: true });
    await cp(path.join(ROOT, 'package.json'), path.join(app, 'package.json'));
    await symlink(path.join(ROOT, 'node_modules'), path.join(app, 'node_modules'));
    bundle = path.join(app, 'dist', 'cli', 'main.cjs');
    cache = `${bundle}.cache`;
    original = await readFile(bundle);
    originalCache = await readFile(cache);
  });
  after(async () => dir.cleanup());

  it('the build made a cache for this bundle, headed by the SHA-256 of both, and the CLI runs with it', async () => {
    const digest = createHash('sha256').update(original).update(originalCache.subarray(32)).digest();
    assert.ok(originalCache.subarray(0, 32).equals(digest), 'the cache names the source it was made from, and itself');
    assert.ok(originalCache.length > 100_000, `a cache of the code the CLI runs at start, not ${originalCache.length} bytes`);
    const r = await run('--help');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(TAGLINE));
    // Strict, as the ES modules it was made from: the directive opens the file.
    assert.ok(original.toString('utf8', 0, 64).startsWith("'use strict';"), original.toString('utf8', 0, 64));
    // ASCII only: one other character (in a comment) makes V8 hold the whole source as a two-byte string.
    const other = original.findIndex((b) => b > 0x7f);
    assert.equal(other, -1, `a byte that is not ASCII at ${other}: ${original.toString('utf8', Math.max(0, other - 40), other + 20)}`);
  });

  it('V8 takes the cache for the bundle, compiled as the launcher compiles it', async () => {
    // A new process with no V8 flags, as operators run vmvault; the wrapper is bin/vmvault.js's.
    const probe = `
      const { readFileSync } = require('node:fs'); const vm = require('node:vm');
      const [file, cache] = process.argv.slice(1);
      const source = '(function (exports, require, module, __filename, __dirname) { ' + readFileSync(file, 'utf8') + '\\n})';
      const script = new vm.Script(source, { filename: file, cachedData: readFileSync(cache).subarray(32) });
      console.log(JSON.stringify({ rejected: script.cachedDataRejected }));`;
    const r = await execa(process.execPath, ['-e', probe, bundle, cache], { env: { PATH: process.env.PATH ?? '' }, extendEnv: false });
    assert.deepEqual(JSON.parse(String(r.stdout)), { rejected: false });
  });

  it('a bundle changed since its cache was made runs as it now is, not as the cache remembers it', async () => {
    // Same length: V8 would take the old cache for it, and run the old code.
    const text = original.toString('utf8');
    assert.equal(text.split(TAGLINE).length, 2, 'the tagline appears once in the bundle');
    await writeFile(bundle, text.replace(TAGLINE, CHANGED));
    try {
      const r = await run('--help');
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(CHANGED));
      assert.doesNotMatch(r.stdout, new RegExp(TAGLINE));
    } finally {
      await writeFile(bundle, original);
    }
  });

  it('a damaged cache, or none, only costs the compilation', async () => {
    try {
      // Bytes flipped inside the code V8 would take as it is (a release V8 checks no sum of
      // it: fed to it, such a cache crashed the process), under the good cache's header.
      const damaged = Buffer.from(originalCache);
      for (const at of [200_000, 400_000, 600_000]) for (let i = at; i < at + 64 && i < damaged.length; i++) damaged[i]! ^= 0xff;
      await writeFile(cache, damaged);
      let r = await run('--version');
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^\d+\.\d+\.\d+/);
      assert.equal(r.stderr, '');
      await rm(cache);
      r = await run('--help');
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, new RegExp(TAGLINE));
    } finally {
      await writeFile(cache, originalCache);
    }
  });
});

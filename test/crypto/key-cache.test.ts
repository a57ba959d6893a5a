/**
 * The per-host key cache (src/crypto/key-cache.ts) on real repositories: it skips
 * Argon2id for a passphrase that opened the same key object here before, refuses
 * nothing it should not, and is ignored when the key object, the entry or its
 * permissions are not what they were.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { keyCacheFor } from '../../src/cli/context.js';
import { cachedMaster } from '../../src/crypto/key-cache.js';
import { keyFileSchema, sealMaster } from '../../src/crypto/keys.js';
import { IndexCache } from '../../src/repo/index-cache.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { tempDir } from '../helpers/images.js';
import { readOnlyDir } from '../helpers/read-only-dir.js';

const PW = 'key cache passphrase';

async function setup(kdf: 'weak' | 'moderate' = 'weak') {
  const dir = await tempDir();
  const storage = new LocalStorage(path.join(dir.path, 'repo'));
  const repo = await Repository.init(storage, PW, { kdf });
  const cache = { dir: path.join(dir.path, 'cache') };
  const warnings: string[] = [];
  const open = (pw = PW) => Repository.open(storage, pw, { keyCache: cache, onWarning: (m) => void warnings.push(m) });
  const entry = path.join(cache.dir, `${repo.id}.${repo.keyId}`);
  return { dir, storage, repo, cache, open, entry, warnings };
}

const same = (a: Repository, b: Repository) => Buffer.from(a.keys.encKey).equals(Buffer.from(b.keys.encKey));

describe('key cache', () => {
  it('skips Argon2id once this passphrase opened this key here, with private files', async () => {
    const s = await setup('moderate');
    try {
      let t = performance.now();
      const first = await s.open();
      const slow = performance.now() - t;
      assert.ok(same(first, s.repo));
      assert.equal((await fs.stat(s.cache.dir)).mode & 0o777, 0o700);
      assert.equal((await fs.stat(s.entry)).mode & 0o777, 0o600);
      assert.equal((await fs.stat(path.join(s.cache.dir, 'host-secret'))).mode & 0o777, 0o600);
      t = performance.now();
      const second = await s.open();
      const fast = performance.now() - t;
      assert.ok(same(second, s.repo));
      assert.ok(fast < slow / 4, `cached open took ${fast.toFixed(0)} ms, Argon2id ${slow.toFixed(0)} ms`);
      // A wrong passphrase cannot open the entry, and Argon2id refuses it as always.
      await assert.rejects(s.open('not the passphrase'), (err: Error & { code?: string }) => err.code === 'WRONG_PASSWORD');
      assert.deepEqual(s.warnings, []);
    } finally {
      await s.dir.cleanup();
    }
  });

  it('is filled by init: the first open after it skips Argon2id, and only the right passphrase opens the entry', async () => {
    const dir = await tempDir();
    try {
      const storage = new LocalStorage(path.join(dir.path, 'repo'));
      const cache = { dir: path.join(dir.path, 'cache') };
      const repo = await Repository.init(storage, PW, { kdf: 'moderate', keyCache: cache });
      const file = keyFileSchema.parse(JSON.parse(Buffer.from(await storage.get(`keys/${repo.keyId}`)).toString()));
      const master = await cachedMaster(cache, repo.id, repo.keyId, file, PW);
      assert.ok(master, 'init left an entry that opens the key object as storage holds it');
      assert.equal(await cachedMaster(cache, repo.id, repo.keyId, file, 'not the passphrase'), undefined);
      assert.equal((await fs.stat(path.join(cache.dir, `${repo.id}.${repo.keyId}`))).mode & 0o777, 0o600);
      const entry = path.join(cache.dir, `${repo.id}.${repo.keyId}`);
      const before = await fs.readFile(entry, 'utf8');
      const warnings: string[] = [];
      const opened = await Repository.open(storage, PW, { keyCache: cache, onWarning: (m) => void warnings.push(m) });
      assert.ok(same(opened, repo));
      // An open through Argon2id writes the entry afresh (new salt and nonce); one from the cache leaves it.
      assert.equal(await fs.readFile(entry, 'utf8'), before, 'the first open after init went through Argon2id');
      assert.deepEqual(warnings, []);
    } finally {
      await dir.cleanup();
    }
  });

  it('is bound to the key object: a rewritten or replaced key is not opened from the cache', async () => {
    const s = await setup();
    try {
      await s.open();
      const before = await fs.readFile(s.entry, 'utf8');
      const name = `keys/${s.repo.keyId}`;
      const oldFile = keyFileSchema.parse(JSON.parse(Buffer.from(await s.storage.get(name)).toString()));
      // The same master sealed afresh under the same id: other salt and nonce, so another object.
      const master = await cachedMaster(s.cache, s.repo.id, s.repo.keyId, oldFile, PW);
      assert.ok(master);
      const rewritten = await sealMaster(master, PW, s.repo.id, 'weak');
      await s.storage.put(name, new TextEncoder().encode(JSON.stringify(rewritten)));
      const newFile = keyFileSchema.parse(rewritten);
      assert.equal(await cachedMaster(s.cache, s.repo.id, s.repo.keyId, newFile, PW), undefined, 'the old entry does not open for the new key object');
      assert.ok(same(await s.open(), s.repo), 'the slow path still opens it');
      assert.notEqual(await fs.readFile(s.entry, 'utf8'), before, 'the entry was rewritten for the new key object');
      assert.ok(await cachedMaster(s.cache, s.repo.id, s.repo.keyId, newFile, PW));
      // A removed key: its entry no longer opens the repository.
      const other = await s.repo.addKey('second passphrase', 'weak', 'second');
      await (await s.open('second passphrase')).removeKey(s.repo.keyId);
      await fs.access(s.entry);
      await assert.rejects(s.open(), (err: Error & { code?: string }) => err.code === 'WRONG_PASSWORD');
      const reopened = await s.open('second passphrase');
      assert.equal(reopened.keyId, other);
      assert.ok(same(reopened, s.repo));
    } finally {
      await s.dir.cleanup();
    }
  });

  it('ignores a damaged entry, and a cache others can read', async () => {
    const s = await setup();
    try {
      await s.open();
      const entry = JSON.parse(await fs.readFile(s.entry, 'utf8')) as { sealed: string };
      const sealed = Buffer.from(entry.sealed, 'base64');
      sealed[0]! ^= 1;
      await fs.writeFile(s.entry, JSON.stringify({ ...entry, sealed: sealed.toString('base64') }), { mode: 0o600 });
      assert.ok(same(await s.open(), s.repo));
      assert.deepEqual(s.warnings, []);
      await fs.chmod(path.join(s.cache.dir, 'host-secret'), 0o644);
      assert.ok(same(await s.open(), s.repo));
      assert.match(s.warnings.join('\n'), /host-secret can be read by others than its owner: the key cache is not used/);
    } finally {
      await s.dir.cleanup();
    }
  });

  it('replaces a host secret of the wrong length (an empty one left by a failed write): caching works again', async () => {
    const s = await setup();
    try {
      await fs.mkdir(s.cache.dir, { mode: 0o700 });
      await fs.writeFile(path.join(s.cache.dir, 'host-secret'), '', { mode: 0o600 });
      await s.open();
      assert.equal((await fs.readFile(path.join(s.cache.dir, 'host-secret'))).length, 32);
      const file = keyFileSchema.parse(JSON.parse(await fs.readFile(path.join(s.dir.path, 'repo', 'keys', s.repo.keyId), 'utf8')));
      assert.ok(await cachedMaster(s.cache, s.repo.id, s.repo.keyId, file, PW), 'the next open skips Argon2id');
      assert.deepEqual(s.warnings, []);
    } finally {
      await s.dir.cleanup();
    }
  });

  // A real full file system: a one-page tmpfs. Mounting needs CAP_SYS_ADMIN; where it is
  // refused the test says so and skips.
  it('on a full file system leaves neither an empty host secret nor temporary files, and works once there is room', async (t) => {
    const s = await setup();
    const mnt = path.join(s.dir.path, 'cache');
    await fs.mkdir(mnt);
    let mounted = false;
    t.after(async () => {
      if (mounted) execFileSync('umount', [mnt]);
      await s.dir.cleanup();
    });
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4k,mode=0700', 'tmpfs', mnt], { stdio: 'pipe' });
      mounted = true;
    } catch (err) {
      t.skip(`cannot mount a tmpfs here: ${String(err).split('\n')[0]}`);
      return;
    }
    const filler = path.join(mnt, 'filler');
    await fs.writeFile(filler, Buffer.alloc(4096));
    // No room for the host secret.
    assert.ok(same(await s.open(), s.repo));
    assert.match(s.warnings.join('\n'), /could not write the key cache in .*ENOSPC/);
    assert.deepEqual(await fs.readdir(mnt), ['filler'], 'no host-secret, no temporary file');
    // Room for the host secret, not for the entry.
    await fs.rm(filler);
    s.warnings.length = 0;
    assert.ok(same(await s.open(), s.repo));
    assert.match(s.warnings.join('\n'), /could not write the key cache in .*ENOSPC/);
    assert.deepEqual(await fs.readdir(mnt), ['host-secret'], 'no temporary file of the entry');
    assert.equal((await fs.readFile(path.join(mnt, 'host-secret'))).length, 32);
    // Room again: the entry is written and used.
    execFileSync('mount', ['-o', 'remount,size=1m', mnt]);
    s.warnings.length = 0;
    await s.open();
    const file = keyFileSchema.parse(JSON.parse(await fs.readFile(path.join(s.dir.path, 'repo', 'keys', s.repo.keyId), 'utf8')));
    assert.ok(await cachedMaster(s.cache, s.repo.id, s.repo.keyId, file, PW));
    assert.deepEqual(s.warnings, []);
  });

  it('on a read-only file system, the key cache and the index cache say so (EROFS or EACCES), not ENOENT', async () => {
    const dir = await tempDir();
    const repoDir = await fs.mkdtemp(path.join(tmpdir(), 'vmvault-kc-'));
    const ro = await readOnlyDir(dir.path);
    try {
      const storage = new LocalStorage(path.join(repoDir, 'repo'));
      const repo = await Repository.init(storage, PW, { kdf: 'weak' });
      const warnings: string[] = [];
      await Repository.open(storage, PW, { keyCache: { dir: path.join(ro.path, 'home', '.cache', 'vmvault', 'keys') }, cacheDir: false, onWarning: (m) => void warnings.push(m) });
      assert.equal(warnings.length, 1, warnings.join('\n'));
      assert.match(warnings[0]!, /could not write the key cache in .*(EROFS|EACCES)/);
      assert.doesNotMatch(warnings[0]!, /ENOENT/);
      warnings.length = 0;
      const index = new IndexCache(path.join(ro.path, 'home', '.cache', 'vmvault'), repo.id, (m) => void warnings.push(m));
      await index.put('index/abc', new Uint8Array(3));
      assert.equal(warnings.length, 1, warnings.join('\n'));
      assert.match(warnings[0]!, /cannot be used \((EROFS|EACCES)/);
    } finally {
      await ro.release();
      await dir.cleanup();
      await fs.rm(repoDir, { recursive: true, force: true });
    }
  });

  it('is used by the CLI for a passphrase from a file or the environment, for a typed one only when asked', () => {
    const env = { HOME: '/home/u' };
    assert.deepEqual(keyCacheFor('file', env), { dir: '/home/u/.cache/vmvault/keys' });
    assert.deepEqual(keyCacheFor('env', { ...env, XDG_CACHE_HOME: '/c' }), { dir: '/c/vmvault/keys' });
    assert.deepEqual(keyCacheFor('env', { ...env, VMVAULT_KEY_CACHE_DIR: '/k' }), { dir: '/k' });
    assert.equal(keyCacheFor('prompt', env), undefined);
    assert.deepEqual(keyCacheFor('prompt', { ...env, VMVAULT_KEY_CACHE: 'on' }), { dir: '/home/u/.cache/vmvault/keys' });
    assert.equal(keyCacheFor('file', { ...env, VMVAULT_KEY_CACHE: 'off' }), undefined);
    assert.throws(() => keyCacheFor('file', { ...env, VMVAULT_KEY_CACHE: 'yes' }), /VMVAULT_KEY_CACHE is "yes": use on, off or auto/);
  });
});

/**
 * `vmvault up`'s own repository (STATE_DIR/repository): a first start that ran out of
 * space before the repository's config was written is made again, with the same
 * passphrase, on the next start; a directory that holds anything else without a config
 * is left alone, and the start says what to do.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdir, readdir, readFile, stat, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Repository } from '../../src/repo/repository.js';
import { stateRepository } from '../../src/service/state-repository.js';
import { openStorage } from '../../src/storage/open.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const KEY_FILE = JSON.stringify({
  version: 1, created: new Date().toISOString(),
  kdf: { algorithm: 'argon2id13', opsLimit: 1, memLimit: 8192, salt: 'AAAAAAAAAAAAAAAAAAAAAA==' }, nonce: 'AAAA', sealed: 'AAAA',
});

describe('the state directory repository', () => {
  let dir: TempDir;
  let n = 0;
  const cacheEnv = process.env.VMVAULT_CACHE_DIR;
  before(async () => {
    dir = await tempDir('vv-state-repo-');
    process.env.VMVAULT_CACHE_DIR = 'off';
  });
  after(async () => {
    if (cacheEnv === undefined) delete process.env.VMVAULT_CACHE_DIR;
    else process.env.VMVAULT_CACHE_DIR = cacheEnv;
    await dir.cleanup();
  });
  const stateDir = async () => {
    const d = join(dir.path, `state-${n++}`);
    await mkdir(d, { mode: 0o700 });
    return d;
  };

  // A real full file system: a one-page tmpfs, room for the key file and not for the
  // index object. Mounting needs CAP_SYS_ADMIN; where it is refused the test says so and skips.
  test('a first start that ran out of space is made again by the next one, with the passphrase it wrote', async (t) => {
    const state = await stateDir();
    const repoDir = join(state, 'repository');
    await mkdir(repoDir);
    let mounted = false;
    t.after(() => { if (mounted) execFileSync('umount', [repoDir]); });
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4k', 'tmpfs', repoDir], { stdio: 'pipe' });
      mounted = true;
    } catch (err) {
      t.skip(`cannot mount a tmpfs here: ${String(err).split('\n')[0]}`);
      return;
    }
    const said: string[] = [];
    await assert.rejects(stateRepository(state, (l) => said.push(l)), /ENOSPC|full/);
    assert.equal(said.length, 0, said.join('\n'));
    const passFile = join(state, 'passphrase');
    const pass = (await readFile(passFile, 'utf8')).trim();
    assert.equal((await stat(passFile)).mode & 0o777, 0o600);
    assert.deepEqual((await readdir(state)).sort(), ['passphrase', 'repository'], 'no temporary passphrase file');
    assert.equal((await readdir(join(repoDir, 'keys'))).length, 1, 'the key file fitted, the rest did not');
    assert.ok(!(await readdir(repoDir)).includes('config'));

    execFileSync('mount', ['-o', 'remount,size=50m', repoDir]);
    const made = await stateRepository(state, (l) => said.push(l));
    assert.equal(made.passphrase, pass, 'the passphrase the first start wrote is kept');
    assert.match(said.join('\n'), /held what an interrupted first start left \(.*keys\/[0-9a-f]{16}.*, no config\): removed, and the repository is made again with the passphrase in/);
    assert.match(said.join('\n'), /created the repository/);
    const repo = await Repository.open(openStorage(repoDir), pass);
    assert.equal((await readdir(join(repoDir, 'keys'))).length, 1, 'only the new key');
    assert.equal(repo.keyId, (await readdir(join(repoDir, 'keys')))[0]);
    // The next start opens it.
    said.length = 0;
    assert.equal((await stateRepository(state, (l) => said.push(l))).passphrase, pass);
    assert.equal(said.length, 0, said.join('\n'));
  });

  test('an empty repository directory beside a passphrase file is made with that passphrase', async () => {
    const state = await stateDir();
    await mkdir(join(state, 'repository'));
    await writeFile(join(state, 'passphrase'), 'kept passphrase\n', { mode: 0o600 });
    const made = await stateRepository(state, () => {});
    assert.equal(made.passphrase, 'kept passphrase');
    await Repository.open(openStorage(made.url), 'kept passphrase');
  });

  test('anything but what a first start leaves, without a config, is left alone and the start says what to do', async () => {
    const cases: Array<[string, (repoDir: string, passFile: string) => Promise<void>, RegExp]> = [
      ['chunks', async (r) => { await mkdir(join(r, 'chunks', 'ab'), { recursive: true }); await writeFile(join(r, 'chunks', 'ab', 'x'), 'x'); }, /"chunks" is not something a first start writes/],
      ['two keys', async (r) => {
        await mkdir(join(r, 'keys'));
        await writeFile(join(r, 'keys', '0123456789abcdef'), KEY_FILE);
        await writeFile(join(r, 'keys', 'fedcba9876543210'), KEY_FILE);
      }, /keys\/ holds .*more than a first start writes/],
      ['a key older than the passphrase', async (r, p) => {
        await mkdir(join(r, 'keys'));
        await writeFile(join(r, 'keys', '0123456789abcdef'), KEY_FILE);
        const later = new Date(Date.now() + 3_600_000);
        await utimes(p, later, later);
      }, /key file is older than .*passphrase, so it may be sealed with another passphrase/],
      ['a key and no passphrase file', async (r, p) => {
        await mkdir(join(r, 'keys'));
        await writeFile(join(r, 'keys', '0123456789abcdef'), KEY_FILE);
        execFileSync('rm', [p]);
      }, /made with a passphrase that .*passphrase, now missing, held/],
    ];
    for (const [what, setup, why] of cases) {
      const state = await stateDir();
      const repoDir = join(state, 'repository');
      const passFile = join(state, 'passphrase');
      await mkdir(repoDir);
      await writeFile(passFile, 'p\n', { mode: 0o600 });
      await setup(repoDir, passFile);
      const before = execFileSync('find', [repoDir], { encoding: 'utf8' });
      await assert.rejects(stateRepository(state, () => {}), (err: Error & { code?: string }) => {
        assert.equal(err.code, 'BAD_INPUT', what);
        assert.match(err.message, /holds no vmvault repository \(it has no "config"\) but is not empty/, what);
        assert.match(err.message, why, what);
        assert.ok(err.message.includes(`rm -r ${repoDir}`), what);
        return true;
      });
      assert.equal(execFileSync('find', [repoDir], { encoding: 'utf8' }), before, `${what}: nothing removed`);
    }
  });
});

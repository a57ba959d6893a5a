/**
 * Repository formats: format 3 (the default) has keyed BLAKE3 chunk ids; format 2
 * (`--chunk-id hmac-sha256`) names its function, HMAC-SHA-256; format 1
 * (`--chunk-id blake2b`) is what the first vmvault wrote, keyed BLAKE2b. All back up
 * and restore identical, each keeps its function, a config from a newer vmvault is
 * refused with what to do, and the id function cannot be switched by editing the config.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { createRequire } from 'node:module';
import { cp, mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { Repository } from '../../src/repo/repository.js';
import { chunkName, openChunk } from '../../src/repo/chunk.js';
import { chunkId, deriveKeys } from '../../src/crypto/keys.js';
import { sodium } from '../../src/crypto/sodium.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { compareImages } from '../../src/disk/qemu.js';
import { VmvaultError } from '../../src/errors.js';
import { BIN, cli } from '../helpers/cli.js';
import { makeImage, tempDir, writePattern } from '../helpers/images.js';

const PASSWORD = 'format test passphrase';
/** The package itself, beside vmvault's use of it (its output is checked against BLAKE3's test vectors in test/crypto/chunk-id.test.ts). */
const { Blake3Hasher } = createRequire(import.meta.url)('@napi-rs/blake-hash') as { Blake3Hasher: { newKeyed(key: Buffer): { update(d: Uint8Array): { digest(f: 'hex'): string } } } };
const MiB = 1024 * 1024;

async function backupAndRestore(chunkIdHash: 'hmac-sha256' | 'blake2b' | 'blake3' | undefined) {
  const dir = await tempDir('vmvault-format-');
  const storage = new LocalStorage(join(dir.path, 'repo'));
  await Repository.init(storage, PASSWORD, { kdf: 'weak', chunkSize: MiB, ...(chunkIdHash ? { chunkIdHash } : {}) });
  const repo = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: () => {} });
  const source = await makeImage(dir.path, 'disk.qcow2', 'qcow2', 8 * MiB, [{ offset: 0, length: 2 * MiB, pattern: 0x5a }, { offset: 5 * MiB, length: MiB, pattern: 0x33 }]);
  const b = await backupVm(repo, { vm: 'f', driver: 'image', disks: [{ path: source, format: 'qcow2' }] });
  const out = await restore(repo, { backupId: b.manifest.id, to: join(dir.path, 'out'), format: 'qcow2' });
  assert.ok((await compareImages(source, out.files[0]!.path, 'qcow2', 'qcow2')).identical);
  const manifest = await repo.loadManifest(b.manifest.id);
  const first = manifest.disks[0]!.chunks[0]!;
  return { dir, storage, repo, first };
}

/** Runs the vmvault installed at `app`. */
async function execStripped(app: string, args: string[], env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  const r = await execa(process.execPath, [join(app, 'bin', 'vmvault.js'), ...args], { reject: false, env, stdin: 'ignore' });
  return { code: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
}

describe('repository formats', () => {
  test('a new repository is format 3 with keyed BLAKE3 chunk ids (computed in the chunk threads) under their own subkey; it backs up and restores identical', async () => {
    const { dir, repo, first } = await backupAndRestore(undefined);
    try {
      const config = JSON.parse(await readFile(join(dir.path, 'repo', 'config'), 'utf8'));
      assert.equal(config.version, 3);
      assert.equal(config.chunkIdHash, 'blake3');
      assert.equal(repo.keys.idHash, 'blake3');
      const plain = Buffer.alloc(MiB, 0x5a);
      assert.equal(first, Blake3Hasher.newKeyed(Buffer.from(repo.keys.idKey)).update(plain).digest('hex'));
      assert.equal(chunkId(repo.keys, plain), first);
      const master = new Uint8Array(32);
      const subkeys = (['blake3', 'hmac-sha256', 'blake2b'] as const).map((h) => Buffer.from(deriveKeys(master, h).idKey).toString('hex'));
      assert.equal(new Set(subkeys).size, 3, 'each id function has its own subkey');
    } finally {
      await dir.cleanup();
    }
  });

  test('format 2 (--chunk-id hmac-sha256) has HMAC-SHA-256 chunk ids under their own subkey; it backs up and restores identical', async () => {
    const { dir, repo, first } = await backupAndRestore('hmac-sha256');
    try {
      const config = JSON.parse(await readFile(join(dir.path, 'repo', 'config'), 'utf8'));
      assert.equal(config.version, 2);
      assert.equal(config.chunkIdHash, 'hmac-sha256');
      assert.equal(repo.keys.idHash, 'hmac-sha256');
      // The first chunk is 1 MiB of 0x5a: its id is HMAC-SHA-256 under the id subkey, not under the BLAKE2b one.
      const plain = Buffer.alloc(MiB, 0x5a);
      assert.equal(first, createHmac('sha256', repo.keys.idKey).update(plain).digest('hex'));
      const blakeKey = deriveKeys(new Uint8Array(32), 'blake2b');
      assert.notDeepEqual(Buffer.from(repo.keys.idKey), Buffer.from(blakeKey.idKey));
    } finally {
      await dir.cleanup();
    }
  });

  test('format 1 (--chunk-id blake2b) keeps keyed BLAKE2b ids and a config that older vmvault reads', async () => {
    const { dir, repo, first } = await backupAndRestore('blake2b');
    try {
      const config = JSON.parse(await readFile(join(dir.path, 'repo', 'config'), 'utf8'));
      assert.equal(config.version, 1);
      assert.equal('chunkIdHash' in config, false);
      assert.equal(first, sodium.crypto_generichash(32, Buffer.alloc(MiB, 0x5a), repo.keys.idKey, 'hex'));
      assert.equal(chunkId(repo.keys, Buffer.alloc(MiB, 0x5a)), first);
    } finally {
      await dir.cleanup();
    }
  });

  test('the id function cannot be switched by editing the config: the config no longer matches its keys', async () => {
    const { dir, storage } = await backupAndRestore(undefined);
    try {
      const path = join(dir.path, 'repo', 'config');
      const config = JSON.parse(await readFile(path, 'utf8'));
      // Format 3 names only BLAKE3; as format 2 or 1, the config's MAC no longer matches.
      const edits: [object, RegExp][] = [
        [{ ...config, chunkIdHash: 'blake2b' }, /config .* is damaged or from an unknown version: put back a copy of the file "config"/],
        [{ ...config, version: 2, chunkIdHash: 'hmac-sha256' }, /does not match its keys: it was modified/],
        [{ ...config, version: 1, chunkIdHash: undefined }, /does not match its keys: it was modified/],
      ];
      for (const [edited, refusal] of edits) {
        await writeFile(path, JSON.stringify(edited));
        await assert.rejects(Repository.open(storage, PASSWORD, { cacheDir: false }), refusal);
      }
      // Emptied by a crash, or cut short: where it is, and what to do.
      for (const bytes of ['', '{"version": 3, "id"']) {
        await writeFile(path, bytes);
        await assert.rejects(Repository.open(storage, PASSWORD, { cacheDir: false }),
          new RegExp(`the repository config at .*repo is damaged \\(${bytes.length} bytes, not valid JSON\\): put back a copy of the file "config" \\(it holds no secret\\)`));
      }
    } finally {
      await dir.cleanup();
    }
  });

  test('a chunk whose content does not hash to its id under the repository function is refused', async () => {
    const { dir, repo, first } = await backupAndRestore(undefined);
    try {
      const sealed = await repo.storage.get(chunkName(first));
      // The same sealed chunk read as if the repository used BLAKE2b: the id check fails.
      const wrong = { ...repo.keys, idHash: 'blake2b' as const };
      assert.throws(() => openChunk(wrong, repo.id, first, sealed), /does not match its id/);
      assert.equal(openChunk(repo.keys, repo.id, first, sealed).length, MiB);
    } finally {
      await dir.cleanup();
    }
  });

  test('a repository of a newer format is refused with what to do, and nothing is written', async () => {
    const { dir } = await backupAndRestore(undefined);
    try {
      const path = join(dir.path, 'repo', 'config');
      const config = JSON.parse(await readFile(path, 'utf8'));
      await writeFile(path, JSON.stringify({ ...config, version: 4 }));
      const storage = new LocalStorage(join(dir.path, 'repo'));
      await assert.rejects(Repository.open(storage, PASSWORD, { cacheDir: false }), (err: unknown) =>
        err instanceof VmvaultError && err.code === 'UNSUPPORTED' && /format 4, made by a newer vmvault.*formats 1 to 3.*upgrade vmvault/.test(err.message));
      const r = await cli(['backups', '--json'], { VMVAULT_REPOSITORY: join(dir.path, 'repo'), VMVAULT_PASSWORD: PASSWORD });
      assert.equal(r.code, 1);
      assert.match(r.stderr, /format 4, made by a newer vmvault/);
    } finally {
      await dir.cleanup();
    }
  });

  test('vmvault init: format 3 by default, --chunk-id hmac-sha256 makes format 2 and blake2b format 1', async () => {
    const dir = await tempDir('vmvault-format-cli-');
    try {
      const env = { VMVAULT_PASSWORD: PASSWORD };
      const a = await cli(['--repo', join(dir.path, 'a'), 'init', '--kdf', 'weak', '--json'], env);
      assert.equal(a.code, 0, a.stderr);
      assert.deepEqual([JSON.parse(a.stdout).format, JSON.parse(a.stdout).chunkId], [3, 'blake3']);
      const h = await cli(['--repo', join(dir.path, 'h'), 'init', '--kdf', 'weak', '--chunk-id', 'hmac-sha256', '--json'], env);
      assert.equal(h.code, 0, h.stderr);
      assert.deepEqual([JSON.parse(h.stdout).format, JSON.parse(h.stdout).chunkId], [2, 'hmac-sha256']);
      const b = await cli(['--repo', join(dir.path, 'b'), 'init', '--kdf', 'weak', '--chunk-id', 'blake2b', '--json'], env);
      assert.equal(b.code, 0, b.stderr);
      assert.deepEqual([JSON.parse(b.stdout).format, JSON.parse(b.stdout).chunkId], [1, 'blake2b']);
      const c = await cli(['--repo', join(dir.path, 'c'), 'init', '--kdf', 'weak', '--chunk-id', 'md5'], env);
      assert.notEqual(c.code, 0);
      assert.match(c.stderr, /Allowed choices are blake3, hmac-sha256, blake2b/);
    } finally {
      await dir.cleanup();
    }
  });

  test('a host that cannot load BLAKE3: init falls back to format 2 and says so; a format-3 repository lists, and a backup into it stops with what to do', async () => {
    const dir = await tempDir('vmvault-format-noblake-');
    try {
      // vmvault as installed, but without @napi-rs/blake-hash (as on a platform it has no build for).
      const root = dirname(dirname(BIN));
      const app = join(dir.path, 'app');
      await mkdir(join(app, 'node_modules', '@napi-rs'), { recursive: true });
      await cp(join(root, 'bin'), join(app, 'bin'), { recursive: true });
      await cp(join(root, 'dist', 'cli'), join(app, 'dist', 'cli'), { recursive: true });
      await cp(join(root, 'package.json'), join(app, 'package.json'));
      for (const name of await readdir(join(root, 'node_modules'))) {
        if (name !== '@napi-rs') await symlink(join(root, 'node_modules', name), join(app, 'node_modules', name));
      }
      for (const name of await readdir(join(root, 'node_modules', '@napi-rs'))) {
        if (!name.startsWith('blake-hash')) await symlink(join(root, 'node_modules', '@napi-rs', name), join(app, 'node_modules', '@napi-rs', name));
      }
      const stripped = (args: string[], env: Record<string, string>) => execStripped(app, args, env);
      const env = { VMVAULT_PASSWORD: PASSWORD };

      const a = await stripped(['--repo', join(dir.path, 'a'), 'init', '--kdf', 'weak', '--json'], env);
      assert.equal(a.code, 0, a.stderr);
      assert.deepEqual([JSON.parse(a.stdout).format, JSON.parse(a.stdout).chunkId], [2, 'hmac-sha256']);
      assert.match(a.stderr, /cannot load BLAKE3's native code \(@napi-rs\/blake-hash: the package is not installed\): .*chunk ids are HMAC-SHA-256 \(format 2\)/);
      const b = await stripped(['--repo', join(dir.path, 'b'), 'init', '--kdf', 'weak', '--chunk-id', 'blake3'], env);
      assert.equal(b.code, 1);
      assert.match(b.stderr, /cannot make a repository with BLAKE3 chunk ids: this host cannot load its native code .*choose --chunk-id hmac-sha256; nothing was changed/);
      assert.equal(await readFile(join(dir.path, 'b', 'config'), 'utf8').catch(() => 'absent'), 'absent');

      // A format-3 repository with one backup, made where BLAKE3 loads.
      const repoEnv = { ...env, VMVAULT_REPOSITORY: join(dir.path, 'c') };
      assert.equal((await cli(['init', '--kdf', 'weak'], repoEnv)).code, 0);
      const source = await makeImage(dir.path, 'disk.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x42 }]);
      const made = await cli(['backup', '--vm', 'f', '--disk', `root=${source}`, '--format', 'qcow2', '--json'], repoEnv);
      assert.equal(made.code, 0, made.stderr);
      const listed = await stripped(['backups', '--json'], repoEnv);
      assert.equal(listed.code, 0, listed.stderr);
      assert.equal(JSON.parse(listed.stdout).length, 1);
      // New data must be hashed (an unchanged disk needs no id at all, and is backed up).
      await writePattern(source, 'qcow2', 2 * MiB, MiB, 0x17);
      const refused = await stripped(['backup', '--vm', 'f', '--disk', `root=${source}`, '--format', 'qcow2'], repoEnv);
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /chunk ids are keyed BLAKE3 \(format 3\), and this host cannot load its native code .*reinstall vmvault's packages \(npm ci\), or run vmvault where that package has a build/);
      const after = await cli(['backups', '--json'], repoEnv);
      assert.equal(JSON.parse(after.stdout).length, 1, 'the refused backup left no backup behind');

      // Recovery from a paper key works there too (its checksum and the keys are BLAKE2b, from libsodium then).
      const paper = await cli(['key', 'export', '--paper'], repoEnv);
      assert.equal(paper.code, 0, paper.stderr);
      await writeFile(join(dir.path, 'paper.txt'), paper.stdout);
      const imported = await stripped(['key', 'import', join(dir.path, 'paper.txt'), '--kdf', 'weak'], { VMVAULT_REPOSITORY: repoEnv.VMVAULT_REPOSITORY, VMVAULT_PASSWORD: 'a new passphrase' });
      assert.equal(imported.code, 0, imported.stderr);
      const listedWithNew = await stripped(['backups', '--json'], { VMVAULT_REPOSITORY: repoEnv.VMVAULT_REPOSITORY, VMVAULT_PASSWORD: 'a new passphrase' });
      assert.equal(listedWithNew.code, 0, listedWithNew.stderr);
      assert.equal(JSON.parse(listedWithNew.stdout).length, 1);
    } finally {
      await dir.cleanup();
    }
  });
});

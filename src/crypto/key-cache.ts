/**
 * A per-host cache of opened repository keys, for unattended use: the service, and
 * the CLI when its passphrase comes from a file or the environment.
 *
 * Why: opening a repository runs Argon2id (the `moderate` preset: 64 MiB, 3 passes,
 * about 1.4 s in WebAssembly), on every command and every scheduled backup. Argon2id
 * is there against someone who holds only the repository (the storage provider, a
 * leaked bucket) and guesses passphrases offline.
 *
 * What: `<dir>/<repo id>.<key id>` holds the master secret sealed
 * (XChaCha20-Poly1305) under HMAC-SHA256(host secret, salt ‖ repo id ‖ key id ‖
 * passphrase), with a digest of the key object it was opened from in the additional
 * data. `<dir>/host-secret` is 32 random bytes made on first use. Files are 0600 in a
 * 0700 directory; a cache whose files others can read is not used.
 *
 * Security argument: the cache opens only with the passphrase AND the host secret.
 * - Without the host secret (the repository alone, a copy of a cache file alone) it is
 *   as strong as a random 256-bit key: it adds nothing to an offline guesser's odds.
 * - Whoever reads this host's files as the service's user can read the host secret,
 *   and could then test passphrases at HMAC speed instead of Argon2id speed. But for
 *   the unattended cases the cache is used for, that same reader already has the
 *   passphrase itself (the password file, the service's environment or
 *   configuration): nothing is exposed that was not already. For a passphrase typed
 *   at a prompt, which is on no disk, that would be a real loss: the CLI uses the
 *   cache then only when asked (VMVAULT_KEY_CACHE=on).
 * - A wrong passphrase cannot open the cache entry (the AEAD fails) and then goes
 *   through Argon2id as always, which refuses it.
 * - An entry is bound to the key object's exact bytes: a key file that was replaced,
 *   rewritten or removed no longer matches and the entry is ignored (and rewritten
 *   after the next slow open). The config MAC is still checked with the cached key.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import * as z from 'zod';
import { errnoCode } from '../errors.js';
import { fsyncDir, mkdirs, writeNewFileSynced } from '../storage/local.js';
import { NONCE_BYTES, xchachaDecrypt, xchachaEncrypt } from './seal.js';
import type { KeyFile } from './keys.js';

const MASTER_BYTES = 32;
const SECRET_BYTES = 32;

const entrySchema = z.object({
  version: z.literal(1),
  repoId: z.string(),
  keyId: z.string(),
  salt: z.string(),
  nonce: z.string(),
  sealed: z.string(),
});

/** Where the cache lives; the caller decides whether one is used at all. */
export interface KeyCache { dir: string }

const SAFE_ID = /^[0-9A-Za-z_-]{1,128}$/;

/** A digest of the key object's content: any change to it invalidates the entry. */
function keyFileDigest(file: KeyFile): string {
  return createHash('sha256').update(JSON.stringify(file)).digest('hex');
}

function ad(repoId: string, keyId: string, file: KeyFile): Uint8Array {
  return new TextEncoder().encode(`vmvault/v1\0key-cache\0${repoId}\0${keyId}\0${keyFileDigest(file)}`);
}

function wrappingKey(secret: Buffer, salt: Buffer, repoId: string, keyId: string, passphrase: string): Uint8Array {
  return new Uint8Array(createHmac('sha256', secret).update(salt).update(`\0${repoId}\0${keyId}\0`).update(passphrase, 'utf8').digest());
}

/** Refuses files that anyone but their owner can read or write. */
async function privateFile(file: string): Promise<boolean> {
  const st = await fs.stat(file);
  return (st.mode & 0o077) === 0 && (process.getuid === undefined || st.uid === process.getuid());
}

type SecretFile = { secret: Buffer } | { absent: true } | { wrongLength: number };

async function readSecretFile(file: string): Promise<SecretFile> {
  try {
    if (!(await privateFile(file))) throw new Error(`${file} can be read by others than its owner: the key cache is not used (chmod 600 it, or remove the directory)`);
    const secret = await fs.readFile(file);
    return secret.length === SECRET_BYTES ? { secret } : { wrongLength: secret.length };
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return { absent: true };
    throw err;
  }
}

/**
 * The host secret; with `create`, made when missing. A file of the wrong length (an
 * older vmvault left an empty one when its write failed on a full disk) is treated as
 * missing and replaced: otherwise nothing would ever be cached again, and every
 * command would run Argon2id without a word.
 */
async function readSecret(dir: string, create: boolean): Promise<Buffer | undefined> {
  const file = path.join(dir, 'host-secret');
  const found = await readSecretFile(file);
  if ('secret' in found) return found.secret;
  if (!create) return undefined;
  await mkdirs(dir, [], 0o700);
  await fs.chmod(dir, 0o700);
  // Written whole and synced under a temporary name, then put in place in one step: a
  // concurrent process (or a crash, or a full disk) never sees a partial secret.
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await writeNewFileSynced(tmp, randomBytes(SECRET_BYTES), 0o600);
    if ('absent' in found) {
      // link, not rename: a secret another process put there meanwhile is kept (entries may be sealed under it).
      await fs.link(tmp, file).catch(async (err: unknown) => {
        if (errnoCode(err) !== 'EEXIST') throw err;
        const theirs = await readSecretFile(file);
        if ('wrongLength' in theirs) await fs.rename(tmp, file);
      });
    } else {
      // No vmvault writes a partial secret any more, so none is being made there: replace it.
      await fs.rename(tmp, file);
    }
    await fsyncDir(dir);
  } finally {
    await fs.rm(tmp, { force: true }).catch(() => undefined);
  }
  // Ours, or the one a concurrent process put there first (or last, when both replaced a
  // wrong one: an entry sealed under the loser's is a cache miss, rewritten after the next open).
  return readSecret(dir, false);
}

function entryPath(cache: KeyCache, repoId: string, keyId: string): string | undefined {
  return SAFE_ID.test(repoId) && SAFE_ID.test(keyId) ? path.join(cache.dir, `${repoId}.${keyId}`) : undefined;
}

/**
 * The master secret this passphrase opened from key `keyId` on this host before, or
 * undefined (no entry, another passphrase, a changed key object, a damaged entry).
 * Throws only when the cache is unsafe to use (files others can read).
 */
export async function cachedMaster(cache: KeyCache, repoId: string, keyId: string, file: KeyFile, passphrase: string): Promise<Uint8Array | undefined> {
  const p = entryPath(cache, repoId, keyId);
  if (!p) return undefined;
  let raw: string;
  try {
    raw = await fs.readFile(p, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw err;
  }
  if (!(await privateFile(p))) throw new Error(`${p} can be read by others than its owner: the key cache is not used`);
  const secret = await readSecret(cache.dir, false);
  if (!secret) return undefined;
  let entry: z.infer<typeof entrySchema>;
  try {
    entry = entrySchema.parse(JSON.parse(raw));
  } catch {
    return undefined;
  }
  if (entry.repoId !== repoId || entry.keyId !== keyId) return undefined;
  const key = wrappingKey(secret, Buffer.from(entry.salt, 'base64'), repoId, keyId, passphrase);
  const plain = xchachaDecrypt(key, Buffer.from(entry.nonce, 'base64'), Buffer.from(entry.sealed, 'base64'), ad(repoId, keyId, file));
  return plain && plain.length === MASTER_BYTES ? new Uint8Array(plain) : undefined;
}

/** Remembers the master secret that `passphrase` opened from key `keyId` (see the file comment). */
export async function storeMaster(cache: KeyCache, repoId: string, keyId: string, file: KeyFile, passphrase: string, master: Uint8Array): Promise<void> {
  const p = entryPath(cache, repoId, keyId);
  if (!p) return;
  const secret = await readSecret(cache.dir, true);
  if (!secret) return;
  const salt = randomBytes(32);
  const nonce = randomBytes(NONCE_BYTES);
  const sealed = xchachaEncrypt(wrappingKey(secret, salt, repoId, keyId, passphrase), nonce, master, ad(repoId, keyId, file));
  const entry: z.infer<typeof entrySchema> = {
    version: 1, repoId, keyId, salt: salt.toString('base64'), nonce: nonce.toString('base64'), sealed: sealed.toString('base64'),
  };
  const tmp = `${p}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await writeNewFileSynced(tmp, JSON.stringify(entry), 0o600);
    await fs.rename(tmp, p);
  } catch (err) {
    // A write that failed (a full disk) leaves no temporary file behind.
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}

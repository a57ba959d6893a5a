/**
 * Keys. One 32-byte master secret per repository; every working key is derived from
 * it with libsodium's crypto_kdf (BLAKE2b, crypto/blake2b.ts), so the paper backup is a
 * single secret. The master secret is stored sealed by each passphrase (Argon2id, in
 * libsodium, on a worker thread) in `keys/<id>`.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import * as z from 'zod';
import { blake2b, kdfDerive } from './blake2b.js';
import { xchachaDecrypt, xchachaEncrypt, NONCE_BYTES } from './seal.js';
import type { ChunkIdHash } from './chunk-id.js';

export { chunkId, type ChunkIdHash } from './chunk-id.js';

export interface RepoKeys {
  /** Keys the chunk id function (`idHash`). */
  idKey: Uint8Array;
  idHash: ChunkIdHash;
  /** XChaCha20-Poly1305 key for every object. */
  encKey: Uint8Array;
  /** Keys the MAC over the plaintext config (detects tampering, checks paper keys). */
  macKey: Uint8Array;
}

export const MASTER_BYTES = 32;
/** crypto_pwhash_SALTBYTES. */
const ARGON2_SALT_BYTES = 16;
const KDF_CONTEXT = 'vmvault_';

export function generateMaster(): Uint8Array {
  return new Uint8Array(randomBytes(MASTER_BYTES));
}

/** The KDF subkey id of each chunk id function's key (2 and 3 are the encryption and MAC keys). */
const ID_SUBKEY: Record<ChunkIdHash, number> = { blake2b: 1, 'hmac-sha256': 4, blake3: 5 };

export function deriveKeys(master: Uint8Array, idHash: ChunkIdHash = 'blake2b'): RepoKeys {
  const derive = (id: number) => kdfDerive(32, id, KDF_CONTEXT, master);
  // Each id function has its own subkey: one key is never used with two functions.
  return { idKey: derive(ID_SUBKEY[idHash]), idHash, encKey: derive(2), macKey: derive(3) };
}

/** Argon2id cost. `moderate` is the default; `weak` exists for tests only. */
export const KDF_PRESETS = {
  moderate: { opsLimit: 3, memLimit: 64 * 1024 * 1024 },
  strong: { opsLimit: 4, memLimit: 256 * 1024 * 1024 },
  weak: { opsLimit: 1, memLimit: 8 * 1024 },
} as const;
export type KdfPreset = keyof typeof KDF_PRESETS;

/**
 * The most Argon2id cost a key file may ask for: four times the strong preset's passes,
 * and libsodium's "sensitive" memory. Every key is tried at open, so a key file planted
 * in keys/ with a cost of hours (or gigabytes) would otherwise stall every command of
 * every host: beyond these it is a damaged key file, skipped with a warning.
 */
export const KDF_MAX = { opsLimit: 16, memLimit: 1024 * 1024 * 1024 } as const;

/** A key file's Argon2id cost, in bytes times passes: what trying it takes. */
export const kdfCost = (f: Pick<KeyFile, 'kdf'>): number => f.kdf.opsLimit * f.kdf.memLimit;

/**
 * Key files are tried cheapest first, so a costly key file planted in keys/ delays no
 * open that a cheaper one answers. Every key that costs no more than the strongest
 * preset is tried: vmvault makes no other, and a bound on those could lock a holder of
 * a real key out (a repository with five strong keys). Costlier key files, which only a
 * hand or an attacker makes, are tried within this much Argon2id cost in all: four keys
 * of the strong preset (about a second each).
 */
export const KDF_PRESET_MAX_COST = Math.max(...Object.values(KDF_PRESETS).map((p) => p.opsLimit * p.memLimit));
export const KDF_OPEN_BUDGET = 4 * KDF_PRESETS.strong.opsLimit * KDF_PRESETS.strong.memLimit;

export const keyFileSchema = z.object({
  version: z.literal(1),
  created: z.string(),
  label: z.string().optional(),
  kdf: z.object({
    algorithm: z.literal('argon2id13'),
    opsLimit: z.number().int().positive().max(KDF_MAX.opsLimit),
    memLimit: z.number().int().positive().max(KDF_MAX.memLimit),
    salt: z.string(),
  }),
  nonce: z.string(),
  sealed: z.string(),
});
export type KeyFile = z.infer<typeof keyFileSchema>;

const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64');
const unb64 = (s: string) => new Uint8Array(Buffer.from(s, 'base64'));
const adFor = (repoId: string) => new TextEncoder().encode(`vmvault/v1\0${repoId}\0keyfile`);

/**
 * Argon2id, in a short-lived worker thread: WebAssembly memory never shrinks, so
 * running it on the main thread would keep memLimit bytes for the whole process.
 */
function passKey(passphrase: string, salt: Uint8Array, opsLimit: number, memLimit: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL('./kdf-worker.js', import.meta.url), { workerData: { passphrase, salt, opsLimit, memLimit } });
    worker.once('message', (key: Uint8Array) => {
      resolve(key);
      void worker.terminate();
    });
    worker.once('error', reject);
    worker.once('exit', (code) => reject(new Error(`key derivation worker exited with code ${code}`)));
  });
}

export async function sealMaster(master: Uint8Array, passphrase: string, repoId: string, preset: KdfPreset, label?: string): Promise<KeyFile> {
  const { opsLimit, memLimit } = KDF_PRESETS[preset];
  const salt = new Uint8Array(randomBytes(ARGON2_SALT_BYTES));
  const nonce = new Uint8Array(randomBytes(NONCE_BYTES));
  const key = await passKey(passphrase, salt, opsLimit, memLimit);
  const sealed = xchachaEncrypt(key, nonce, master, adFor(repoId));
  return {
    version: 1,
    created: new Date().toISOString(),
    ...(label ? { label } : {}),
    kdf: { algorithm: 'argon2id13', opsLimit, memLimit, salt: b64(salt) },
    nonce: b64(nonce),
    sealed: b64(sealed),
  };
}

/** The master secret, or undefined when the passphrase does not open this key file. */
export async function openMaster(file: KeyFile, passphrase: string, repoId: string): Promise<Uint8Array | undefined> {
  const key = await passKey(passphrase, unb64(file.kdf.salt), file.kdf.opsLimit, file.kdf.memLimit);
  const plain = xchachaDecrypt(key, unb64(file.nonce), unb64(file.sealed), adFor(repoId));
  return plain && plain.length === MASTER_BYTES ? new Uint8Array(plain) : undefined;
}

/** MAC of a string under macKey, hex. */
export function mac(macKey: Uint8Array, text: string): string {
  return blake2b(32, new TextEncoder().encode(text), macKey).toString('hex');
}

const HEX = /^[0-9a-fA-F]*$/;

export function constantTimeEqualHex(a: string, b: string): boolean {
  if (a.length !== b.length || a.length % 2 !== 0 || !HEX.test(a) || !HEX.test(b)) return false;
  return timingSafeEqual(Buffer.from(a, 'hex'), Buffer.from(b, 'hex'));
}

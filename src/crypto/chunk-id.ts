/**
 * Chunk ids: keyed BLAKE3 (repository format 3), HMAC-SHA-256 (format 2) or keyed
 * BLAKE2b-256 (format 1) of a chunk's plaintext under the repository's id subkey
 * (crypto/keys.ts). BLAKE3 is native code (@napi-rs/blake-hash, the reference Rust
 * implementation), loaded on first use; so is BLAKE2b (crypto/blake2b.ts), whose
 * libsodium fallback a thread loads with `blake2bReady()`.
 */
import { createHmac } from 'node:crypto';
import { createRequire } from 'node:module';
import { VmvaultError } from '../errors.js';
import { blake2b } from './blake2b.js';

/**
 * How chunk ids are computed. A repository keeps its function for life: the same data
 * must get the same id in every backup. Speeds on the bench machine, 4 MiB chunks, one
 * core: keyed BLAKE3 7,500 MiB/s (AVX-512), HMAC-SHA-256 1,600 MiB/s (SHA extensions),
 * keyed BLAKE2b (format 1) about 900 MiB/s in libsodium's WebAssembly. Hashing every byte read is a fifth of
 * a full backup's CPU with HMAC-SHA-256, and of a restore's or a verify's too.
 */
export type ChunkIdHash = 'blake2b' | 'hmac-sha256' | 'blake3';

interface Blake3Hasher { update(data: Uint8Array): Blake3Hasher; digest(format: 'hex'): string }
interface Blake3Module { Blake3Hasher: { newKeyed(key: Buffer): Blake3Hasher } }
let blake3: Blake3Module | Error | undefined;

function loadBlake3(): Blake3Module | Error {
  try {
    return (blake3 ??= createRequire(import.meta.url)('@napi-rs/blake-hash') as Blake3Module);
  } catch (err) {
    return (blake3 = err instanceof Error ? err : new Error(String(err)));
  }
}

/**
 * Why this host cannot compute keyed BLAKE3, or undefined when it can. Not the loader's
 * own words: when only the platform's binary is missing, napi-rs's first line blames npm
 * and suggests deleting the lock file.
 */
export function blake3Unavailable(): string | undefined {
  const m = loadBlake3();
  if (!(m instanceof Error)) return undefined;
  return (m as { code?: unknown }).code === 'MODULE_NOT_FOUND' && m.message.includes("'@napi-rs/blake-hash'")
    ? 'the package is not installed'
    : `it has no build that loads on ${process.platform}-${process.arch}`;
}

function blake3Keyed(key: Uint8Array, data: Uint8Array): string {
  const m = loadBlake3();
  if (m instanceof Error) {
    throw new VmvaultError('UNSUPPORTED', `this repository's chunk ids are keyed BLAKE3 (format 3), and this host cannot load its native code (@napi-rs/blake-hash: ${blake3Unavailable()}): reinstall vmvault's packages (npm ci), or run vmvault where that package has a build (Linux or macOS on x86-64 or arm64, Windows, FreeBSD on x86-64); nothing was changed`);
  }
  return m.Blake3Hasher.newKeyed(Buffer.from(key.buffer, key.byteOffset, key.byteLength)).update(data).digest('hex');
}

export interface ChunkIdKey { idKey: Uint8Array; idHash: ChunkIdHash }

export function chunkId(keys: ChunkIdKey, data: Uint8Array): string {
  if (keys.idHash === 'blake3') return blake3Keyed(keys.idKey, data);
  if (keys.idHash === 'hmac-sha256') return createHmac('sha256', keys.idKey).update(data).digest('hex');
  return Buffer.from(blake2b(32, data, keys.idKey)).toString('hex');
}

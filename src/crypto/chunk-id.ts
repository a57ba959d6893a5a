/**
 * Chunk ids: keyed BLAKE3 (repository format 3), HMAC-SHA-256 (format 2) or keyed
 * BLAKE2b-256 (format 1) of a chunk's plaintext under the repository's id subkey
 * (crypto/keys.ts). BLAKE3 is native code (@napi-rs/blake-hash, the reference Rust
 * implementation, loaded by crypto/blake-hash.ts on first use); so is BLAKE2b (crypto/blake2b.ts), whose
 * libsodium fallback a thread loads with `blake2bReady()`.
 */
import { createHmac } from 'node:crypto';
import { asBuffer } from '../bytes.js';
import { VmvaultError } from '../errors.js';
import { blake2b } from './blake2b.js';
import { blakeHash, blakeHashUnavailable } from './blake-hash.js';

/**
 * How chunk ids are computed. A repository keeps its function for life: the same data
 * must get the same id in every backup. Speeds on the bench machine, 4 MiB chunks, one
 * core: keyed BLAKE3 7,500 MiB/s (AVX-512), HMAC-SHA-256 1,600 MiB/s (SHA extensions),
 * keyed BLAKE2b (format 1) about 900 MiB/s in libsodium's WebAssembly. Hashing every byte read is a fifth of
 * a full backup's CPU with HMAC-SHA-256, and of a restore's or a verify's too.
 */
export type ChunkIdHash = 'blake2b' | 'hmac-sha256' | 'blake3';

/** Why this host cannot compute keyed BLAKE3, or undefined when it can. */
export const blake3Unavailable = blakeHashUnavailable;

function blake3Keyed(key: Uint8Array, data: Uint8Array): string {
  const m = blakeHash();
  if (m instanceof Error) {
    throw new VmvaultError('UNSUPPORTED', `this repository's chunk ids are keyed BLAKE3 (format 3), and this host cannot load its native code (@napi-rs/blake-hash: ${blake3Unavailable()}): reinstall vmvault's packages (npm ci), or run vmvault where that package has a build (Linux or macOS on x86-64 or arm64, Windows, FreeBSD on x86-64); nothing was changed`);
  }
  return m.Blake3Hasher.newKeyed(asBuffer(key)).update(data).digest('hex');
}

export interface ChunkIdKey { idKey: Uint8Array; idHash: ChunkIdHash }

export function chunkId(keys: ChunkIdKey, data: Uint8Array): string {
  if (keys.idHash === 'blake3') return blake3Keyed(keys.idKey, data);
  if (keys.idHash === 'hmac-sha256') return createHmac('sha256', keys.idKey).update(data).digest('hex');
  return blake2b(32, data, keys.idKey).toString('hex');
}

/**
 * Chunk ids: HMAC-SHA-256 (repository format 2) or keyed BLAKE2b-256 (format 1) of a
 * chunk's plaintext under the repository's id subkey (crypto/keys.ts). BLAKE2b comes
 * from libsodium's WebAssembly, which this module does not load by itself: the main
 * thread has it (keys.ts registers it), and a chunk worker of a format-1 repository
 * loads it at start (`loadBlake2b`). A format-2 worker never loads it.
 */
import { createHmac } from 'node:crypto';

/**
 * How chunk ids are computed: keyed BLAKE2b-256 (libsodium's generichash) in format-1
 * repositories, HMAC-SHA-256 in format-2 ones (native, and on SHA extensions where the
 * CPU has them: about 1.8 times as fast here as BLAKE2b in WebAssembly). A repository
 * keeps its function for life: the same data must get the same id in every backup.
 */
export type ChunkIdHash = 'blake2b' | 'hmac-sha256';

export interface ChunkIdKey { idKey: Uint8Array; idHash: ChunkIdHash }

type Blake2b = (key: Uint8Array, data: Uint8Array) => string;
let blake2b: Blake2b | undefined;

/** Makes keyed BLAKE2b available to chunkId (keys.ts does, with the libsodium it loads anyway). */
export function useBlake2b(fn: Blake2b): void {
  blake2b = fn;
}

/** Loads libsodium for keyed BLAKE2b: for a thread that has not loaded it. */
export async function loadBlake2b(): Promise<void> {
  const { sodium } = await import('./sodium.js');
  useBlake2b((key, data) => sodium.crypto_generichash(32, data, key, 'hex'));
}

export function chunkId(keys: ChunkIdKey, data: Uint8Array): string {
  if (keys.idHash === 'hmac-sha256') return createHmac('sha256', keys.idKey).update(data).digest('hex');
  if (!blake2b) throw new Error('keyed BLAKE2b is not loaded in this thread (loadBlake2b)');
  return blake2b(keys.idKey, data);
}

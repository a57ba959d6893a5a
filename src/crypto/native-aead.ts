/**
 * libsodium's own XChaCha20-Poly1305, native (sodium-native), loaded once per thread on
 * first use, for crypto/seal.ts. It seals and opens an object where it lies (the
 * ciphertext over the plaintext and back), so a chunk costs no output buffer: Node's
 * cipher returns a new one for every call, which a 4 MiB chunk pays in fresh memory
 * the allocator zeroes and the kernel faults in. Where the package cannot load, seal.ts
 * uses Node's cipher and copies: the same bytes, more memory traffic.
 */
import { createRequire } from 'node:module';

/** The part of the package vmvault uses. Both throw when they fail (decrypt: the object does not authenticate). */
export interface NativeAead {
  crypto_aead_xchacha20poly1305_ietf_encrypt(c: Uint8Array, m: Uint8Array, ad: Uint8Array | null, nsec: null, npub: Uint8Array, k: Uint8Array): number;
  crypto_aead_xchacha20poly1305_ietf_decrypt(m: Uint8Array, nsec: null, c: Uint8Array, ad: Uint8Array | null, npub: Uint8Array, k: Uint8Array): number;
}

let loaded: NativeAead | null | undefined;
let disabled = false;

/** The package, or undefined where it does not load (or is turned off). */
export function nativeAead(): NativeAead | undefined {
  if (disabled) return undefined;
  if (loaded === undefined) {
    try {
      loaded = createRequire(import.meta.url)('sodium-native') as NativeAead;
    } catch {
      loaded = null;
    }
  }
  return loaded ?? undefined;
}

/** Turns the native code off (or back on) in this thread: for tests and benchmarks of the fallback. */
export function useNativeAead(on: boolean): void {
  disabled = !on;
}

/**
 * BLAKE2b exactly as libsodium computes it for vmvault: crypto_generichash (keyed or
 * not: the config MAC, format-1 chunk ids, the paper key's checksum) and
 * crypto_kdf_derive_from_key (every repository subkey from the master secret).
 *
 * Native code from @napi-rs/blake-hash (blake2b_simd), which starts in about 10 ms,
 * where libsodium's WebAssembly took 65 ms of every command's start on the bench
 * machine. libsodium stays the fallback, for a host where that package cannot load:
 * `await blake2bReady()` (Repository.init, open and importPaper do) loads whichever is there; the
 * functions below are synchronous after that. test/crypto/blake2b.test.ts checks both
 * against each other.
 */
import { asBuffer } from '../bytes.js';
import { blakeHash } from './blake-hash.js';
import { loadSodium } from './sodium-loader.js';

interface Impl {
  hash(outlen: number, data: Uint8Array, key: Uint8Array | null): Buffer;
  derive(outlen: number, id: number, context: string, master: Uint8Array): Buffer;
}

let impl: Impl | undefined;

function loadNative(): Impl | undefined {
  const m = blakeHash();
  if (m instanceof Error) return undefined;
  const run = (outlen: number, data: Uint8Array, key: Uint8Array | null, salt?: Buffer, personal?: Buffer): Buffer => {
    const p = new m.Blake2BParam();
    p.hashLength(outlen);
    if (key && key.length) p.key(asBuffer(key));
    if (salt) p.salt(salt);
    if (personal) p.personal(personal);
    return m.Blake2BHasher.withParams(p).update(data).digestBuffer();
  };
  return {
    hash: (outlen, data, key) => run(outlen, data, key),
    // libsodium's crypto_kdf_blake2b_derive_from_key: the subkey id as the salt's first
    // 8 bytes (little-endian), the 8-byte context as the personalization, the master as
    // the key, no input; salt and personalization padded with zeros to 16 bytes.
    derive: (outlen, id, context, master) => {
      const salt = Buffer.alloc(16);
      salt.writeBigUInt64LE(BigInt(id));
      const personal = Buffer.alloc(16);
      personal.write(context, 'latin1');
      return run(outlen, new Uint8Array(0), master, salt, personal);
    },
  };
}

/** Loads a BLAKE2b for this thread: native where the package loads, libsodium's otherwise. */
export async function blake2bReady(): Promise<void> {
  if ((impl ??= loadNative())) return;
  const sodium = await loadSodium();
  impl = {
    hash: (outlen, data, key) => asBuffer(sodium.crypto_generichash(outlen, data, key)),
    derive: (outlen, id, context, master) => asBuffer(sodium.crypto_kdf_derive_from_key(outlen, id, context, master)),
  };
}

function loaded(): Impl {
  if ((impl ??= loadNative())) return impl;
  throw new Error('BLAKE2b is not loaded in this thread: await blake2bReady() first');
}

/** crypto_generichash: BLAKE2b of `data`, `outlen` bytes, keyed when `key` is given. */
export function blake2b(outlen: number, data: Uint8Array, key: Uint8Array | null): Buffer {
  return loaded().hash(outlen, data, key);
}

/** crypto_kdf_derive_from_key: subkey `id` of `master` under the 8-character `context`. */
export function kdfDerive(outlen: number, id: number, context: string, master: Uint8Array): Buffer {
  // libsodium's checks, which the native call would not make (an empty key there means unkeyed).
  if (context.length !== 8 || !/^[\x20-\x7e]*$/.test(context)) throw new RangeError(`a KDF context is 8 ASCII characters, not ${JSON.stringify(context)}`);
  if (master.length !== 32) throw new RangeError(`a KDF master key is 32 bytes, not ${master.length}`);
  return loaded().derive(outlen, id, context, master);
}

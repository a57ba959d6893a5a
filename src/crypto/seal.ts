/**
 * Sealing and opening of repository objects: XChaCha20-Poly1305 (IETF) with a
 * random 24-byte nonce per object, and additional data that binds the repository
 * id, the object type and the object id, so an object can be neither moved to
 * another name nor swapped between repositories.
 *
 * Layout of a sealed object: magic "VV" | format 0x01 | type tag | nonce (24) | ciphertext+tag.
 *
 * Two ways to the same bytes. Chunks, sealed and opened in place in the chunk threads
 * (`sealInPlace`, `openInPlace`), use libsodium's own native code (sodium-native,
 * crypto/native-aead.ts), which writes where the bytes lie. Everything else (`seal`,
 * `open`), and chunks where that package does not load, computes the AEAD as libsodium
 * defines XChaCha20-Poly1305: HChaCha20 (crypto/hchacha20.ts) derives a subkey from the
 * key and the first 16 nonce bytes, then Node's OpenSSL runs ChaCha20-Poly1305 (IETF)
 * with nonce 0x00000000 || nonce[16..24]. Either output is byte-for-byte what
 * crypto_aead_xchacha20poly1305_ietf_encrypt produces (checked in test/crypto).
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { IntegrityError, VmvaultError, errorMessage } from '../errors.js';
import { hchacha20 } from './hchacha20.js';
import { nativeAead } from './native-aead.js';
import { copyBytes } from '../bytes.js';

/** `health`: verification records and quarantined chunks (repo/health.ts); `index`: the chunk index (repo/chunk-index.ts). */
export type ObjectType = 'chunk' | 'manifest' | 'keyfile' | 'lock' | 'health' | 'index';

const TYPE_TAG: Record<ObjectType, number> = { chunk: 1, manifest: 2, keyfile: 3, lock: 4, health: 5, index: 6 };
const HEADER = 4;
export const NONCE_BYTES = 24;
const TAG_BYTES = 16;
/** Bytes a sealed object adds to its plaintext. */
export const SEAL_OVERHEAD = HEADER + NONCE_BYTES + TAG_BYTES;
/** Where in a sealed object its ciphertext starts (and, sealed or opened in place, the plaintext). */
export const PLAIN_AT = HEADER + NONCE_BYTES;

const encoder = new TextEncoder();

/** Additional data: "vmvault/v1" NUL repoId NUL type NUL objectId. */
export function additionalData(repoId: string, type: ObjectType, objectId: string): Uint8Array {
  return encoder.encode(`vmvault/v1\0${repoId}\0${type}\0${objectId}`);
}

function subkeyAndNonce(key: Uint8Array, nonce: Uint8Array): { subkey: Uint8Array; iv: Buffer } {
  const subkey = hchacha20(key, nonce.subarray(0, 16));
  const iv = Buffer.alloc(12);
  iv.set(nonce.subarray(16, 24), 4);
  return { subkey, iv };
}

/** Raw XChaCha20-Poly1305 encryption: returns ciphertext || tag. */
export function xchachaEncrypt(key: Uint8Array, nonce: Uint8Array, plaintext: Uint8Array, ad: Uint8Array): Buffer {
  const { subkey, iv } = subkeyAndNonce(key, nonce);
  const cipher = createCipheriv('chacha20-poly1305', subkey, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(ad, { plaintextLength: plaintext.length });
  const out = Buffer.allocUnsafe(plaintext.length + TAG_BYTES);
  const body = cipher.update(plaintext);
  body.copy(out, 0);
  const fin = cipher.final();
  fin.copy(out, body.length);
  cipher.getAuthTag().copy(out, plaintext.length);
  return out;
}

/** Raw XChaCha20-Poly1305 decryption of ciphertext || tag; undefined when it does not authenticate. */
export function xchachaDecrypt(key: Uint8Array, nonce: Uint8Array, sealed: Uint8Array, ad: Uint8Array): Buffer | undefined {
  if (sealed.length < TAG_BYTES) return undefined;
  const { subkey, iv } = subkeyAndNonce(key, nonce);
  const decipher = createDecipheriv('chacha20-poly1305', subkey, iv, { authTagLength: TAG_BYTES });
  decipher.setAAD(ad, { plaintextLength: sealed.length - TAG_BYTES });
  decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  const body = decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES));
  try {
    const fin = decipher.final();
    return fin.length ? Buffer.concat([body, fin]) : body;
  } catch {
    return undefined;
  }
}

/** Seals `plaintext` into a new object (manifests, locks, index and health objects: Node's cipher, on any thread). */
export function seal(key: Uint8Array, type: ObjectType, plaintext: Uint8Array, ad: Uint8Array): Buffer {
  const out = Buffer.allocUnsafeSlow(SEAL_OVERHEAD + plaintext.length);
  copyBytes(xchachaEncrypt(key, writeHeader(out, type), plaintext, ad), out, PLAIN_AT);
  return out;
}

/**
 * Seals in place: `buf` holds the plaintext at [PLAIN_AT, PLAIN_AT + length), with room
 * for the tag after it; the header and nonce are written before it, the ciphertext over
 * it and the tag after. Returns the sealed object, a view of `buf`: byte for byte what
 * `seal` makes of the same plaintext and nonce. Native code encrypts where the bytes
 * lie; without it, Node's cipher makes a copy that is written back.
 */
export function sealInPlace(key: Uint8Array, type: ObjectType, buf: Uint8Array, length: number, ad: Uint8Array): Buffer {
  if (buf.length < SEAL_OVERHEAD + length) throw new RangeError(`${SEAL_OVERHEAD + length} bytes do not fit in ${buf.length}`);
  const out = Buffer.from(buf.buffer, buf.byteOffset, SEAL_OVERHEAD + length);
  const nonce = writeHeader(out, type);
  const plain = out.subarray(PLAIN_AT, PLAIN_AT + length);
  const aead = nativeAead();
  if (aead) aead.crypto_aead_xchacha20poly1305_ietf_encrypt(out.subarray(PLAIN_AT), plain, ad, null, nonce, key);
  else copyBytes(xchachaEncrypt(key, nonce, plain, ad), out, PLAIN_AT);
  return out;
}

/** Writes an object's header and a fresh random nonce at the start of `out`; returns the nonce. */
function writeHeader(out: Buffer, type: ObjectType): Buffer {
  out[0] = 0x56; // V
  out[1] = 0x56; // V
  out[2] = 1;
  out[3] = TYPE_TAG[type];
  const nonce = randomBytes(NONCE_BYTES);
  nonce.copy(out, HEADER);
  return nonce;
}

/**
 * Opens a sealed object or throws IntegrityError naming `what` (e.g. the object's
 * storage name): a wrong key, a flipped bit, a truncated object and an object
 * stored under another name all fail here.
 */
export function open(key: Uint8Array, type: ObjectType, sealed: Uint8Array, ad: Uint8Array, what: string): Buffer {
  checkHeader(type, sealed, what);
  const nonce = sealed.subarray(HEADER, HEADER + NONCE_BYTES);
  const plain = xchachaDecrypt(key, nonce, sealed.subarray(PLAIN_AT), ad);
  if (!plain) throw notAuthentic(what);
  return plain;
}

/**
 * Opens in place: the plaintext is written over the ciphertext, and the result is a
 * view of `sealed` at PLAIN_AT. Fails as `open` does; after a failure `sealed` no longer
 * holds the object (libsodium checks the tag first and then zeroes the whole plaintext
 * range, the ciphertext itself here).
 */
export function openInPlace(key: Uint8Array, type: ObjectType, sealed: Uint8Array, ad: Uint8Array, what: string): Buffer {
  checkHeader(type, sealed, what);
  const plain = Buffer.from(sealed.buffer, sealed.byteOffset + PLAIN_AT, sealed.length - SEAL_OVERHEAD);
  const aead = nativeAead();
  if (!aead) {
    copyBytes(open(key, type, sealed, ad, what), plain);
    return plain;
  }
  try {
    aead.crypto_aead_xchacha20poly1305_ietf_decrypt(plain, null, sealed.subarray(PLAIN_AT), ad, sealed.subarray(HEADER, PLAIN_AT), key);
  } catch (err) {
    // Only a tag that does not verify is the object's fault; anything else (a key of the
    // wrong size, an argument the package refuses) is vmvault's, and must not make a
    // verification call an intact chunk damaged.
    if (errorMessage(err) === NATIVE_NOT_VERIFIED) throw notAuthentic(what);
    throw new VmvaultError('INTERNAL', `opening ${what} failed in libsodium's native code: ${errorMessage(err)}`, { cause: err });
  }
  return plain;
}

/** What sodium-native throws, and only throws, when a tag does not verify. */
const NATIVE_NOT_VERIFIED = 'could not verify data';

function checkHeader(type: ObjectType, sealed: Uint8Array, what: string): void {
  if (sealed.length < SEAL_OVERHEAD || sealed[0] !== 0x56 || sealed[1] !== 0x56) {
    throw new IntegrityError(`${what} is damaged: it is not a vmvault object (bad header or too short)`);
  }
  if (sealed[2] !== 1) throw new IntegrityError(`${what} has unknown object format ${sealed[2]}: upgrade vmvault`);
  if (sealed[3] !== TYPE_TAG[type]) throw new IntegrityError(`${what} is damaged: it is not a ${type} object`);
}

function notAuthentic(what: string): IntegrityError {
  return new IntegrityError(`${what} failed authentication: it was modified, damaged, or stored under another name`);
}

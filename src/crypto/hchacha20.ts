/**
 * HChaCha20 (draft-irtf-cfrg-xchacha, section 2.2): the subkey of XChaCha20 from a
 * 32-byte key and the first 16 bytes of the nonce. Twenty rounds of ChaCha on a
 * 64-byte state, once per sealed object: small enough to do here, so that the
 * threads that seal chunks need no WebAssembly library (checked against libsodium's
 * crypto_core_hchacha20 in test/crypto/seal.test.ts).
 */
const SIGMA = [0x61707865, 0x3320646e, 0x79622d32, 0x6b206574];

export function hchacha20(key: Uint8Array, nonce16: Uint8Array): Uint8Array {
  if (key.length !== 32 || nonce16.length !== 16) throw new RangeError('HChaCha20 takes a 32-byte key and a 16-byte nonce');
  const k = new DataView(key.buffer, key.byteOffset, 32);
  const n = new DataView(nonce16.buffer, nonce16.byteOffset, 16);
  const x = new Uint32Array(16);
  x.set(SIGMA);
  for (let i = 0; i < 8; i++) x[4 + i] = k.getUint32(i * 4, true);
  for (let i = 0; i < 4; i++) x[12 + i] = n.getUint32(i * 4, true);
  const rotl = (v: number, c: number) => ((v << c) | (v >>> (32 - c))) >>> 0;
  const qr = (a: number, b: number, c: number, d: number) => {
    x[a] = (x[a]! + x[b]!) >>> 0; x[d] = rotl(x[d]! ^ x[a]!, 16);
    x[c] = (x[c]! + x[d]!) >>> 0; x[b] = rotl(x[b]! ^ x[c]!, 12);
    x[a] = (x[a]! + x[b]!) >>> 0; x[d] = rotl(x[d]! ^ x[a]!, 8);
    x[c] = (x[c]! + x[d]!) >>> 0; x[b] = rotl(x[b]! ^ x[c]!, 7);
  };
  for (let i = 0; i < 10; i++) {
    qr(0, 4, 8, 12); qr(1, 5, 9, 13); qr(2, 6, 10, 14); qr(3, 7, 11, 15);
    qr(0, 5, 10, 15); qr(1, 6, 11, 12); qr(2, 7, 8, 13); qr(3, 4, 9, 14);
  }
  const out = new Uint8Array(32);
  const o = new DataView(out.buffer);
  for (let i = 0; i < 4; i++) o.setUint32(i * 4, x[i]!, true);
  for (let i = 0; i < 4; i++) o.setUint32(16 + i * 4, x[12 + i]!, true);
  return out;
}

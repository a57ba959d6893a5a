import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { sodium } from '../../src/crypto/sodium.js';
import { PLAIN_AT, SEAL_OVERHEAD, additionalData, open, openInPlace, seal, sealInPlace, xchachaDecrypt, xchachaEncrypt } from '../../src/crypto/seal.js';
import { nativeAead, useNativeAead } from '../../src/crypto/native-aead.js';
import { IntegrityError } from '../../src/errors.js';

test('xchacha output is exactly libsodium crypto_aead_xchacha20poly1305_ietf', () => {
  for (const size of [0, 1, 63, 64, 65, 4096, 1 << 20]) {
    const key = new Uint8Array(randomBytes(32));
    const nonce = new Uint8Array(randomBytes(24));
    const msg = new Uint8Array(randomBytes(size));
    const ad = new Uint8Array(randomBytes(17));
    const ours = xchachaEncrypt(key, nonce, msg, ad);
    const theirs = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(msg, ad, null, nonce, key);
    assert.deepEqual(new Uint8Array(ours), theirs, `size ${size}`);
    assert.deepEqual(new Uint8Array(xchachaDecrypt(key, nonce, theirs, ad)!), msg);
  }
});

test('open rejects a flipped bit, a wrong object id, a wrong type and truncation', () => {
  const key = new Uint8Array(randomBytes(32));
  const ad = additionalData('repo1', 'chunk', 'aa');
  const sealed = seal(key, 'chunk', Buffer.from('hello world'), ad);
  assert.equal(open(key, 'chunk', sealed, ad, 'x').toString(), 'hello world');
  for (let i = 0; i < sealed.length; i++) {
    const bad = Buffer.from(sealed);
    bad[i]! ^= 0x01;
    assert.throws(() => open(key, 'chunk', bad, ad, 'obj'), IntegrityError, `flip at ${i}`);
  }
  assert.throws(() => open(key, 'chunk', sealed, additionalData('repo1', 'chunk', 'bb'), 'obj'), /stored under another name/);
  assert.throws(() => open(key, 'chunk', sealed, additionalData('repo2', 'chunk', 'aa'), 'obj'), IntegrityError);
  assert.throws(() => open(key, 'manifest', sealed, ad, 'obj'), /not a manifest object/);
  assert.throws(() => open(key, 'chunk', sealed.subarray(0, 20), ad, 'obj'), /too short/);
  assert.throws(() => open(new Uint8Array(32), 'chunk', sealed, ad, 'obj'), IntegrityError);
});

test('two seals of the same plaintext differ (random nonce)', () => {
  const key = new Uint8Array(randomBytes(32));
  const ad = additionalData('r', 'chunk', 'id');
  assert.notDeepEqual(seal(key, 'chunk', Buffer.from('x'), ad), seal(key, 'chunk', Buffer.from('x'), ad));
});

test('HChaCha20 gives libsodium\'s subkeys (the draft\'s test vector, and 200 random keys and nonces)', async () => {
  const { hchacha20 } = await import('../../src/crypto/hchacha20.js');
  const { sodium } = await import('../../src/crypto/sodium.js');
  // draft-irtf-cfrg-xchacha-03, section 2.2.1
  const key = Buffer.from('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex');
  const nonce = Buffer.from('000000090000004a0000000031415927', 'hex');
  assert.equal(Buffer.from(hchacha20(key, nonce)).toString('hex'), '82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc');
  for (let i = 0; i < 200; i++) {
    const k = randomBytes(32);
    const n = randomBytes(16);
    assert.deepEqual(Buffer.from(hchacha20(k, n)), Buffer.from(sodium.crypto_core_hchacha20(n, k, null)));
  }
  assert.throws(() => hchacha20(randomBytes(31), randomBytes(16)), RangeError);
});

test('the native AEAD (sodium-native) loads here: the in-place path is the one measured and shipped', () => {
  assert.ok(nativeAead(), 'sodium-native did not load: run npm ci');
});

test("a native failure that is not the object's (a key of the wrong size) is vmvault's error, never a damaged object", () => {
  const key = new Uint8Array(randomBytes(32));
  const ad = additionalData('repo1', 'chunk', 'aa');
  const sealed = Buffer.from(seal(key, 'chunk', Buffer.from('hello world'), ad));
  assert.throws(() => openInPlace(new Uint8Array(31), 'chunk', Buffer.from(sealed), ad, 'obj'), (err: Error & { code?: string }) => {
    assert.ok(!(err instanceof IntegrityError), `reported as damage: ${err.message}`);
    assert.equal(err.code, 'INTERNAL');
    assert.match(err.message, /opening obj failed in libsodium's native code: k must be/);
    return true;
  });
  assert.deepEqual(openInPlace(key, 'chunk', sealed, ad, 'obj'), Buffer.from('hello world'), 'the object itself is fine');
});

for (const native of [true, false]) {
  test(`sealed and opened in place (${native ? 'native libsodium' : "fallback: Node's cipher"}): the same objects as seal and open, in shared memory too, and every damage refused`, () => {
    useNativeAead(native);
    try {
      const key = new Uint8Array(randomBytes(32));
      const ad = additionalData('repo1', 'chunk', 'aa');
      for (const size of [0, 1, 63, 64, 65, 4096, 1 << 20]) {
        const msg = randomBytes(size);
        // In a shared memory at an odd offset, as a pool slot's view may be; bytes around it stay untouched.
        const mem = new SharedArrayBuffer(SEAL_OVERHEAD + size + 64);
        const around = new Uint8Array(mem);
        around.fill(0xee);
        const buf = new Uint8Array(mem, 7, SEAL_OVERHEAD + size);
        buf.set(msg, PLAIN_AT);
        const sealed = sealInPlace(key, 'chunk', buf, size, ad);
        assert.equal(sealed.length, SEAL_OVERHEAD + size);
        assert.equal(sealed.buffer, mem, 'a view of the memory given, not a copy');
        assert.ok(around.subarray(0, 7).every((b) => b === 0xee) && around.subarray(7 + SEAL_OVERHEAD + size).every((b) => b === 0xee), `nothing written outside (size ${size})`);
        assert.deepEqual(open(key, 'chunk', sealed, ad, 'x'), msg, `open reads what sealInPlace made (size ${size})`);
        // libsodium itself opens it: nonce at 4, ciphertext and tag after.
        assert.deepEqual(Buffer.from(sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(null, new Uint8Array(sealed.subarray(PLAIN_AT)), ad, new Uint8Array(sealed.subarray(4, PLAIN_AT)), key)), msg);
        const other = Buffer.from(seal(key, 'chunk', msg, ad));
        const opened = openInPlace(key, 'chunk', other, ad, 'x');
        assert.deepEqual(opened, msg, `openInPlace reads what seal made (size ${size})`);
        assert.equal(opened.buffer, other.buffer, 'opened where it lay');
        assert.equal(opened.byteOffset, other.byteOffset + PLAIN_AT);
      }
      const sealed = Buffer.from(seal(key, 'chunk', Buffer.from('hello world'), ad));
      for (let i = 0; i < sealed.length; i++) {
        const bad = Buffer.from(sealed);
        bad[i]! ^= 0x01;
        assert.throws(() => openInPlace(key, 'chunk', bad, ad, 'obj'), IntegrityError, `flip at ${i}`);
      }
      assert.throws(() => openInPlace(key, 'chunk', Buffer.from(sealed), additionalData('repo1', 'chunk', 'bb'), 'obj'), /obj failed authentication: it was modified, damaged, or stored under another name/);
      assert.throws(() => openInPlace(key, 'manifest', Buffer.from(sealed), ad, 'obj'), /not a manifest object/);
      assert.throws(() => openInPlace(key, 'chunk', Buffer.from(sealed.subarray(0, 20)), ad, 'obj'), /too short/);
      assert.throws(() => sealInPlace(key, 'chunk', Buffer.alloc(SEAL_OVERHEAD + 9), 10, ad), RangeError);
    } finally {
      useNativeAead(true);
    }
  });
}

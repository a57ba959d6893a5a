import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { sodium } from '../../src/crypto/sodium.js';
import { additionalData, open, seal, xchachaDecrypt, xchachaEncrypt } from '../../src/crypto/seal.js';
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

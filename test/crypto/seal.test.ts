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

/**
 * crypto/blake2b.ts (native BLAKE2b) against libsodium, which it replaced on the main
 * thread: crypto_generichash keyed and not, at every output length vmvault uses, and
 * crypto_kdf_derive_from_key for every subkey id, so that no key, MAC, chunk id or
 * paper-key checksum of an existing repository changes.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { blake2b, kdfDerive } from '../../src/crypto/blake2b.js';
import { deriveKeys, generateMaster, mac } from '../../src/crypto/keys.js';
import { sodium } from '../../src/crypto/sodium.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

describe('BLAKE2b', () => {
  test('crypto_generichash: keyed and unkeyed, 16 to 64 bytes out, inputs from empty to 1 MiB and views', () => {
    const lengths = [0, 1, 63, 64, 127, 128, 129, 1000, 1 << 20];
    for (const outlen of [16, 32, 64]) {
      for (const n of lengths) {
        const data = randomBytes(n + 3).subarray(3);
        for (const key of [null, randomBytes(32), randomBytes(16), randomBytes(64)]) {
          assert.equal(hex(blake2b(outlen, data, key)), hex(sodium.crypto_generichash(outlen, data, key)), `out ${outlen}, in ${n}, key ${key?.length ?? 'none'}`);
        }
      }
    }
  });

  test('crypto_kdf_derive_from_key: every subkey id vmvault uses and large ones; deriveKeys and the config MAC as before', () => {
    for (let round = 0; round < 20; round++) {
      const master = generateMaster();
      for (const id of [0, 1, 2, 3, 4, 5, 255, 256, 2 ** 31, 2 ** 40 + 7]) {
        // libsodium's wrapper takes ids past 2^31 as a bigint only.
        const theirs = sodium.crypto_kdf_derive_from_key(32, (id < 2 ** 31 ? id : BigInt(id)) as number, 'vmvault_', master);
        assert.equal(hex(kdfDerive(32, id, 'vmvault_', master)), hex(theirs), `subkey ${id}`);
      }
      assert.equal(hex(kdfDerive(64, 9, 'abcdefgh', master)), hex(sodium.crypto_kdf_derive_from_key(64, 9, 'abcdefgh', master)));
      const keys = deriveKeys(master, 'blake3');
      assert.equal(hex(keys.encKey), hex(sodium.crypto_kdf_derive_from_key(32, 2, 'vmvault_', master)));
      assert.equal(hex(keys.idKey), hex(sodium.crypto_kdf_derive_from_key(32, 5, 'vmvault_', master)));
      assert.equal(mac(keys.macKey, '[2,"x"]'), sodium.crypto_generichash(32, new TextEncoder().encode('[2,"x"]'), keys.macKey, 'hex'));
    }
    // libsodium's own checks: the native call would take an empty master as no key at all.
    assert.throws(() => kdfDerive(32, 1, 'short', generateMaster()), /a KDF context is 8 ASCII characters/);
    assert.throws(() => kdfDerive(32, 1, 'vmvault_', new Uint8Array(0)), /a KDF master key is 32 bytes, not 0/);
  });
});

/**
 * Keyed BLAKE3 chunk ids (format 3) against BLAKE3's own test vectors (keyed_hash in
 * test_vectors.json of the reference repository: the key is the 32 ASCII bytes below,
 * input byte i is i mod 251), across the lengths where its tree changes shape; and
 * the same ids from a chunk thread as from the main thread.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chunkId } from '../../src/crypto/chunk-id.js';
import { ChunkPool } from '../../src/pipeline/pool.js';
import { deriveKeys, generateMaster } from '../../src/crypto/keys.js';

const KEY = Buffer.from('whats the Elvish word for friend');
/** The first 32 bytes of each keyed_hash output, by input length. */
const VECTORS: [number, string][] = [
  [0, '92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26'],
  [1, '6d7878dfff2f485635d39013278ae14f1454b8c0a3a2d34bc1ab38228a80c95b'],
  [1023, 'c951ecdf03288d0fcc96ee3413563d8a6d3589547f2c2fb36d9786470f1b9d6e'],
  [1024, '75c46f6f3d9eb4f55ecaaee480db732e6c2105546f1e675003687c31719c7ba4'],
  [1025, '357dc55de0c7e382c900fd6e320acc04146be01db6a8ce7210b7189bd664ea69'],
  [31744, 'efa53b389ab67c593dba624d898d0f7353ab99e4ac9d42302ee64cbf9939a419'],
  [102400, '1c35d1a5811083fd7119f5d5d1ba027b4d01c0c6c49fb6ff2cf75393ea5db4a7'],
];
const input = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => i % 251));

describe('keyed BLAKE3 chunk ids', () => {
  test("match BLAKE3's keyed_hash test vectors, from Buffers, views into them and shared memory", () => {
    for (const [n, want] of VECTORS) {
      assert.equal(chunkId({ idKey: KEY, idHash: 'blake3' }, input(n)), want, `length ${n}`);
      const padded = Buffer.concat([Buffer.alloc(7, 1), input(n), Buffer.alloc(5, 2)]);
      assert.equal(chunkId({ idKey: KEY, idHash: 'blake3' }, padded.subarray(7, 7 + n)), want, `length ${n}, a view`);
      const shared = new Uint8Array(new SharedArrayBuffer(n + 16), 16, n);
      shared.set(input(n));
      assert.equal(chunkId({ idKey: KEY, idHash: 'blake3' }, shared), want, `length ${n}, shared memory`);
    }
    // A key given as a view into a larger buffer is the view's bytes only.
    const keyView = Buffer.concat([Buffer.alloc(3, 9), KEY]).subarray(3);
    assert.equal(chunkId({ idKey: keyView, idHash: 'blake3' }, input(1)), VECTORS[1]![1]);
  });

  test('a chunk thread computes the same ids as the main thread', async () => {
    const keys = deriveKeys(generateMaster(), 'blake3');
    const chunkKeys = { idKey: keys.idKey, idHash: keys.idHash, encKey: keys.encKey };
    const pool = new ChunkPool({ keys: chunkKeys, repoId: 'r'.repeat(32), level: 1, chunkSize: 1 << 20 }, 1);
    try {
      for (const plain of [randomBytes(1 << 20), Buffer.alloc(300_000, 7)]) {
        const input = await pool.slot();
        plain.copy(input.buffer);
        assert.equal(await pool.hashSlot(input, plain.length), chunkId(keys, plain));
        input.release();
      }
    } finally {
      await pool.close();
    }
  });
});

/**
 * The compressibility check that lets sealing skip zstd (src/repo/compressible.ts):
 * it skips only data zstd would not shrink, and never data zstd shrinks by repeats.
 * Each case is checked against zstd itself (the sealed size with and without the check).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { looksIncompressible } from '../../src/repo/compressible.js';
import { openChunk, sealChunk, type ChunkKeys } from '../../src/repo/chunk.js';
import { chunkId } from '../../src/crypto/chunk-id.js';

const MiB = 1024 * 1024;
const keys: ChunkKeys = { idKey: randomBytes(32), idHash: 'hmac-sha256', encKey: randomBytes(32) };

/** Log-like lines: words, numbers, timestamps; never the same line twice. */
function logText(bytes: number): Buffer {
  const words = ['GET', 'POST', '/api/v1/items', 'user', 'session', 'ok', 'error', 'timeout', 'retry', 'cache', 'miss', 'hit'];
  const parts: string[] = [];
  let n = 0;
  for (let i = 0; n < bytes; i++) {
    const line = `2026-12-01T05:${String(i % 60).padStart(2, '0')}:${String((i * 7) % 60).padStart(2, '0')}.${i} host${i % 17} ${words[i % words.length]} ${words[(i * 5) % words.length]} id=${(i * 2654435761) >>> 0} took ${i % 997}ms\n`;
    parts.push(line);
    n += line.length;
  }
  return Buffer.from(parts.join('')).subarray(0, bytes);
}

/** The sealed size of `data` (zstd level 1, as repositories use), after checking that it opens to `data`. */
function sealedSize(data: Buffer): number {
  const id = chunkId(keys, data);
  const sealed = sealChunk(keys, 'repo', id, data, 1);
  assert.ok(openChunk(keys, 'repo', id, sealed).equals(data), 'the sealed chunk opens to its data');
  return sealed.length;
}

describe('compressibility check', () => {
  test('random data is skipped: it is stored as it is, as zstd would store it', () => {
    const data = randomBytes(4 * MiB);
    assert.equal(looksIncompressible(data), true);
    assert.ok(sealedSize(data) > data.length, 'stored raw (plus the seal)');
  });

  test('text, mostly zeros, and base64 are compressed', () => {
    const halfZero = Buffer.concat([randomBytes(2 * MiB), Buffer.alloc(2 * MiB)]);
    const base64 = Buffer.from(randomBytes(3 * MiB).toString('base64')).subarray(0, 4 * MiB);
    for (const [what, data] of [['log text', logText(4 * MiB)], ['half zeros', halfZero], ['base64', base64]] as const) {
      assert.equal(looksIncompressible(data), false, what);
      assert.ok(sealedSize(data) < data.length * 0.8, `${what} shrinks`);
    }
  });

  test('random blocks repeated within the chunk are compressed (zstd finds the repeats)', () => {
    for (const period of [256 * 1024, 64 * 1024, 4096, 1000, 777]) {
      const block = randomBytes(period);
      const data = Buffer.alloc(4 * MiB);
      for (let at = 0; at < data.length; at += period) block.copy(data, at);
      assert.equal(looksIncompressible(data), false, `period ${period}`);
      assert.ok(sealedSize(data) < data.length / 2, `period ${period} shrinks`);
    }
  });

  test('small inputs always go to zstd', () => {
    assert.equal(looksIncompressible(randomBytes(32 * 1024)), false);
    assert.equal(looksIncompressible(Buffer.alloc(0)), false);
  });
});

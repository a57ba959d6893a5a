/**
 * The chunk pool's output slots (src/pipeline/pool.ts): sealed and opened chunks land
 * in shared slots that are reused once released, results round-trip byte for byte,
 * damaged or oversized chunks are refused with IntegrityError and give their slot
 * back, and a caller that holds every slot makes the next seal wait, not fail.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { ChunkPool } from '../../src/pipeline/pool.js';
import { deriveKeys, generateMaster, chunkId } from '../../src/crypto/keys.js';
import { openChunk, sealChunk } from '../../src/repo/chunk.js';
import { IntegrityError } from '../../src/errors.js';

const CHUNK = 256 * 1024;
const REPO = 'ab'.repeat(16);

function setup() {
  const master = generateMaster();
  const keys = deriveKeys(master, 'hmac-sha256');
  const pool = new ChunkPool({ master, repoId: REPO, level: 1, idHash: 'hmac-sha256', chunkSize: CHUNK }, 2);
  return { keys, pool };
}

const text = (n: number) => Buffer.from('log line: GET /v1/backups 200 12ms\n'.repeat(Math.ceil(n / 35)).slice(0, n));

describe('chunk pool output slots', () => {
  test('seal and open round-trip through slots; the main thread can open what a worker sealed and back', async () => {
    const { keys, pool } = setup();
    try {
      for (const plain of [randomBytes(CHUNK), text(CHUNK), text(1000)]) {
        const { id, data } = await pool.hash(Buffer.from(plain));
        assert.equal(id, chunkId(keys, plain));
        const s = await pool.seal(id!, data);
        const sealed = Buffer.from(s.sealed); // copied before the slot is given back
        s.release();
        assert.deepEqual(openChunk(keys, REPO, id!, sealed), plain, 'a worker-sealed chunk opens on the main thread');
        const o = await pool.openInSlot(id!, sealChunk(keys, REPO, id!, plain, 1));
        assert.deepEqual(Buffer.from(o.plain), plain);
        o.release();
        assert.deepEqual(await pool.open(id!, sealed), plain);
      }
    } finally {
      await pool.close();
    }
  });

  test('damaged and oversized chunks are refused and give their slot back', async () => {
    const { keys, pool } = setup();
    try {
      const plain = randomBytes(CHUNK);
      const id = chunkId(keys, plain);
      const sealed = sealChunk(keys, REPO, id, plain, 1);
      sealed[sealed.length - 20]! ^= 1;
      // More failures than there are slots: each must give its slot back, or the last would wait forever.
      for (let i = 0; i < 40; i++) await assert.rejects(pool.openInSlot(id, Buffer.from(sealed)), IntegrityError);
      // A chunk larger than the repository's chunk size, sealed with the right key, still does not fit a slot.
      const big = randomBytes(CHUNK + 1);
      const bigId = chunkId(keys, big);
      await assert.rejects(pool.openInSlot(bigId, sealChunk(keys, REPO, bigId, big, 1)), /more than a chunk of this repository/);
      const big2 = text(CHUNK * 2);
      const big2Id = chunkId(keys, big2);
      await assert.rejects(pool.openInSlot(big2Id, sealChunk(keys, REPO, big2Id, big2, 1)), /does not decompress into a chunk of this repository/);
      await assert.rejects(pool.seal(bigId, big), /larger than the repository's/);
      const ok = await pool.openInSlot(chunkId(keys, plain), sealChunk(keys, REPO, chunkId(keys, plain), plain, 1));
      ok.release();
    } finally {
      await pool.close();
    }
  });

  test('a caller holding every slot makes the next seal wait for a release, then reuses that slot', async () => {
    const { keys, pool } = setup();
    try {
      const held = [];
      for (let i = 0; i < 32; i++) {
        const plain = randomBytes(1024);
        held.push(await pool.seal(chunkId(keys, plain), plain));
      }
      const plain = randomBytes(1024);
      const id = chunkId(keys, plain);
      let done = false;
      // A copy goes to the pool: a buffer that owns its memory is transferred, and reads empty here afterwards.
      const next = pool.seal(id, Buffer.from(plain)).then((s) => { done = true; return s; });
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(done, false, 'the 33rd seal waits');
      const firstBytes = Buffer.from(held[5]!.sealed);
      held[5]!.release();
      const s = await next;
      assert.equal(s.sealed.buffer, held[5]!.sealed.buffer, 'it reuses the released slot');
      assert.notDeepEqual(Buffer.from(s.sealed.subarray(0, firstBytes.length)), firstBytes);
      assert.deepEqual(openChunk(keys, REPO, id, Buffer.from(s.sealed)), plain);
      s.release();
      for (const h of held) h.release();
    } finally {
      await pool.close();
    }
  });
});

/**
 * The chunk pool's slots (src/pipeline/pool.ts): chunks are hashed and sealed in the
 * slot they were read into, sealed and opened chunks land in output slots that are
 * reused once released, results round-trip byte for byte,
 * damaged or oversized chunks are refused with IntegrityError and give their slot
 * back, and released slots are reused without ever being handed out twice. A pool
 * kept between operations (PoolKeeper) is reused, replaced once broken, and closed
 * after its idle time or when the keeper closes, never under an operation using it.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { ChunkPool, PoolKeeper, type Slot } from '../../src/pipeline/pool.js';
import { deriveKeys, generateMaster, chunkId } from '../../src/crypto/keys.js';
import { openChunk, sealChunk, sealedChunkBound } from '../../src/repo/chunk.js';
import { useNativeAead } from '../../src/crypto/native-aead.js';
import { prestartChunkThreads, prestartedCount } from '../../src/pipeline/prestart.js';
import { IntegrityError } from '../../src/errors.js';
import { sodium } from '../../src/crypto/sodium.js';

const CHUNK = 256 * 1024;
const REPO = 'ab'.repeat(16);

function setup() {
  const keys = deriveKeys(generateMaster(), 'hmac-sha256');
  const pool = new ChunkPool({ keys: { idKey: keys.idKey, idHash: keys.idHash, encKey: keys.encKey }, repoId: REPO, level: 1, chunkSize: CHUNK }, 2);
  return { keys, pool };
}

/** As a backup does: seals `plain` from its slot `input`, releases the input, checks the sealed chunk opens to `plain`, releases the output. */
async function sealChecked(keys: ReturnType<typeof setup>['keys'], pool: ChunkPool, input: Slot, plain: Buffer): Promise<void> {
  const id = chunkId(keys, plain);
  const s = await pool.sealSlot(id, input, plain.length);
  input.release();
  assert.deepEqual(openChunk(keys, REPO, id, Buffer.from(s.sealed)), plain);
  s.release();
}

const text = (n: number) => Buffer.from('log line: GET /v1/backups 200 12ms\n'.repeat(Math.ceil(n / 35)).slice(0, n));

describe('chunk pool output slots', () => {
  test('a chunk read into a slot is hashed and sealed where it lies; seal and open round-trip, on either side', async () => {
    const { keys, pool } = setup();
    try {
      for (const plain of [randomBytes(CHUNK), text(CHUNK), text(1000), Buffer.alloc(CHUNK)]) {
        const input = await pool.slot();
        plain.copy(input.buffer);
        const id = await pool.hashSlot(input, plain.length);
        if (plain.every((b) => b === 0)) {
          assert.equal(id, null, 'all zeros: no id');
          input.release();
          continue;
        }
        assert.equal(id, chunkId(keys, plain));
        const s = await pool.sealSlot(id!, input, plain.length);
        input.release();
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

  test('a sealed chunk in a slot is opened where it lies; sealed bytes the caller shares are left as they were', async () => {
    const { keys, pool } = setup();
    try {
      for (const plain of [randomBytes(CHUNK), text(CHUNK), randomBytes(1000), text(1000), randomBytes(CHUNK - 1)]) {
        const id = chunkId(keys, plain);
        const sealed = sealChunk(keys, REPO, id, plain, 1);
        const input = await pool.slot();
        sealed.copy(input.buffer);
        const o = await pool.openSlot(id, input, sealed.length);
        assert.deepEqual(Buffer.from(o.plain), plain);
        assert.notDeepEqual(input.buffer.subarray(0, sealed.length), sealed, 'decrypted in the input slot itself');
        input.release();
        o.release();
        const shared = Buffer.from(new SharedArrayBuffer(sealed.length));
        sealed.copy(shared);
        const o2 = await pool.openInSlot(id, shared);
        assert.deepEqual(Buffer.from(o2.plain), plain);
        o2.release();
        assert.deepEqual(shared, sealed, "the caller's shared bytes are untouched");
      }
    } finally {
      await pool.close();
    }
  });

  for (const native of [true, false]) {
    test(`chunks sealed into a given buffer (${native ? 'native libsodium' : "Node's cipher"}): zstd only where it shrinks the chunk, stored as is otherwise, and both open right`, () => {
      useNativeAead(native);
      try {
        const keys = deriveKeys(generateMaster(), 'blake3');
        for (const [plain, compressed] of [[text(CHUNK), true], [randomBytes(CHUNK), false], [randomBytes(1000), false], [text(1000), true], [Buffer.alloc(0), false]] as const) {
          const id = chunkId(keys, plain);
          const room = Buffer.alloc(sealedChunkBound(plain.length) + 3);
          const sealed = sealChunk(keys, REPO, id, plain, 3, room);
          assert.equal(sealed.buffer, room.buffer, 'made in the buffer given');
          if (compressed) assert.ok(sealed.length < sealedChunkBound(plain.length) - plain.length / 4, `compressed: ${sealed.length}`);
          else assert.equal(sealed.length, sealedChunkBound(plain.length), `stored as is (zstd would not shrink ${plain.length} bytes)`);
          assert.deepEqual(openChunk(keys, REPO, id, Buffer.from(sealed)), plain);
          const into = Buffer.alloc(CHUNK);
          assert.deepEqual(openChunk(keys, REPO, id, Buffer.from(sealed), into), plain);
          assert.deepEqual(openChunk(keys, REPO, id, Buffer.from(sealChunk(keys, REPO, id, plain, 3)), into), plain, 'the allocating seal opens in place');
          assert.throws(() => sealChunk(keys, REPO, id, plain, 3, Buffer.alloc(sealedChunkBound(plain.length) - 1)), RangeError);
        }
      } finally {
        useNativeAead(true);
      }
    });
  }

  test('a pool of a format-1 repository computes keyed BLAKE2b ids in its workers', async () => {
    const keys = deriveKeys(generateMaster(), 'blake2b');
    const pool = new ChunkPool({ keys: { idKey: keys.idKey, idHash: keys.idHash, encKey: keys.encKey }, repoId: REPO, level: 1, chunkSize: CHUNK }, 2);
    try {
      const plain = text(CHUNK);
      const input = await pool.slot();
      plain.copy(input.buffer);
      const id = await pool.hashSlot(input, plain.length);
      assert.equal(id, sodium.crypto_generichash(32, plain, keys.idKey, 'hex'));
      const s = await pool.sealSlot(id!, input, plain.length);
      assert.deepEqual(openChunk(keys, REPO, id!, Buffer.from(s.sealed)), plain);
      s.release();
      input.release();
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
      // Each failure gives its slot back: forty of them, one after another, use one slot.
      for (let i = 0; i < 40; i++) await assert.rejects(pool.openInSlot(id, Buffer.from(sealed)), IntegrityError);
      assert.equal(pool.slotCount, 1);
      // A chunk larger than the repository's chunk size, sealed with the right key, still does not fit a slot.
      const big = randomBytes(CHUNK + 1);
      const bigId = chunkId(keys, big);
      await assert.rejects(pool.openInSlot(bigId, sealChunk(keys, REPO, bigId, big, 1)), /more than a chunk of this repository/);
      const big2 = text(CHUNK * 2);
      const big2Id = chunkId(keys, big2);
      await assert.rejects(pool.openInSlot(big2Id, sealChunk(keys, REPO, big2Id, big2, 1)), /does not decompress into a chunk of this repository/);
      const input = await pool.slot();
      await assert.rejects(pool.sealSlot(bigId, input, CHUNK + 1), /does not fit the repository's/);
      input.release();
      const ok = await pool.openInSlot(chunkId(keys, plain), sealChunk(keys, REPO, chunkId(keys, plain), plain, 1));
      ok.release();
    } finally {
      await pool.close();
    }
  });

  test('released slots are reused: one chunk at a time needs two slots however many chunks pass; a held slot is never handed out', async () => {
    const { keys, pool } = setup();
    try {
      for (let i = 0; i < 50; i++) {
        const plain = randomBytes(4096);
        const input = await pool.slot();
        plain.copy(input.buffer);
        await sealChecked(keys, pool, input, plain);
      }
      assert.equal(pool.slotCount, 2);
      // Ten chunks held at once: ten slots, each distinct, each keeping its content.
      const held = [];
      for (let i = 0; i < 10; i++) {
        const input = await pool.slot();
        input.buffer.fill(i + 1, 0, 100);
        held.push(input);
      }
      assert.equal(new Set(held.map((h) => h.index)).size, 10);
      held.forEach((h, i) => assert.ok(h.buffer.subarray(0, 100).every((b) => b === i + 1)));
      assert.equal(pool.slotCount, 10);
      for (const h of held) {
        h.release();
        h.release(); // twice is harmless: the slot is not listed free twice
      }
      const again = await Promise.all(Array.from({ length: 10 }, () => pool.slot()));
      assert.equal(new Set(again.map((h) => h.index)).size, 10);
      assert.equal(pool.slotCount, 10);
    } finally {
      await pool.close();
    }
  });
});

describe('slots made ready before the first chunk', () => {
  /** This process's resident memory, in bytes. */
  const resident = async () => Number(/VmRSS:\s+(\d+) kB/.exec(await readFile('/proc/self/status', 'utf8'))![1]) * 1024;

  test('warm(n) makes n slots, whose pages the threads fault in, and a chunk read into one meanwhile is left as it was', async () => {
    const keys = deriveKeys(generateMaster(), 'hmac-sha256');
    const chunkSize = 4 * 1024 * 1024;
    const pool = new ChunkPool({ keys: { idKey: keys.idKey, idHash: keys.idHash, encKey: keys.encKey }, repoId: REPO, level: 1, chunkSize }, 2);
    try {
      // The threads first, and one slot: their start-up memory is not what is measured.
      const first = await pool.slot();
      await pool.hashSlot(first, 4096);
      first.release();
      const before = await resident();
      const touched = pool.warm(6);
      assert.equal(pool.slotCount, 6);
      await touched;
      const grown = (await resident()) - before;
      assert.ok(grown >= 5 * chunkSize * 0.95, `resident memory grew by ${grown >> 20} MiB, not the five new slots' ${(5 * chunkSize) >> 20} MiB`);

      // A touch changes no byte: the touched slots still read as zeros.
      const fresh = await Promise.all(Array.from({ length: 6 }, () => pool.slot()));
      for (const f of fresh) assert.ok(f.buffer.every((b) => b === 0), `slot ${f.index} is not zeros after its touch`);
      assert.deepEqual(fresh.map((f) => f.index).sort((a, b) => a - b), [0, 1, 2, 3, 4, 5], 'the slots warm() made are the ones handed out');
      for (const f of fresh) f.release();

      // Chunks read into slots while their touches still run keep every byte.
      const plains = Array.from({ length: 12 }, () => randomBytes(chunkSize));
      const touching = pool.warm(12);
      const held = await Promise.all(plains.map(() => pool.slot()));
      held.forEach((h, i) => plains[i]!.copy(h.buffer));
      const ids = await Promise.all(held.map((h, i) => pool.hashSlot(h, plains[i]!.length)));
      await touching;
      ids.forEach((id, i) => assert.equal(id, chunkId(keys, plains[i]!)));
      held.forEach((h, i) => assert.ok(h.buffer.subarray(0, chunkSize).equals(plains[i]!), `slot ${h.index} changed`));
      for (const h of held) h.release();
      assert.equal(pool.slotCount, 12);
    } finally {
      await pool.close();
    }
  });
});

describe('chunk threads started before their pool', () => {
  test('a pool adopts threads started ahead, sends them its keys first, and they seal and open right; unadopted ones hold no process open', async () => {
    prestartChunkThreads(2);
    assert.equal(prestartedCount(), 2);
    await new Promise((r) => setTimeout(r, 300)); // they come up with no keys, and wait
    const { keys, pool } = setup();
    try {
      for (const plain of [randomBytes(CHUNK), text(CHUNK)]) {
        const input = await pool.slot();
        plain.copy(input.buffer);
        const id = await pool.hashSlot(input, plain.length);
        assert.equal(id, chunkId(keys, plain));
        await sealChecked(keys, pool, input, plain);
      }
      assert.equal(prestartedCount(), 0, 'both adopted');
    } finally {
      await pool.close();
    }
    // A process that prestarts threads and never uses them exits on its own, at once.
    const script = `import('${new URL('../../src/pipeline/prestart.js', import.meta.url).href}').then((m) => m.prestartChunkThreads(2))`;
    const started = Date.now();
    const r = await execa(process.execPath, ['--input-type=module', '-e', script], { timeout: 20_000, reject: false });
    assert.equal(r.exitCode, 0, r.stderr);
    assert.ok(Date.now() - started < 15_000);
  });
});

describe('output slots are taken when a thread starts the work', () => {
  test('ten chunks sealed at once on two threads need at most fourteen slots, not twenty; every one seals right', async () => {
    const { keys, pool } = setup();
    try {
      const plains = Array.from({ length: 10 }, (_, i) => (i % 2 ? randomBytes(CHUNK) : text(CHUNK)));
      const inputs = await Promise.all(plains.map(() => pool.slot()));
      plains.forEach((p, i) => p.copy(inputs[i]!.buffer));
      await Promise.all(plains.map((plain, i) => sealChecked(keys, pool, inputs[i]!, plain)));
      // Ten inputs, an output per thread sealing, and at most one per thread just sealed whose
      // caller has not released it yet. Taken when queued, the outputs made it twenty.
      assert.ok(pool.slotCount <= 14, `${pool.slotCount} slots`);
    } finally {
      await pool.close();
    }
  });
});

describe('a chunk pool that loses a thread', () => {
  test('fails what it was doing, what is queued and every later request at once, with the reason; it never hangs', async () => {
    const { keys, pool } = setup();
    try {
      const plain = randomBytes(CHUNK);
      const id = chunkId(keys, plain);
      const sealed = sealChunk(keys, REPO, id, plain, 1);
      assert.deepEqual(await pool.open(id, Buffer.from(sealed)), plain, 'the threads are up');
      // Twenty requests at once, then one thread ends (as a crash would end it).
      const many = Array.from({ length: 20 }, () => pool.open(id, Buffer.from(sealed)));
      const threads = (pool as unknown as { workers: { terminate(): Promise<number> }[] }).workers;
      assert.equal(threads.length, 2);
      await threads[0]!.terminate();
      const settled = await Promise.allSettled(many);
      const failed = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected');
      assert.ok(failed.length > 0, 'the requests caught by the loss fail');
      for (const f of failed) assert.match(f.reason.message, /a chunk worker thread exited \(code 1\): the operation was stopped; run it again/);
      assert.equal(failed[0]!.reason.code, 'INTERNAL');
      await assert.rejects(pool.open(id, Buffer.from(sealed)), /a chunk worker thread exited/);
      await assert.rejects(pool.slot().then((s) => pool.hashSlot(s, 10)), /a chunk worker thread exited/);
    } finally {
      await pool.close();
    }
  });
});

describe('a pool kept between operations', () => {
  const init = () => {
    const keys = deriveKeys(generateMaster(), 'hmac-sha256');
    return { keys, init: { keys: { idKey: keys.idKey, idHash: keys.idHash, encKey: keys.encKey }, repoId: REPO, level: 1, chunkSize: CHUNK } };
  };
  const threadsOf = (pool: ChunkPool) => (pool as unknown as { workers: { threadId: number; terminate(): Promise<number> }[] }).workers;
  const works = async (keys: ReturnType<typeof init>['keys'], pool: ChunkPool) => {
    const slot = await pool.slot();
    const plain = text(CHUNK);
    plain.copy(slot.buffer);
    await sealChecked(keys, pool, slot, plain);
  };
  /** Asserts that `pool` refuses work because it was closed. */
  const refusesAsClosed = (pool: ChunkPool, message: string) =>
    assert.rejects(pool.slot().then((s) => pool.hashSlot(s, 10)), /chunk pool is closed/, message);

  test('the next operation gets the same threads; unused for the idle time, they are closed and the next one starts new ones', async () => {
    const { keys, init: i } = init();
    const keeper = new PoolKeeper(() => i, 300);
    try {
      const a = keeper.lease();
      await works(keys, a.pool);
      const threads = threadsOf(a.pool).map((w) => w.threadId);
      await a.release();
      const b = keeper.lease();
      assert.equal(b.pool, a.pool, 'the same pool');
      await works(keys, b.pool);
      assert.deepEqual(threadsOf(b.pool).map((w) => w.threadId), threads, 'on the same threads');
      await b.release();
      await b.release(); // twice is once
      await new Promise((r) => setTimeout(r, 600));
      await refusesAsClosed(a.pool, 'closed after the idle time');
      const c = keeper.lease();
      assert.notEqual(c.pool, a.pool, 'a new pool');
      await works(keys, c.pool);
      await c.release();
    } finally {
      await keeper.close();
    }
  });

  test('operations that overlap share it; closing the keeper waits for the last of them', async () => {
    const { keys, init: i } = init();
    const keeper = new PoolKeeper(() => i, 60_000);
    const a = keeper.lease();
    const b = keeper.lease();
    assert.equal(a.pool, b.pool);
    await Promise.all([works(keys, a.pool), works(keys, b.pool)]);
    await a.release();
    await keeper.close();
    await works(keys, b.pool); // still in use: not closed under it
    const c = keeper.lease();
    assert.notEqual(c.pool, b.pool, 'a closed keeper starts afresh for a new operation');
    await b.release();
    await refusesAsClosed(b.pool, 'closed by its last release');
    await c.release();
    await keeper.close();
    await refusesAsClosed(c.pool, 'an unused pool closes at once');
  });

  test('a pool that lost a thread is not handed out again: the next operation gets new threads that work', async () => {
    const { keys, init: i } = init();
    const keeper = new PoolKeeper(() => i, 60_000);
    try {
      const a = keeper.lease();
      await works(keys, a.pool);
      await threadsOf(a.pool)[0]!.terminate();
      await new Promise((r) => setImmediate(r));
      assert.equal(a.pool.isBroken, true);
      await assert.rejects(works(keys, a.pool), /a chunk worker thread exited/);
      const b = keeper.lease();
      assert.notEqual(b.pool, a.pool, 'replaced while the broken one is still leased');
      await works(keys, b.pool);
      await a.release();
      await b.release();
      const c = keeper.lease();
      assert.equal(c.pool, b.pool, 'the replacement is the one kept');
      await c.release();
    } finally {
      await keeper.close();
    }
  });
});

describe('slots start on a page boundary', () => {
  test('slots are carved on 64 KiB boundaries of one WebAssembly memory, and each is written to a file with O_DIRECT as it is', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'vmvault-slot-align-'));
    const { pool } = setup();
    try {
      const fh = await open(join(dir, 'f'), 'w');
      const direct = await open(`/proc/self/fd/${fh.fd}`, constants.O_WRONLY | constants.O_DIRECT).catch(() => undefined);
      try {
        if (!direct) return t.skip(`${dir}: this filesystem refuses O_DIRECT`);
        const slots = [await pool.slot(), await pool.slot(), await pool.slot(), await pool.slot(), await pool.slot()];
        // A WebAssembly memory starts on a page boundary (a plain SharedArrayBuffer does not);
        // whether a kernel refuses unaligned O_DIRECT memory depends on the filesystem and device.
        assert.equal(new Set(slots.map((s) => s.buffer.buffer)).size, 1, 'one memory holds them all');
        for (const s of slots) {
          assert.ok(s.buffer.buffer.byteLength > s.buffer.length, 'carved from a larger WebAssembly memory');
          assert.equal(s.buffer.byteOffset % (64 * 1024), 0, `slot ${s.index} starts on a 64 KiB boundary`);
          s.buffer.fill(0x5a);
          assert.equal((await direct.write(s.buffer, 0, 64 * 1024, 0)).bytesWritten, 64 * 1024, `slot ${s.index} written as it is`);
          s.release();
        }
      } finally {
        await direct?.close();
        await fh.close();
      }
    } finally {
      await pool.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('where WebAssembly memory is refused, slots are plain shared memory, and chunks still seal and open right', async () => {
    // V8 is told to allow no WebAssembly memory of a slot's size: the pool falls back.
    const poolUrl = new URL('../../src/pipeline/pool.js', import.meta.url).href;
    const keysUrl = new URL('../../src/crypto/keys.js', import.meta.url).href;
    const script = `
      import { ChunkPool } from ${JSON.stringify(poolUrl)};
      import { deriveKeys, generateMaster, chunkId } from ${JSON.stringify(keysUrl)};
      const keys = deriveKeys(generateMaster(), 'hmac-sha256');
      const pool = new ChunkPool({ keys, repoId: '${REPO}', level: 1, chunkSize: ${CHUNK} }, 2);
      const plain = Buffer.from('a log line, compressible\\n'.repeat(${CHUNK} / 25).slice(0, ${CHUNK}));
      const input = await pool.slot();
      plain.copy(input.buffer);
      const id = await pool.hashSlot(input, plain.length);
      const sealed = await pool.sealSlot(id, input, plain.length);
      const reread = await pool.slot();
      sealed.sealed.copy(reread.buffer);
      const opened = await pool.openSlot(id, reread, sealed.sealed.length);
      // A slot of plain memory is a SharedArrayBuffer of its own; carved ones share a larger memory.
      const own = [input, reread].every((s) => s.buffer.buffer.byteLength === s.buffer.length);
      console.log(JSON.stringify({ same: id === chunkId(keys, plain) && opened.plain.equals(plain), own, slots: pool.slotCount }));
      await pool.close();
    `;
    // A file, not --eval: the pool's threads inherit node's flags, and --input-type is for --eval only.
    const dir = await mkdtemp(join(tmpdir(), 'vmvault-slot-fallback-'));
    try {
      await writeFile(join(dir, 'run.mjs'), script);
      const r = await execa(process.execPath, ['--wasm-max-mem-pages=1', join(dir, 'run.mjs')], { reject: false });
      assert.equal(r.exitCode, 0, r.stderr);
      assert.deepEqual(JSON.parse(r.stdout), { same: true, own: true, slots: 4 });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

/**
 * Worker thread: the CPU work of the data path (hashing, zero detection,
 * compression, encryption, and the reverse) so that every core is used. It is given
 * the chunk keys, never the master secret, and loads what that needs only: no schema
 * library, and libsodium's WebAssembly only for a format-1 repository's BLAKE2b ids on a
 * host where BLAKE2b's native code cannot load (crypto/blake2b.ts).
 */
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { parentPort } from 'node:worker_threads';
import { chunkId } from '../crypto/chunk-id.js';
import { blake2bReady } from '../crypto/blake2b.js';
import { blakeHash } from '../crypto/blake-hash.js';
import { nativeAead } from '../crypto/native-aead.js';
import { openChunk, sealChunk } from '../repo/chunk.js';
import type { PoolInit, PoolRequest, PoolResponse } from './pool.js';

// The native code every chunk needs, loaded now: a thread started before its pool
// exists (pipeline/prestart.ts) has this done by the time its first chunk comes.
nativeAead();
blakeHash();

let zeros = Buffer.alloc(0);
/**
 * A young-generation collection (a scavenge of this thread's small heap) after a chunk
 * sealed or opened outside the slots: what such a chunk leaves behind (Node's cipher's
 * output buffers where libsodium's native code does not load, a copy of a chunk sent
 * by message, a plaintext allocated here) dies young, and without it piles up as garbage
 * until external-memory pressure triggers a full collection, tens of MiB of resident
 * memory per thread in a full backup. A chunk read, sealed and opened in slots with the
 * native code leaves only a few small objects, and V8's own schedule is enough: a
 * collection after each of them cost each thread about 0.15 s of a 700 MiB backup, and
 * its freed pages a TLB shootdown on every core. `gc` is exposed for contexts created
 * from now on; if it cannot be, the collector keeps its own schedule.
 */
const collectYoung = ((): (() => void) => {
  try {
    v8.setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as unknown;
    if (typeof gc === 'function') return () => (gc as (o: { type: string }) => void)({ type: 'minor' });
  } catch {
    /* the collector keeps its own schedule */
  }
  return () => {};
})();

/** The pool's slots this thread has been sent (pipeline/pool.ts), by number. */
const slots = new Map<number, Buffer>();

function slot(n: number): Buffer {
  const view = slots.get(n);
  if (!view) throw new Error(`slot ${n} was never sent to this thread`);
  return view;
}

function isZero(data: Buffer): boolean {
  if (zeros.length < data.length) zeros = Buffer.alloc(data.length);
  return data.equals(zeros.subarray(0, data.length));
}

/** Set by the pool's first message: the chunk keys (never the master secret), the repository id, zstd level and chunk size. */
let init: PoolInit | undefined;
let keys: PoolInit['keys'];
/** Requests that came while the keys' code was still loading (format 1 without native BLAKE2b). */
let waiting: PoolRequest[] | undefined;
/** Why the keys' code could not be loaded: every request is answered with it. */
let loadFailed: Error | undefined;

parentPort!.on('message', (msg: PoolRequest | { init: PoolInit }) => {
  if ('init' in msg) {
    init = msg.init;
    keys = init.keys;
    if (keys.idHash === 'blake2b') {
      waiting = [];
      const answerWaiting = () => {
        const queued = waiting ?? [];
        waiting = undefined;
        for (const req of queued) handle(req);
      };
      blake2bReady().then(answerWaiting, (err: unknown) => {
        loadFailed = err instanceof Error ? err : new Error(String(err));
        answerWaiting();
      });
    }
    return;
  }
  if (waiting) waiting.push(msg);
  else handle(msg);
});

function handle(req: PoolRequest): void {
  let res: PoolResponse;
  const transfer: ArrayBuffer[] = [];
  try {
    // The slots first: the pool counts them as sent whatever becomes of this request.
    for (const [n, memory, offset, size] of req.send ?? []) slots.set(n, Buffer.from(memory, offset, size));
    if (loadFailed) throw loadFailed;
    const init = initOf();
    const input = req.in ? slot(req.in.slot).subarray(0, req.in.length) : Buffer.from(req.data!.buffer, req.data!.byteOffset, req.data!.byteLength);
    if (req.op === 'touch') {
      touchPages(input);
      res = { seq: req.seq, ok: true };
    } else if (req.op === 'hash') {
      res = { seq: req.seq, ok: true, id: isZero(input) ? null : chunkId(keys, input) };
    } else if (req.op === 'seal') {
      const sealed = sealChunk(keys, init.repoId, req.id!, input, init.level, slot(req.out!));
      res = { seq: req.seq, ok: true, length: sealed.length };
    } else {
      // A slot has room for a sealed chunk; no plaintext may be larger than a chunk.
      const into = req.out === undefined ? undefined : slot(req.out).subarray(0, init.chunkSize);
      // A slot (or a copy made by postMessage) is opened where it lies; bytes the sender shares are not its to overwrite.
      const shared = req.in === undefined && input.buffer instanceof SharedArrayBuffer;
      const plain = openChunk(keys, init.repoId, req.id!, input, into, shared);
      res = into ? { seq: req.seq, ok: true, length: plain.length } : { seq: req.seq, ok: true, data: plain };
    }
    const out = res.data;
    if (out && out.byteOffset === 0 && out.byteLength === out.buffer.byteLength && !(out.buffer instanceof SharedArrayBuffer)) transfer.push(out.buffer as ArrayBuffer);
  } catch (err) {
    const e = err as Error & { code?: string };
    res = { seq: req.seq, ok: false, name: e.name, code: e.code, message: e.message };
  }
  parentPort!.postMessage(res, transfer);
  if ((req.op === 'seal' || req.op === 'open') && leavesGarbage(req)) collectYoung();
}

/** Whether sealing or opening `req` allocated chunk-sized memory outside the slots (see collectYoung). */
function leavesGarbage(req: PoolRequest): boolean {
  return req.in === undefined || req.out === undefined || nativeAead() === undefined;
}

/**
 * Faults in every page of a slot (pool.ts prepareSlots) without changing a byte: an
 * atomic add of zero is a write the kernel must back with memory, and atomic, so a
 * chunk the main thread reads into the slot meanwhile is never disturbed.
 */
function touchPages(slot: Buffer): void {
  const words = new Int32Array(slot.buffer, slot.byteOffset, slot.byteLength >> 2);
  for (let i = 0; i < words.length; i += PAGE_BYTES >> 2) Atomics.add(words, i, 0);
}
const PAGE_BYTES = 4096;

function initOf(): PoolInit {
  if (!init) throw new Error('a chunk thread was sent work before its keys');
  return init;
}

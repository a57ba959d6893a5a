/**
 * Worker thread: the CPU work of the data path (hashing, zero detection,
 * compression, encryption, and the reverse) so that every core is used.
 */
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { parentPort, workerData } from 'node:worker_threads';
import { chunkId, deriveKeys } from '../crypto/keys.js';
import { openChunk, sealChunk } from '../repo/chunk.js';
import type { PoolInit, PoolRequest, PoolResponse } from './pool.js';

const init = workerData as PoolInit;
const keys = deriveKeys(new Uint8Array(init.master), init.idHash);
let zeros = Buffer.alloc(0);
/**
 * A young-generation collection (a scavenge of this thread's small heap, well under a
 * millisecond) after each chunk sealed or opened: the cipher's output buffers die
 * young, and without it they pile up as garbage until external-memory pressure
 * triggers a full collection, tens of MiB of resident memory per thread in a full
 * backup. `gc` is exposed for contexts created from now on; if it cannot be, the
 * collector keeps its own schedule.
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

/** The pool's output slots this thread has been sent (pipeline/pool.ts). */
const slots = new Map<number, Uint8Array>();

function slotView(slot: number, sent: SharedArrayBuffer | undefined): Uint8Array {
  if (sent) slots.set(slot, new Uint8Array(sent));
  const view = slots.get(slot);
  if (!view) throw new Error(`output slot ${slot} was never sent to this thread`);
  return view;
}

function isZero(data: Buffer): boolean {
  if (zeros.length < data.length) zeros = Buffer.alloc(data.length);
  return data.equals(zeros.subarray(0, data.length));
}

parentPort!.on('message', (req: PoolRequest) => {
  let res: PoolResponse;
  const transfer: ArrayBuffer[] = [];
  try {
    const data = Buffer.from(req.data.buffer, req.data.byteOffset, req.data.byteLength);
    if (req.op === 'hash') {
      const zero = isZero(data);
      res = { seq: req.seq, ok: true, id: zero ? null : chunkId(keys, data), data: req.data };
      transfer.push(req.data.buffer as ArrayBuffer);
    } else if (req.op === 'seal') {
      const into = slotView(req.slot, req.slotBuffer);
      const sealed = sealChunk(keys, init.repoId, req.id, data, init.level, into);
      // The plaintext buffer goes back too, so the main thread can reuse it.
      res = { seq: req.seq, ok: true, data: new Uint8Array(0), plain: req.data, slotLength: sealed.length };
      transfer.push(req.data.buffer as ArrayBuffer);
    } else {
      // A slot has room for a sealed chunk; no plaintext may be larger than a chunk.
      const into = req.slot === undefined ? undefined : slotView(req.slot, req.slotBuffer).subarray(0, init.chunkSize);
      const plain = openChunk(keys, init.repoId, req.id, data, into);
      res = into ? { seq: req.seq, ok: true, data: new Uint8Array(0), slotLength: plain.length } : { seq: req.seq, ok: true, data: plain };
    }
    if (res.data.byteOffset === 0 && res.data.byteLength === res.data.buffer.byteLength && !transfer.includes(res.data.buffer as ArrayBuffer)) {
      transfer.push(res.data.buffer as ArrayBuffer);
    }
  } catch (err) {
    const e = err as Error & { code?: string };
    res = { seq: req.seq, ok: false, name: e.name, code: e.code, message: e.message };
  }
  parentPort!.postMessage(res, transfer);
  if (req.op !== 'hash') collectYoung();
});

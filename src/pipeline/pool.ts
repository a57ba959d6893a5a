/**
 * A pool of worker threads, one per core, that hash, seal and open chunks.
 * Buffers are transferred, not copied, where they own their whole ArrayBuffer.
 *
 * Sealed chunks are written into shared output slots (SharedArrayBuffers the pool
 * owns, each sent to a worker once) and handed to the caller as views, released once
 * stored: a backup then allocates no buffer per chunk on the main thread, where every
 * 4 MiB of garbage used to bring the collector back (about a sixth of a full backup's
 * CPU time, and tens of MiB of resident memory waiting to be collected).
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { IntegrityError, VmvaultError, type ErrorCode } from '../errors.js';
import type { ChunkIdHash } from '../crypto/keys.js';
import { sealedChunkBound } from '../repo/chunk.js';

export interface PoolInit { master: Uint8Array; repoId: string; level: number; idHash: ChunkIdHash; chunkSize: number }
export type PoolRequest =
  | { seq: number; op: 'hash'; data: Uint8Array }
  /** `slot`: the output slot to seal into; `slotBuffer` is sent the first time this worker meets the slot. */
  | { seq: number; op: 'seal'; id: string; data: Uint8Array; slot: number; slotBuffer?: SharedArrayBuffer }
  /** With `slot`: the plaintext goes into that output slot (see `seal`). */
  | { seq: number; op: 'open'; id: string; data: Uint8Array; slot?: number; slotBuffer?: SharedArrayBuffer };
export type PoolResponse =
  /** seal (and open into a slot): `slotLength` bytes of the request's slot hold the result. */
  | { seq: number; ok: true; id?: string | null; data: Uint8Array; plain?: Uint8Array; slotLength?: number }
  | { seq: number; ok: false; name: string; code: string | undefined; message: string };

type Pending = { resolve: (r: PoolResponse & { ok: true }) => void; reject: (e: Error) => void };

/** A sealed chunk in a shared output slot: `sealed` is valid until `release()`. */
export interface SealedChunk { sealed: Buffer; plain: Buffer; release: () => void }
/** An opened chunk in a shared output slot: `plain` is valid until `release()`. */
export interface OpenedChunk { plain: Buffer; release: () => void }

/** Output slots at most: more seals than this in flight at once wait for a release. */
const MAX_SLOTS = 32;

export class ChunkPool {
  private readonly workers: Worker[] = [];
  private readonly idle: Worker[] = [];
  private readonly queue: { req: PoolRequest; p: Pending }[] = [];
  private readonly pending = new Map<number, { worker: Worker; p: Pending }>();
  private seq = 0;
  private closed = false;
  private readonly slots: SharedArrayBuffer[] = [];
  private readonly freeSlots: number[] = [];
  private readonly slotWaiters: ((slot: number) => void)[] = [];
  /** Which slots each worker has been sent. */
  private readonly slotsSent = new Map<Worker, Set<number>>();

  /**
   * The workers start at the first request: a backup that change tracking says has
   * nothing to read (an unchanged VM) pays for no thread (about 60 MiB and the
   * WebAssembly start-up each).
   */
  constructor(private readonly init: PoolInit, private readonly size = availableParallelism()) {}

  private start(): void {
    const init = this.init;
    for (let i = 0; i < Math.max(1, this.size); i++) {
      const w = new Worker(new URL('./chunk-worker.js', import.meta.url), { workerData: init });
      w.unref();
      w.on('message', (res: PoolResponse) => this.onMessage(w, res));
      w.on('error', (err) => this.onWorkerError(w, err));
      this.workers.push(w);
      this.idle.push(w);
    }
  }

  /** Chunk id of `data`, or null when it is all zeros; `data` comes back (it was transferred). */
  async hash(data: Buffer): Promise<{ id: string | null; data: Buffer }> {
    const r = await this.submit({ seq: 0, op: 'hash', data });
    return { id: r.id ?? null, data: asBuffer(r.data) };
  }

  /**
   * Compresses and encrypts into an output slot; `data` is handed over and comes back
   * as `plain` for reuse. The caller must `release()` the slot once `sealed` is stored
   * (or dropped): the next seal reuses it.
   */
  async seal(id: string, data: Buffer): Promise<SealedChunk> {
    if (data.length > this.init.chunkSize) throw new RangeError(`a chunk of ${data.length} bytes is larger than the repository's ${this.init.chunkSize}`);
    return this.inSlot((slot) => this.submit({ seq: 0, op: 'seal', id, data, slot }), (r, view, release) => ({ sealed: view, plain: asBuffer(r.plain ?? new Uint8Array(0)), release }));
  }

  /**
   * Like `open`, into an output slot: a restore or a stream then allocates nothing per
   * chunk on the main thread. The caller must `release()` the slot once done with `plain`.
   */
  async openInSlot(id: string, sealed: Uint8Array): Promise<OpenedChunk> {
    return this.inSlot((slot) => this.submit({ seq: 0, op: 'open', id, data: sealed, slot }), (_r, view, release) => ({ plain: view, release }));
  }

  private async inSlot<T>(
    run: (slot: number) => Promise<PoolResponse & { ok: true }>,
    make: (r: PoolResponse & { ok: true }, view: Buffer, release: () => void) => T,
  ): Promise<T> {
    const slot = await this.takeSlot();
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.giveSlot(slot);
    };
    try {
      const r = await run(slot);
      return make(r, Buffer.from(this.slots[slot]!, 0, r.slotLength!), release);
    } catch (err) {
      release();
      throw err;
    }
  }

  /** A free output slot (the most recently freed: fewest pages touched), a new one, or the next released. */
  private takeSlot(): Promise<number> {
    const free = this.freeSlots.pop();
    if (free !== undefined) return Promise.resolve(free);
    if (this.slots.length < MAX_SLOTS) {
      this.slots.push(new SharedArrayBuffer(sealedChunkBound(this.init.chunkSize)));
      return Promise.resolve(this.slots.length - 1);
    }
    return new Promise((resolve) => this.slotWaiters.push(resolve));
  }

  private giveSlot(slot: number): void {
    const waiter = this.slotWaiters.shift();
    if (waiter) waiter(slot);
    else this.freeSlots.push(slot);
  }

  /** Decrypts, decompresses and checks the id; rejects with IntegrityError. */
  async open(id: string, sealed: Uint8Array): Promise<Buffer> {
    return asBuffer((await this.submit({ seq: 0, op: 'open', id, data: sealed })).data);
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
  }

  private submit(req: PoolRequest): Promise<PoolResponse & { ok: true }> {
    if (this.closed) return Promise.reject(new Error('chunk pool is closed'));
    if (this.workers.length === 0) this.start();
    req.seq = ++this.seq;
    return new Promise((resolve, reject) => {
      this.queue.push({ req, p: { resolve, reject } });
      this.dispatch();
    });
  }

  private dispatch(): void {
    while (this.idle.length && this.queue.length) {
      const w = this.idle.pop()!;
      const { req, p } = this.queue.shift()!;
      this.pending.set(req.seq, { worker: w, p });
      const d = req.data;
      const owns = d.byteOffset === 0 && d.byteLength === d.buffer.byteLength && !(d.buffer instanceof SharedArrayBuffer);
      if (req.op !== 'hash' && req.slot !== undefined) {
        const sent = this.slotsSent.get(w) ?? new Set<number>();
        this.slotsSent.set(w, sent);
        if (sent.has(req.slot)) delete req.slotBuffer;
        else {
          req.slotBuffer = this.slots[req.slot]!;
          sent.add(req.slot);
        }
      }
      w.postMessage(req, owns ? [d.buffer as ArrayBuffer] : []);
    }
  }

  private onMessage(w: Worker, res: PoolResponse): void {
    const entry = this.pending.get(res.seq);
    this.pending.delete(res.seq);
    this.idle.push(w);
    this.dispatch();
    if (!entry) return;
    if (res.ok) entry.p.resolve(res);
    else if (res.name === 'IntegrityError') entry.p.reject(new IntegrityError(res.message));
    else entry.p.reject(new VmvaultError((res.code as ErrorCode) ?? 'BAD_INPUT', res.message));
  }

  private onWorkerError(w: Worker, err: Error): void {
    for (const [seq, entry] of this.pending) {
      if (entry.worker === w) {
        this.pending.delete(seq);
        entry.p.reject(new Error(`chunk worker failed: ${err.message}`));
      }
    }
  }
}

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/**
 * A pool of worker threads, one per core, that hash, seal and open chunks.
 *
 * The data path moves chunks through shared slots: shared memory the pool owns (see
 * slotMemory), each slot sent to a worker once, then named by number. A backup reads a chunk into an
 * input slot, the worker hashes it there, seals it from there into an output slot, and
 * the caller stores the output slot's view and releases both; a restore opens a chunk
 * into an output slot. Nothing is allocated or transferred per chunk on the main
 * thread, where every 4 MiB of garbage used to bring the collector back (about a sixth
 * of a full backup's CPU time, and tens of MiB of resident memory waiting to be
 * collected), and the chunks in flight need one slot each, not a buffer per stage.
 *
 * A sealed chunk handed to `open` (not a slot) is transferred, not copied, where it owns
 * its whole ArrayBuffer.
 */
import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { asBuffer } from '../bytes.js';
import { IntegrityError, VmvaultError, type ErrorCode } from '../errors.js';
import { sealedChunkBound, type ChunkKeys } from '../repo/chunk.js';
import type { Repository } from '../repo/repository.js';
import { takeChunkThread } from './prestart.js';

/** What a worker needs: the chunk keys only (never the master secret), the repository id, zstd level and chunk size. */
export interface PoolInit { keys: ChunkKeys; repoId: string; level: number; chunkSize: number }
export interface PoolRequest {
  seq: number;
  op: 'hash' | 'seal' | 'open' | 'touch';
  /** seal, open: the chunk id. */
  id?: string;
  /** The input, as bytes handed over (open)… */
  data?: Uint8Array;
  /** …or as the first `length` bytes of a slot. */
  in?: { slot: number; length: number };
  /** The slot the result goes into (seal: always; open: when asked). */
  out?: number;
  /** Slots this worker has not been sent yet: number, the shared memory holding it, and where in it. */
  send?: [number, SharedArrayBuffer, number, number][];
}
export type PoolResponse =
  /** `data`: the plaintext (open without `out`); `length`: bytes of the result in `out`. */
  | { seq: number; ok: true; id?: string | null; data?: Uint8Array; length?: number }
  | { seq: number; ok: false; name: string; code: string | undefined; message: string };

/** `PoolRequest.out` of a request whose output slot is taken when a thread picks it up. */
const OUT_AT_DISPATCH = -1;

type Pending = { resolve: (r: PoolResponse & { ok: true }) => void; reject: (e: Error) => void };

/** A slot taken from the pool: `buffer` (the whole slot) is the caller's until `release()`. */
export interface Slot { readonly index: number; readonly buffer: Buffer; release(): void }
/** A sealed chunk in an output slot: `sealed` is valid until `release()`. */
export interface SealedChunk { sealed: Buffer; release: () => void }
/** An opened chunk in an output slot: `plain` is valid until `release()`. */
export interface OpenedChunk { plain: Buffer; release: () => void }

/**
 * Free slots, numbered in the pool's registry. Input and output slots come from one
 * list, so a slot freed by a sealed input serves the next output: the chunks in flight
 * need one slot each (two for the moment of sealing). There is no cap: every caller
 * bounds the chunks it has in flight (a backup's `inFlight`, a restore's window), and
 * a cap could only make a holder of an input wait on holders of inputs.
 */
class SlotList {
  private readonly free: number[] = [];

  constructor(private readonly make: () => number) {}

  /** The most recently freed slot (fewest pages touched), or a new one. */
  take(): number {
    return this.free.pop() ?? this.make();
  }

  give(slot: number): void {
    this.free.push(slot);
  }

  /**
   * A new slot, taken only after every slot freed before it (those were used, so they
   * are resident); new slots given lowest first are taken lowest first.
   */
  giveFresh(slot: number): void {
    this.free.unshift(slot);
  }
}

export class ChunkPool {
  private readonly workers: Worker[] = [];
  private readonly idle: Worker[] = [];
  private readonly queue: { req: PoolRequest; p: Pending }[] = [];
  private readonly pending = new Map<number, { worker: Worker; p: Pending }>();
  private seq = 0;
  private closed = false;
  /** Why the pool can no longer be used (a thread failed or exited): every request fails with it. */
  private broken: VmvaultError | undefined;
  private readonly slots: SlotPlace[] = [];
  /** Places carved from a slot memory (slotMemory) and not yet numbered. */
  private readonly spare: SlotPlace[] = [];
  private readonly free = new SlotList(() => this.newSlot());
  /** Which slots each worker has been sent. */
  private readonly slotsSent = new Map<Worker, Set<number>>();

  /**
   * The workers start at the first request: a backup that change tracking says has
   * nothing to read (an unchanged VM) pays for no thread (about 20 MiB and 50 ms each).
   */
  constructor(private readonly init: PoolInit, private readonly size = availableParallelism()) {}

  /**
   * Starts the threads now rather than at the first request, so that their start-up
   * (about 45 ms) overlaps work the caller does before its first chunk; with `slots`,
   * also makes that many slots ready (see prepareSlots).
   */
  warm(slots = 0): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (this.workers.length === 0) this.start();
    return this.prepareSlots(slots);
  }

  /**
   * Makes at least `n` slots exist, and has the threads, idle until the first chunk,
   * fault in the pages of the new ones. A slot's memory is reserved but not resident
   * until first written; the first chunks would otherwise pay for that (about 2,000 page
   * faults per 4 MiB slot, each 13 µs on this class of virtual machine: 0.1 s of CPU for
   * a backup's slots) in the reads and seals of the data path, when both cores are
   * busy. Each page is written with an atomic add of zero, which changes no byte: the
   * slots are in the free list meanwhile, and a chunk read into one is never disturbed.
   * Resolves once every page was touched (or the pool closed with touches pending: then
   * never); nobody needs to wait for it.
   */
  private async prepareSlots(n: number): Promise<void> {
    const made: number[] = [];
    try {
      while (this.slots.length < n) made.push(this.newSlot());
    } catch {
      // No memory for more (a refused allocation): the chunks make their own slots as they go, and say so if they cannot.
    }
    // Below the slots already free (resident from earlier work, in a kept pool), lowest first: the order they are touched in.
    for (const index of made) this.free.giveFresh(index);
    // A thread that fails says so to the next real request (onWorkerGone): a touch is only a head start.
    await Promise.all(made.map((index) => this.submit({ seq: 0, op: 'touch', in: { slot: index, length: this.slots[index]!.size } }).catch(() => undefined)));
  }

  private start(): void {
    const init = this.init;
    for (let i = 0; i < this.threads; i++) {
      const w = takeChunkThread();
      w.postMessage({ init }); // its first message: the keys
      w.on('message', (res: PoolResponse) => this.onMessage(w, res));
      w.on('error', (err) => this.onWorkerGone(w, `failed: ${err.message}`));
      w.on('exit', (code) => this.onWorkerGone(w, `exited (code ${code})`));
      this.workers.push(w);
      this.idle.push(w);
    }
  }

  /** How many threads the pool runs (started or not). */
  get threads(): number {
    return Math.max(1, this.size);
  }

  /** How many slots exist: at most the chunks ever in flight at once, plus those being sealed. */
  get slotCount(): number {
    return this.slots.length;
  }

  /** Every slot has room for a sealed chunk, the largest thing that goes into one. */
  private newSlot(): number {
    if (this.spare.length === 0) this.spare.push(...slotMemory(sealedChunkBound(this.init.chunkSize)));
    this.slots.push(this.spare.shift()!);
    return this.slots.length - 1;
  }

  /** The whole of slot `index`, or its first `length` bytes: never a byte of the next slot in the same memory. */
  private view(index: number, length?: number): Buffer {
    const { memory, offset, size } = this.slots[index]!;
    if (length !== undefined && !(length >= 0 && length <= size)) throw new RangeError(`${length} bytes do not fit slot ${index} of ${size}`);
    return Buffer.from(memory, offset, length ?? size);
  }

  /** An input slot to read a chunk into (hashSlot, sealSlot); the caller releases it. */
  async slot(): Promise<Slot> {
    const index = this.free.take();
    let released = false;
    return {
      index,
      buffer: this.view(index),
      release: () => {
        if (released) return;
        released = true;
        this.free.give(index);
      },
    };
  }

  /** Chunk id of the first `length` bytes of `slot`, or null when they are all zeros. */
  async hashSlot(slot: Slot, length: number): Promise<string | null> {
    this.checkLength(length);
    return (await this.submit({ seq: 0, op: 'hash', in: { slot: slot.index, length } })).id ?? null;
  }

  /**
   * Compresses and encrypts the first `length` bytes of `slot` into an output slot; the
   * input slot may be released as soon as this resolves. The caller must `release()` the
   * result once `sealed` is stored (or dropped): the next seal reuses its slot.
   */
  async sealSlot(id: string, slot: Slot, length: number): Promise<SealedChunk> {
    this.checkLength(length);
    return this.intoOutput({ seq: 0, op: 'seal', id, in: { slot: slot.index, length } }, (view, release) => ({ sealed: view, release }));
  }

  /** Decrypts, decompresses and checks the id; rejects with IntegrityError. */
  async open(id: string, sealed: Uint8Array): Promise<Buffer> {
    return asBuffer((await this.submit({ seq: 0, op: 'open', id, data: sealed })).data!);
  }

  /**
   * Like `open`, into an output slot: a restore or a verification then allocates
   * nothing per chunk on the main thread. The caller must `release()` the slot once
   * done with `plain`.
   */
  async openInSlot(id: string, sealed: Uint8Array): Promise<OpenedChunk> {
    return this.intoOutput({ seq: 0, op: 'open', id, data: sealed }, (view, release) => ({ plain: view, release }));
  }

  /**
   * Like `openInSlot`, for a sealed chunk already in `slot` (its first `length` bytes):
   * read there from storage (`openStoredChunk`), it is neither copied nor sent, and it is
   * decrypted where it lies (the slot holds no sealed chunk afterwards). The input slot
   * may be released as soon as this resolves.
   */
  async openSlot(id: string, slot: Slot, length: number): Promise<OpenedChunk> {
    this.checkLength(length, 'sealed');
    return this.intoOutput({ seq: 0, op: 'open', id, in: { slot: slot.index, length } }, (view, release) => ({ plain: view, release }));
  }

  /** True once a thread failed or exited: every request fails; a kept pool is replaced (PoolKeeper). */
  get isBroken(): boolean {
    return this.broken !== undefined;
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
  }

  /** A chunk's length (a sealed one's: up to sealedChunkBound) must fit this repository's slots. */
  private checkLength(length: number, kind: 'plain' | 'sealed' = 'plain'): void {
    const max = kind === 'sealed' ? sealedChunkBound(this.init.chunkSize) : this.init.chunkSize;
    if (!Number.isInteger(length) || length < 0 || length > max) {
      throw new RangeError(`a ${kind === 'sealed' ? 'sealed ' : ''}chunk of ${length} bytes does not fit the repository's ${max}`);
    }
  }

  /**
   * Runs `req` with an output slot, taken when a thread picks the request up (dispatch),
   * not when it is queued: chunks waiting for a thread hold no output slot, so a backup
   * whose reads run ahead of sealing needs about inFlight + threads slots, not twice inFlight.
   */
  private async intoOutput<T>(req: PoolRequest, make: (view: Buffer, release: () => void) => T): Promise<T> {
    req.out = OUT_AT_DISPATCH;
    let released = false;
    const release = () => {
      if (released || req.out === OUT_AT_DISPATCH) return;
      released = true;
      this.free.give(req.out!);
    };
    try {
      const r = await this.submit(req);
      return make(this.view(req.out!, r.length!), release);
    } catch (err) {
      release();
      throw err;
    }
  }

  private submit(req: PoolRequest): Promise<PoolResponse & { ok: true }> {
    if (this.closed) return Promise.reject(new Error('chunk pool is closed'));
    if (this.broken) return Promise.reject(this.broken);
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
      if (req.out === OUT_AT_DISPATCH) req.out = this.free.take();
      this.pending.set(req.seq, { worker: w, p });
      const sent = this.slotsSent.get(w) ?? new Set<number>();
      this.slotsSent.set(w, sent);
      const send: [number, SharedArrayBuffer, number, number][] = [];
      for (const s of [req.in?.slot, req.out]) {
        if (s !== undefined && !sent.has(s)) {
          const { memory, offset, size } = this.slots[s]!;
          send.push([s, memory, offset, size]);
          sent.add(s);
        }
      }
      if (send.length) req.send = send;
      const d = req.data;
      const owns = d !== undefined && d.byteOffset === 0 && d.byteLength === d.buffer.byteLength && !(d.buffer instanceof SharedArrayBuffer);
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

  /**
   * A thread that fails or exits while the pool is open: what it was doing, what is
   * queued and every later request fail with the reason, at once. A pool short of a
   * thread would otherwise wait for ever once the others are busy; the operation fails
   * instead, and can be run again (a job is retried).
   */
  private onWorkerGone(w: Worker, why: string): void {
    if (this.closed || !this.workers.includes(w)) return;
    this.workers.splice(this.workers.indexOf(w), 1);
    if (this.idle.includes(w)) this.idle.splice(this.idle.indexOf(w), 1);
    this.broken = new VmvaultError('INTERNAL', `a chunk worker thread ${why}: the operation was stopped; run it again, and report it if it happens again`);
    for (const [seq, entry] of this.pending) {
      this.pending.delete(seq);
      entry.p.reject(this.broken);
    }
    for (const { p } of this.queue.splice(0)) p.reject(this.broken);
    for (const other of this.workers.splice(0)) void other.terminate();
    this.idle.length = 0;
  }
}

/**
 * Chunk `id` of `repo`, read from storage into a slot and opened from there into
 * another: no buffer is allocated, copied or sent to a thread for it (a chunk file read
 * into a new buffer cost a fifth of a restore's CPU in page faults alone). The caller
 * must `release()` the result.
 */
export async function openStoredChunk(repo: Pick<Repository, 'getChunkSealedInto'>, pool: ChunkPool, id: string, signal?: AbortSignal): Promise<OpenedChunk> {
  const input = await pool.slot();
  try {
    // With a signal, a read on a slow link is cut when it aborts (a cancelled restore): the slot is freed only once nothing writes into it.
    return await pool.openSlot(id, input, await repo.getChunkSealedInto(id, input.buffer, signal ? { signal } : {}));
  } finally {
    input.release();
  }
}

/** Where a slot lies: `size` bytes at `offset` in a shared memory. */
interface SlotPlace { memory: SharedArrayBuffer; offset: number; size: number }

/**
 * Slots carved from one shared memory. V8 reserves about 10 GiB of address space for
 * each WebAssembly memory (guard regions; nothing resident until used): one memory for
 * the slots of a typical pool keeps a process's virtual size at that, not a multiple.
 */
const SLOTS_PER_MEMORY = 16;
/** A WebAssembly page: the unit a WebAssembly memory is sized in. */
const WASM_PAGE = 64 * 1024;
/** The one WebAssembly class used here (the project's "lib" setting declares none). */
declare const WebAssembly: { Memory: new (desc: { initial: number; maximum: number; shared: true }) => { buffer: SharedArrayBuffer } };

/**
 * SLOTS_PER_MEMORY slots of `size` bytes, each starting on a page boundary: carved from a
 * shared WebAssembly memory, which is page-aligned where a plain SharedArrayBuffer is not
 * (its first byte sits a malloc header past one). A slot can then be written to a file
 * with O_DIRECT as it is (pipeline/disk-writer.ts), without a copy into an aligned buffer
 * first. Where such a memory cannot be had (the address space it reserves is refused),
 * plain shared memory, one slot each: correct, only copied before O_DIRECT writes.
 */
function slotMemory(size: number): SlotPlace[] {
  const stride = Math.ceil(size / WASM_PAGE) * WASM_PAGE;
  if (!wasmMemoryRefused) {
    try {
      const pages = (stride * SLOTS_PER_MEMORY) / WASM_PAGE;
      const memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true }).buffer;
      return Array.from({ length: SLOTS_PER_MEMORY }, (_, i) => ({ memory, offset: i * stride, size }));
    } catch {
      // Not asked again by this process: before refusing, V8 runs full collections to find room.
      wasmMemoryRefused = true;
    }
  }
  return [{ memory: new SharedArrayBuffer(size), offset: 0, size }];
}
let wasmMemoryRefused = false;

/** A pool to use until `release()`. */
export interface PoolLease { readonly pool: ChunkPool; release(): Promise<void> }

/** A pool for one operation: released is closed. */
export function ownPool(init: PoolInit): PoolLease {
  const pool = new ChunkPool(init);
  return { pool, release: () => pool.close() };
}

/**
 * A pool kept between the operations of a long-running process (the host worker), so
 * that a job starts on threads already up: starting two takes about 60 ms of CPU on this
 * class of machine, a fifth of a 2% incremental's job. Operations that overlap share it
 * (each bounds its own chunks in flight). A pool that broke is replaced for the next
 * lease and closed when its last user releases it; one unused for `idleMs` is closed,
 * and its threads and slots freed. A backup that fails does not wait for the chunks it
 * had in flight (one may hang on a stuck disk read): those finish on the kept pool, or
 * are dropped when it closes, as they were when a backup closed a pool of its own.
 */
export class PoolKeeper {
  private current: ChunkPool | undefined;
  private readonly users = new Map<ChunkPool, number>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly init: () => PoolInit, private readonly idleMs: number) {}

  lease(): PoolLease {
    clearTimeout(this.timer);
    if (this.current?.isBroken) void this.retire();
    const pool = (this.current ??= new ChunkPool(this.init()));
    this.users.set(pool, (this.users.get(pool) ?? 0) + 1);
    let released = false;
    return {
      pool,
      release: async () => {
        if (released) return;
        released = true;
        await this.give(pool);
      },
    };
  }

  /** Closes the kept pool now, or as soon as its operations release it. */
  async close(): Promise<void> {
    clearTimeout(this.timer);
    await this.retire();
  }

  private async give(pool: ChunkPool): Promise<void> {
    const left = this.users.get(pool)! - 1;
    if (left > 0) {
      this.users.set(pool, left);
      return;
    }
    this.users.delete(pool);
    if (pool !== this.current) {
      await pool.close();
    } else if (pool.isBroken) {
      await this.retire();
    } else {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => void this.retire(), this.idleMs);
      this.timer.unref();
    }
  }

  /** Stops handing out the current pool; closes it unless in use (its last release does). */
  private async retire(): Promise<void> {
    const pool = this.current;
    this.current = undefined;
    if (pool && !this.users.has(pool)) await pool.close();
  }
}

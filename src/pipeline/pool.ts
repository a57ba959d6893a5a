/**
 * A pool of worker threads, one per core, that hash, seal and open chunks.
 * Buffers are transferred, not copied, where they own their whole ArrayBuffer.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { IntegrityError, VmvaultError, type ErrorCode } from '../errors.js';
import type { ChunkIdHash } from '../crypto/keys.js';

export interface PoolInit { master: Uint8Array; repoId: string; level: number; idHash: ChunkIdHash }
export type PoolRequest =
  | { seq: number; op: 'hash'; data: Uint8Array }
  | { seq: number; op: 'seal'; id: string; data: Uint8Array }
  | { seq: number; op: 'open'; id: string; data: Uint8Array };
export type PoolResponse =
  | { seq: number; ok: true; id?: string | null; data: Uint8Array; plain?: Uint8Array }
  | { seq: number; ok: false; name: string; code: string | undefined; message: string };

type Pending = { resolve: (r: PoolResponse & { ok: true }) => void; reject: (e: Error) => void };

export class ChunkPool {
  private readonly workers: Worker[] = [];
  private readonly idle: Worker[] = [];
  private readonly queue: { req: PoolRequest; p: Pending }[] = [];
  private readonly pending = new Map<number, { worker: Worker; p: Pending }>();
  private seq = 0;
  private closed = false;

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

  /** Compresses and encrypts; `data` is handed over and comes back as `plain` for reuse. */
  async seal(id: string, data: Buffer): Promise<{ sealed: Buffer; plain: Buffer }> {
    const r = await this.submit({ seq: 0, op: 'seal', id, data });
    return { sealed: asBuffer(r.data), plain: asBuffer(r.plain ?? new Uint8Array(0)) };
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

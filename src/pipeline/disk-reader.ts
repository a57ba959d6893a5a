/**
 * Random access to the raw bytes of one backed-up disk, for streaming it over HTTP
 * (Range requests from QEMU's curl driver and the like). Chunks are fetched,
 * decrypted and re-hashed in the chunk pool's worker threads, and kept in a small
 * LRU cache shared by every reader: a client reading 256 KiB at a time through a
 * 4 MiB chunk costs one download, not sixteen. Zero chunks are never fetched.
 */
import { copyBytes } from '../bytes.js';
import { VmvaultError } from '../errors.js';
import type { Repository } from '../repo/repository.js';
import type { DiskEntry } from '../repo/manifest.js';
import { PromiseLru } from './lru.js';
import { ChunkPool, openStoredChunk } from './pool.js';

/**
 * The largest piece a stream hands out. An HTTP response writes whatever it is given
 * before it looks at back-pressure, so this (times the few pieces @hono/node-server
 * reads ahead) is what a client that stops reading keeps in memory: 256 KiB, where a
 * whole 4 MiB chunk per client let 100 paused clients hold 400 MB.
 */
export const STREAM_PIECE_BYTES = 256 * 1024;

/** How long a stream keeps its current chunk after the consumer's last pull. */
const HOLD_CHUNK_MS = 1000;

export class DiskReader {
  private pool: ChunkPool | undefined;
  private readonly cache: PromiseLru<Buffer>;
  private zero: Buffer | undefined;

  /**
   * `cacheChunks`: decrypted chunks kept (default 8, i.e. 32 MiB at 4 MiB chunks). A
   * sequential reader needs one, and readers far apart cost fetches, not memory: with
   * 16, an NBD export read by qemu-img peaked at 232 to 262 MiB resident for a 4 GiB
   * disk; with 8, at 204 to 211 MiB, in the same time.
   */
  constructor(private readonly repo: Repository, cacheChunks = 8) {
    this.cache = new PromiseLru<Buffer>(cacheChunks);
  }

  /**
   * The bytes [start, end] (inclusive) of `disk`, pulled as the consumer reads, in
   * pieces of at most STREAM_PIECE_BYTES. Each piece is a copy (the cached chunk must
   * not be handed to a stream that may transfer or detach it), so what a consumer that
   * stops reading holds is the few pieces it was given, not a chunk-sized copy. The
   * chunk being read is kept between pulls, but only for HOLD_CHUNK_MS after the last
   * one: a paused consumer does not keep a chunk alive that the cache has let go.
   */
  stream(disk: DiskEntry, chunkSize: number, start: number, end: number): ReadableStream<Uint8Array> {
    if (start < 0 || end >= disk.virtualSize || start > end) {
      throw new VmvaultError('BAD_INPUT', `range ${start}-${end} is outside disk "${disk.name}" (${disk.virtualSize} bytes)`);
    }
    let pos = start;
    let held: { index: number; data: Buffer } | undefined;
    let timer: NodeJS.Timeout | undefined;
    const letGo = (): void => {
      clearTimeout(timer);
      held = undefined;
    };
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        clearTimeout(timer);
        if (pos > end) {
          letGo();
          controller.close();
          return;
        }
        const index = Math.floor(pos / chunkSize);
        const chunkStart = index * chunkSize;
        const chunkEnd = Math.min(chunkStart + chunkSize, disk.virtualSize) - 1;
        const to = Math.min(end, chunkEnd, pos + STREAM_PIECE_BYTES - 1);
        if (held?.index !== index) held = { index, data: await this.chunk(disk, index, chunkSize) };
        controller.enqueue(new Uint8Array(held.data.subarray(pos - chunkStart, to - chunkStart + 1)));
        pos = to + 1;
        timer = setTimeout(letGo, HOLD_CHUNK_MS).unref();
      },
      cancel: letGo,
    }, { highWaterMark: 0 });
  }

  /** The bytes [start, end] (inclusive) of `disk` in one buffer: for ranges of a few chunks. */
  async read(disk: DiskEntry, chunkSize: number, start: number, end: number): Promise<Buffer> {
    const parts: Uint8Array[] = [];
    const reader = this.stream(disk, chunkSize, start, end).getReader();
    for (;;) {
      const r = await reader.read();
      if (r.done) break;
      parts.push(r.value);
    }
    return Buffer.concat(parts);
  }

  /**
   * Chunk `index` of `disk`, decrypted and verified (zeros for a zero chunk). The
   * buffer may be the cache's own: callers must not change it.
   */
  async chunk(disk: DiskEntry, index: number, chunkSize: number): Promise<Buffer> {
    const id = disk.chunks[index];
    const length = Math.min(chunkSize, disk.virtualSize - index * chunkSize);
    if (id === undefined) throw new VmvaultError('INTEGRITY', `disk "${disk.name}" has no chunk ${index} in its manifest`);
    if (id === null) {
      if (!this.zero || this.zero.length < chunkSize) this.zero = Buffer.alloc(chunkSize);
      return this.zero.subarray(0, length);
    }
    const data = await this.cache.get(id, async () => {
      this.pool ??= new ChunkPool(this.repo.workerInit(), 2);
      const pool = this.pool;
      // Opened into a slot of the pool and copied out by this thread: a chunk made by a
      // worker thread and dropped here (when the cache lets it go) left glibc's per-thread
      // arenas holding freed memory, about 60 MiB more resident for a reader of a 4 GiB disk.
      const opened = await openStoredChunk(this.repo, pool, id);
      try {
        const own = Buffer.allocUnsafeSlow(opened.plain.length);
        copyBytes(opened.plain, own);
        return own;
      } finally {
        opened.release();
      }
    });
    if (data.length !== length) {
      throw new VmvaultError('INTEGRITY', `chunk ${id.slice(0, 16)} of disk "${disk.name}" holds ${data.length} bytes where ${length} were expected`);
    }
    return data;
  }

  async close(): Promise<void> {
    this.cache.clear();
    await this.pool?.close();
    this.pool = undefined;
  }
}

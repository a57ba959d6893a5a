/**
 * Random access to the raw bytes of one backed-up disk, for streaming it over HTTP
 * (Range requests from QEMU's curl driver and the like). Chunks are fetched,
 * decrypted and re-hashed in the chunk pool's worker threads, and kept in a small
 * LRU cache shared by every reader: a client reading 256 KiB at a time through a
 * 4 MiB chunk costs one download, not sixteen. Zero chunks are never fetched.
 */
import { VmvaultError } from '../errors.js';
import type { Repository } from '../repo/repository.js';
import type { DiskEntry } from '../repo/manifest.js';
import { PromiseLru } from './lru.js';
import { ChunkPool } from './pool.js';

export class DiskReader {
  private pool: ChunkPool | undefined;
  private readonly cache: PromiseLru<Buffer>;
  private zero: Buffer | undefined;

  /** `cacheChunks`: decrypted chunks kept (default 16, i.e. 64 MiB at 4 MiB chunks). */
  constructor(private readonly repo: Repository, cacheChunks = 16) {
    this.cache = new PromiseLru<Buffer>(cacheChunks);
  }

  /** The bytes [start, end] (inclusive) of `disk`, in pieces of at most one chunk, pulled as the consumer reads. */
  stream(disk: DiskEntry, chunkSize: number, start: number, end: number): ReadableStream<Uint8Array> {
    if (start < 0 || end >= disk.virtualSize || start > end) {
      throw new VmvaultError('BAD_INPUT', `range ${start}-${end} is outside disk "${disk.name}" (${disk.virtualSize} bytes)`);
    }
    let pos = start;
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        if (pos > end) {
          controller.close();
          return;
        }
        const index = Math.floor(pos / chunkSize);
        const chunkStart = index * chunkSize;
        const chunkEnd = Math.min(chunkStart + chunkSize, disk.virtualSize) - 1;
        const to = Math.min(end, chunkEnd);
        const data = await this.chunk(disk, index, chunkSize);
        // A copy: the cached buffer must not be handed to a stream that may transfer or detach it.
        controller.enqueue(new Uint8Array(data.subarray(pos - chunkStart, to - chunkStart + 1)));
        pos = to + 1;
      },
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

  private async chunk(disk: DiskEntry, index: number, chunkSize: number): Promise<Buffer> {
    const id = disk.chunks[index];
    const length = Math.min(chunkSize, disk.virtualSize - index * chunkSize);
    if (id === undefined) throw new VmvaultError('INTEGRITY', `disk "${disk.name}" has no chunk ${index} in its manifest`);
    if (id === null) {
      if (!this.zero || this.zero.length < chunkSize) this.zero = Buffer.alloc(chunkSize);
      return this.zero.subarray(0, length);
    }
    const data = await this.cache.get(id, () => {
      this.pool ??= new ChunkPool(this.repo.workerInit(), 2);
      const pool = this.pool;
      return this.repo.getChunkSealed(id).then((sealed) => pool.open(id, sealed));
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

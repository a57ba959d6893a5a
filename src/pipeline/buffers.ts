/**
 * Reusable chunk-sized buffers. A backup would otherwise allocate a fresh 4 MiB
 * buffer per chunk, and the garbage collector, lagging behind, lets the process
 * grow by hundreds of MiB and steals the main thread's time.
 */
export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(private readonly size: number, private readonly keep: number) {}

  /** A buffer of `length` bytes with unspecified content. */
  take(length: number): Buffer {
    if (length !== this.size) return Buffer.allocUnsafeSlow(length);
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  /** Hands a buffer back; buffers of another size, or beyond `keep`, are left to the GC. */
  give(buf: Buffer): void {
    if (buf.length === this.size && buf.byteOffset === 0 && buf.buffer.byteLength === this.size && this.free.length < this.keep) {
      this.free.push(buf);
    }
  }
}

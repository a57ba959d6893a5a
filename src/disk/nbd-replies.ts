/**
 * The transmission-phase reply parser: a push state machine fed with whatever the
 * socket delivers. It never concatenates the stream: headers and small payloads are
 * assembled in fixed scratch buffers, and read data (simple replies and
 * NBD_REPLY_TYPE_OFFSET_DATA) is copied straight into the request's destination.
 */
import { VmvaultError } from '../errors.js';
import {
  COMMAND_NAMES, NBD_CMD_BLOCK_STATUS, NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR_BIT, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC, NBD_STRUCTURED_REPLY_SIZE, errnoCodeOf, errnoName, readU64,
} from './nbd-protocol.js';
import { copyBytes } from '../bytes.js';
import { errnoError } from '../storage/refusal.js';

/** A request waiting for its reply. Owned by the client; filled in by the parser. */
export interface Pending {
  handle: number;
  cmd: number;
  offset: number;
  length: number;
  /** Reads: bytes [offset, offset+length) of the export land at dest[destAt…]. */
  dest: Buffer | undefined;
  destAt: number;
  /** Reads: content bytes received so far. */
  covered: number;
  /** Reads: end of the content received contiguously from `offset` (the usual, in-order case). */
  next: number;
  /** Reads: [start, end) pairs of content chunks that arrived out of order, checked at the end. */
  ranges: number[] | undefined;
  /** Block status: (length, flags) pairs of the base:allocation context, in order. */
  descriptors: number[] | undefined;
  /** The first error the server reported for this request. */
  error: { errno: number; message: string } | undefined;
  resolve: () => void;
  reject: (err: Error) => void;
}

export interface ReplySink {
  /** The request with this handle, or undefined when none is in flight. */
  lookup(handle: number): Pending | undefined;
  /** The server has sent the last reply chunk of `p` (successful or not). */
  finish(p: Pending): void;
  /** The stream can no longer be trusted: fail every request and drop the connection. */
  violation(message: string): void;
}

/** Block status replies are small in practice; anything this large is hostile. */
const MAX_SMALL_PAYLOAD = 64 * 1024 * 1024;

const enum State { Header, SimpleData, OffsetPrefix, ChunkData, Payload, Dead }

export class ReplyParser {
  private state = State.Header;
  private readonly header = Buffer.alloc(NBD_STRUCTURED_REPLY_SIZE);
  private headerFill = 0;
  private headerSize = 0;
  private current: Pending | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  /** Payload scratch for OFFSET_DATA's 8-byte offset and small chunk payloads. */
  private payload = Buffer.alloc(64);
  private payloadFill = 0;
  private payloadSize = 0;
  /** Where ChunkData / SimpleData bytes go, and how many are left. */
  private copyAt = 0;
  private copyLeft = 0;

  constructor(private readonly sink: ReplySink, private readonly allocationContext: number | undefined) {}

  /** Consume one chunk of the stream. `data` may be reused by the caller afterwards. */
  push(data: Buffer): void {
    let pos = 0;
    const end = data.length;
    while (pos < end && this.state !== State.Dead) {
      switch (this.state) {
        case State.Header: {
          // The magic (first 4 bytes) decides whether the header is 16 or 20 bytes.
          const want = this.headerFill < 4 ? 4 : this.headerSize;
          const n = Math.min(want - this.headerFill, end - pos);
          data.copy(this.header, this.headerFill, pos, pos + n);
          this.headerFill += n;
          pos += n;
          if (this.headerFill === 4) {
            const magic = this.header.readUInt32BE(0);
            if (magic === NBD_SIMPLE_REPLY_MAGIC) this.headerSize = NBD_SIMPLE_REPLY_SIZE;
            else if (magic === NBD_STRUCTURED_REPLY_MAGIC) this.headerSize = NBD_STRUCTURED_REPLY_SIZE;
            else return this.fail(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
          } else if (this.headerFill === this.headerSize) {
            this.headerFill = 0;
            if (this.headerSize === NBD_SIMPLE_REPLY_SIZE) this.onSimpleHeader();
            else this.onChunkHeader();
          }
          break;
        }
        case State.SimpleData:
        case State.ChunkData: {
          const n = Math.min(this.copyLeft, end - pos);
          copyBytes(data.subarray(pos, pos + n), this.current!.dest!, this.copyAt);
          pos += n;
          this.dataArrived(n);
          break;
        }
        case State.OffsetPrefix:
        case State.Payload: {
          const n = Math.min(this.payloadSize - this.payloadFill, end - pos);
          data.copy(this.payload, this.payloadFill, pos, pos + n);
          this.payloadFill += n;
          pos += n;
          if (this.payloadFill === this.payloadSize) {
            if (this.state === State.OffsetPrefix) this.onDataOffset();
            else this.onPayload();
          }
          break;
        }
      }
    }
  }

  /**
   * Where the next bytes of the stream may be read straight into: the rest of the
   * current read's destination while its data is arriving, else undefined. The kernel
   * then writes a reply's data where the reader wants it (a chunk's slot of shared
   * memory, where a JavaScript copy is several times slower than memcpy). Once `n`
   * bytes have been read there, call `receivedDirect(n)`.
   */
  directTarget(): Uint8Array | undefined {
    if ((this.state !== State.SimpleData && this.state !== State.ChunkData) || this.copyLeft === 0) return undefined;
    return this.current!.dest!.subarray(this.copyAt, this.copyAt + this.copyLeft);
  }

  /** `n` bytes (at most what `directTarget()` offered) were read into it. */
  receivedDirect(n: number): void {
    if ((this.state !== State.SimpleData && this.state !== State.ChunkData) || n > this.copyLeft) {
      return this.fail(`${n} bytes read for a reply that expected ${this.copyLeft}`);
    }
    this.dataArrived(n);
  }

  private dataArrived(n: number): void {
    this.copyAt += n;
    this.copyLeft -= n;
    if (this.copyLeft === 0) {
      if (this.state === State.SimpleData) this.done(this.current!);
      else this.endChunk();
    }
  }

  private fail(message: string): void {
    this.state = State.Dead;
    this.sink.violation(message);
  }

  private find(handle: number): Pending | undefined {
    const p = this.sink.lookup(handle);
    if (!p) this.fail(`reply for handle ${handle}, which no request in flight has`);
    return p;
  }

  private onSimpleHeader(): void {
    const errno = this.header.readUInt32BE(4);
    const p = this.find(readU64(this.header, 8));
    if (!p) return;
    if (errno !== 0) {
      p.error = { errno, message: '' };
      return this.done(p); // No payload follows an error.
    }
    if (p.cmd === NBD_CMD_BLOCK_STATUS) return this.fail('simple reply to a block-status request');
    if (p.cmd === NBD_CMD_READ && p.length > 0) {
      this.current = p;
      p.covered = p.length;
      p.next = p.offset + p.length;
      this.copyAt = p.destAt;
      this.copyLeft = p.length;
      this.state = State.SimpleData;
      return;
    }
    this.done(p);
  }

  private onChunkHeader(): void {
    this.chunkFlags = this.header.readUInt16BE(4);
    this.chunkType = this.header.readUInt16BE(6);
    this.chunkLength = this.header.readUInt32BE(16);
    const p = this.find(readU64(this.header, 8));
    if (!p) return;
    this.current = p;
    const type = this.chunkType;
    const len = this.chunkLength;
    const cmd = COMMAND_NAMES[p.cmd] ?? `command ${p.cmd}`;
    if (type === NBD_REPLY_TYPE_NONE) {
      if (len !== 0) return this.fail(`NBD_REPLY_TYPE_NONE with a ${len}-byte payload`);
      if (!(this.chunkFlags & NBD_REPLY_FLAG_DONE)) return this.fail('NBD_REPLY_TYPE_NONE without the DONE flag');
      return this.endChunk();
    }
    if (type === NBD_REPLY_TYPE_OFFSET_DATA) {
      if (p.cmd !== NBD_CMD_READ) return this.fail(`data chunk in reply to a ${cmd} request`);
      if (len < 9) return this.fail(`data chunk of ${len} bytes`);
      return this.expectPayload(8, State.OffsetPrefix);
    }
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (p.cmd !== NBD_CMD_READ) return this.fail(`hole chunk in reply to a ${cmd} request`);
      if (len !== 12) return this.fail(`hole chunk of ${len} bytes`);
      return this.expectPayload(len, State.Payload);
    }
    if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      if (p.cmd !== NBD_CMD_BLOCK_STATUS) return this.fail(`block status chunk in reply to a ${cmd} request`);
      if (len < 12 || (len - 4) % 8 !== 0) return this.fail(`block status chunk of ${len} bytes`);
      return this.expectPayload(len, State.Payload);
    }
    if (type & NBD_REPLY_TYPE_ERROR_BIT) {
      if (len < 6) return this.fail(`error chunk of ${len} bytes`);
      return this.expectPayload(len, State.Payload);
    }
    this.fail(`unknown reply chunk type ${type}`);
  }

  private expectPayload(size: number, state: State.OffsetPrefix | State.Payload): void {
    if (size > MAX_SMALL_PAYLOAD) return this.fail(`reply chunk of ${size} bytes`);
    if (this.payload.length < size) this.payload = Buffer.alloc(Math.max(size, this.payload.length * 2));
    this.payloadSize = size;
    this.payloadFill = 0;
    this.state = state;
  }

  /**
   * Record a content chunk; false when it lies outside the request. Chunks in order
   * (what qemu sends) only move `next`; others are kept for the overlap check in
   * `fullyCovered`, because holes in the coverage would leave uninitialised bytes.
   */
  private addContent(p: Pending, offset: number, length: number): boolean {
    if (offset < p.offset || offset + length > p.offset + p.length || p.covered + length > p.length) return false;
    p.covered += length;
    if (offset === p.next) p.next += length;
    else (p.ranges ??= []).push(offset, offset + length);
    return true;
  }

  /** Chunks covered [offset, offset+length) exactly once. */
  private fullyCovered(p: Pending): boolean {
    if (p.covered !== p.length) return false;
    if (!p.ranges) return true;
    const all = [[p.offset, p.next] as const];
    for (let i = 0; i < p.ranges.length; i += 2) all.push([p.ranges[i]!, p.ranges[i + 1]!]);
    all.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < all.length; i++) if (all[i]![0] < all[i - 1]![1]) return false;
    return true; // No overlaps and the lengths add up: no gaps either.
  }

  private onDataOffset(): void {
    const p = this.current!;
    const offset = readU64(this.payload, 0);
    const length = this.chunkLength - 8;
    if (!this.addContent(p, offset, length)) return this.fail(`data chunk [${offset}, +${length}) outside the request [${p.offset}, +${p.length})`);
    this.copyAt = p.destAt + (offset - p.offset);
    this.copyLeft = length;
    this.state = State.ChunkData;
  }

  private onPayload(): void {
    const p = this.current!;
    const buf = this.payload;
    const type = this.chunkType;
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const offset = readU64(buf, 0);
      const length = buf.readUInt32BE(8);
      if (length === 0 || !this.addContent(p, offset, length)) return this.fail(`hole chunk [${offset}, +${length}) outside the request [${p.offset}, +${p.length})`);
      const at = p.destAt + (offset - p.offset);
      p.dest!.fill(0, at, at + length); // Holes read as zeros; dest may be uninitialised memory.
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      if (buf.readUInt32BE(0) === this.allocationContext) {
        const descriptors: number[] = [];
        for (let at = 4; at < this.payloadSize; at += 8) {
          const length = buf.readUInt32BE(at);
          if (length === 0) return this.fail('block status descriptor of length 0');
          descriptors.push(length, buf.readUInt32BE(at + 4));
        }
        p.descriptors = descriptors;
      } // Contexts we did not ask for are ignored.
    } else {
      const errno = buf.readUInt32BE(0);
      const msgLength = buf.readUInt16BE(4);
      const extra = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
      if (6 + msgLength + extra > this.payloadSize) return this.fail(`error chunk message of ${msgLength} bytes does not fit its ${this.payloadSize}-byte chunk`);
      let message = buf.toString('utf8', 6, 6 + msgLength);
      if (type === NBD_REPLY_TYPE_ERROR_OFFSET) message += `${message ? ' ' : ''}(at offset ${readU64(buf, 6 + msgLength)})`;
      p.error ??= { errno: errno === 0 ? 22 : errno, message };
    }
    this.endChunk();
  }

  private endChunk(): void {
    const p = this.current!;
    this.state = State.Header;
    if (!(this.chunkFlags & NBD_REPLY_FLAG_DONE)) return;
    if (!p.error) {
      if (p.cmd === NBD_CMD_READ && !this.fullyCovered(p)) return this.fail(`read reply ended with ${p.covered} of ${p.length} bytes, or with overlapping chunks`);
      if (p.cmd === NBD_CMD_BLOCK_STATUS && !p.descriptors) return this.fail('block status reply without a base:allocation chunk');
    }
    this.done(p);
  }

  private done(p: Pending): void {
    this.state = State.Header;
    this.current = undefined;
    this.sink.finish(p);
  }
}

/** The error a request fails with when the server reported one for it. */
export function requestError(p: Pending, readOnly: boolean): VmvaultError {
  const cmd = COMMAND_NAMES[p.cmd] ?? `command ${p.cmd}`;
  const e = p.error!;
  let text = `NBD ${cmd} of ${p.length} bytes at offset ${p.offset} failed: ${errnoName(e.errno)}`;
  if (e.message) text += `: ${e.message}`;
  const writes = p.cmd === NBD_CMD_WRITE || p.cmd === NBD_CMD_WRITE_ZEROES;
  if (writes && readOnly && !/read-only/i.test(e.message)) text += ' (the export is read-only)';
  // The errno as a cause, as a file system call gives it: callers tell a full target (ENOSPC) from a broken one by it.
  const code = errnoCodeOf(e.errno);
  return new VmvaultError('NBD', text, code ? { cause: errnoError(code, e.message || errnoName(e.errno)) } : {});
}

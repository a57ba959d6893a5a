/**
 * The NBD fixed newstyle handshake: greeting, NBD_OPT_STRUCTURED_REPLY,
 * NBD_OPT_SET_META_CONTEXT(base:allocation) and NBD_OPT_GO, ending in the
 * transmission phase. Volume is tiny here, so clarity beats speed: the reader
 * awaits exact byte counts.
 */
import type { Socket } from 'node:net';
import { VmvaultError } from '../errors.js';
import {
  BASE_ALLOCATION, DEFAULT_MAX_PAYLOAD, NBD_CLISERV_MAGIC, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_INIT_MAGIC,
  NBD_OPTS_MAGIC, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK, NBD_REP_ERR_UNSUP, NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT,
  encodeOption, lengthPrefixed, optionErrorName, readU64,
} from './nbd-protocol.js';

/** What the handshake learned; everything the transmission phase needs. */
export interface Negotiated {
  size: number;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** Context id of the requested meta context (base:allocation unless told otherwise), or undefined when the server offered none. */
  allocationContext: number | undefined;
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
  /** Bytes that arrived after the handshake ended (normally none). */
  leftover: Buffer;
}

/**
 * Collects bytes pushed by the socket's read callback and hands out exact counts.
 * Pushed chunks are copied: the client reads into one reused buffer.
 */
export class ExactReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;

  push(chunk: Buffer): void {
    this.chunks.push(Buffer.from(chunk));
    this.buffered += chunk.length;
    this.serve();
  }

  /** Every pending and future read rejects with this error. */
  fail(err: Error): void {
    this.failure ??= err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.failure);
  }

  private serve(): void {
    const w = this.waiter;
    if (!w || this.buffered < w.n) return;
    this.waiter = undefined;
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = all.length > w.n ? [all.subarray(w.n)] : [];
    this.buffered -= w.n;
    w.resolve(all.subarray(0, w.n));
  }

  read(n: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.serve();
    });
  }

  /** Whatever arrived beyond the last read. */
  leftover(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

interface OptionReply { type: number; data: Buffer }

/**
 * Run the handshake on a connected socket. Rejects with VmvaultError('NBD') that
 * names the server's refusal (NBD_REP_ERR_*), or the protocol violation seen.
 */
export async function negotiate(socket: Socket, reader: ExactReader, exportName: string, describe: string, metaContext = BASE_ALLOCATION): Promise<Negotiated> {
  const violation = (what: string): VmvaultError =>
    new VmvaultError('NBD', `protocol violation from NBD server ${describe} during the handshake: ${what}`);
  const greeting = await reader.read(18);
  if (greeting.readBigUInt64BE(0) !== NBD_INIT_MAGIC) throw violation('it did not start with NBDMAGIC (is this an NBD socket?)');
  const second = greeting.readBigUInt64BE(8);
  if (second === NBD_CLISERV_MAGIC) throw new VmvaultError('NBD', `NBD server ${describe} only speaks the oldstyle handshake, which is not supported`);
  if (second !== NBD_OPTS_MAGIC) throw violation('no IHAVEOPT magic after NBDMAGIC');
  const serverFlags = greeting.readUInt16BE(16);
  if (!(serverFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new VmvaultError('NBD', `NBD server ${describe} does not support the fixed newstyle handshake`);
  const noZeroes = (serverFlags & NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = Buffer.allocUnsafe(4);
  clientFlags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  socket.write(clientFlags);

  const option = async (opt: number, data?: Buffer): Promise<OptionReply[]> => {
    socket.write(encodeOption(opt, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const head = await reader.read(20);
      if (head.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw violation(`bad option reply magic 0x${head.readBigUInt64BE(0).toString(16)}`);
      if (head.readUInt32BE(8) !== opt) throw violation(`reply to option ${head.readUInt32BE(8)} while waiting for option ${opt}`);
      const type = head.readUInt32BE(12);
      const length = head.readUInt32BE(16);
      if (length > 1024 * 1024) throw violation(`option reply of ${length} bytes`);
      const data = length > 0 ? Buffer.from(await reader.read(length)) : Buffer.alloc(0);
      replies.push({ type, data });
      if (type === NBD_REP_ACK || (type & NBD_REP_FLAG_ERROR) !== 0) return replies;
    }
  };
  const final = (replies: OptionReply[]): OptionReply => replies[replies.length - 1]!;
  const refusal = (what: string, reply: OptionReply): VmvaultError => {
    const msg = reply.data.length > 0 ? `: ${reply.data.toString('utf8')}` : '';
    return new VmvaultError('NBD', `NBD server ${describe} refused ${what}: ${optionErrorName(reply.type)}${msg}`);
  };

  // Structured replies let reads skip holes and carry error messages; optional.
  const sr = final(await option(NBD_OPT_STRUCTURED_REPLY));
  const structuredReplies = sr.type === NBD_REP_ACK;

  let allocationContext: number | undefined;
  if (structuredReplies) {
    const query = Buffer.concat([lengthPrefixed(exportName), Buffer.from([0, 0, 0, 1]), lengthPrefixed(metaContext)]);
    const replies = await option(NBD_OPT_SET_META_CONTEXT, query);
    if (final(replies).type === NBD_REP_ACK) {
      for (const r of replies) {
        if (r.type !== NBD_REP_META_CONTEXT) continue;
        if (r.data.length < 4) throw violation('short NBD_REP_META_CONTEXT');
        if (r.data.subarray(4).toString('utf8') === metaContext) allocationContext = r.data.readUInt32BE(0);
      }
    } // An error here only means no extents; extents() then reports everything as data.
  }

  const name = Buffer.from(exportName, 'utf8');
  const go = Buffer.allocUnsafe(4 + name.length + 4);
  go.writeUInt32BE(name.length, 0);
  name.copy(go, 4);
  go.writeUInt16BE(1, 4 + name.length);
  go.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 6 + name.length);
  const replies = await option(NBD_OPT_GO, go);
  const last = final(replies);
  if (last.type === NBD_REP_ERR_UNSUP) {
    // A server from before NBD_OPT_GO: the old way cannot report errors, but works.
    socket.write(encodeOption(NBD_OPT_EXPORT_NAME, name));
    const info = await reader.read(noZeroes ? 10 : 134);
    return {
      size: readU64(info, 0), transmissionFlags: info.readUInt16BE(8), structuredReplies, allocationContext,
      minBlock: 1, preferredBlock: 4096, maxBlock: DEFAULT_MAX_PAYLOAD, leftover: reader.leftover(),
    };
  }
  if (last.type !== NBD_REP_ACK) throw refusal(`export "${exportName}"`, last);

  let size: number | undefined;
  let transmissionFlags = 0;
  let minBlock = 1, preferredBlock = 4096, maxBlock = DEFAULT_MAX_PAYLOAD;
  for (const r of replies) {
    if (r.type !== NBD_REP_INFO) continue;
    if (r.data.length < 2) throw violation('short NBD_REP_INFO');
    const item = r.data.readUInt16BE(0);
    if (item === NBD_INFO_EXPORT) {
      if (r.data.length !== 12) throw violation(`NBD_INFO_EXPORT of ${r.data.length} bytes`);
      size = readU64(r.data, 2);
      transmissionFlags = r.data.readUInt16BE(10);
    } else if (item === NBD_INFO_BLOCK_SIZE) {
      if (r.data.length !== 14) throw violation(`NBD_INFO_BLOCK_SIZE of ${r.data.length} bytes`);
      minBlock = r.data.readUInt32BE(2);
      preferredBlock = r.data.readUInt32BE(6);
      maxBlock = r.data.readUInt32BE(10);
    } // Other items (name, description) are not needed.
  }
  if (size === undefined) throw violation('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
  if (!Number.isSafeInteger(size)) throw violation(`export size ${size} is too large`);
  return { size, transmissionFlags, structuredReplies, allocationContext, minBlock, preferredBlock, maxBlock, leftover: reader.leftover() };
}

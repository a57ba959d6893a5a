/**
 * The server side of the NBD fixed newstyle handshake ("option haggling"): one
 * export, read-only; NBD_OPT_LIST, NBD_OPT_INFO / NBD_OPT_GO (and the old
 * NBD_OPT_EXPORT_NAME), NBD_OPT_STRUCTURED_REPLY and the `base:allocation` meta
 * context (NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT). Anything else is
 * answered NBD_REP_ERR_UNSUP, as the spec asks, so a client can fall back.
 * Constants and encoders are the client's (nbd-protocol.ts); the reader is its
 * ExactReader, fed by the connection.
 */
import { timingSafeEqual } from 'node:crypto';
import type { Socket } from 'node:net';
import { VmvaultError } from '../errors.js';
import type { ExactReader } from './nbd-handshake.js';
import {
  BASE_ALLOCATION, DEFAULT_MAX_PAYLOAD, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INIT_MAGIC,
  NBD_OPTS_MAGIC, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REP_META_CONTEXT,
  NBD_REP_SERVER, lengthPrefixed, writeU64,
} from './nbd-protocol.js';

/** The one export a server offers, as the handshake describes it. */
export interface ExportInfo {
  name: string;
  /**
   * The name is a secret the client must know (an export on TCP, where anyone who can
   * reach the port could otherwise read the disk): only it reaches the export, not the
   * empty name; NBD_OPT_LIST names nothing, and refusals never repeat it.
   */
  secretName?: boolean;
  description: string;
  size: number;
  transmissionFlags: number;
  /** Largest read the server accepts (advertised in NBD_INFO_BLOCK_SIZE). */
  maxPayload: number;
}

/** What the client chose; everything the transmission phase needs. */
export interface Agreed {
  structuredReplies: boolean;
  /** The id under which base:allocation was selected, or undefined. */
  allocationContext: number | undefined;
}

/** The context id this server gives base:allocation. */
export const ALLOCATION_CONTEXT_ID = 1;
/** Option payloads are names and a few queries; anything bigger is refused unread. */
const MAX_OPTION_DATA = 64 * 1024;

/** An export name matches ours, or is the empty name (the default export, as `nbd+unix:///?socket=` asks) when ours is not secret. */
function known(info: ExportInfo, name: string): boolean {
  if (!info.secretName) return name === '' || name === info.name;
  const asked = Buffer.from(name, 'utf8');
  const ours = Buffer.from(info.name, 'utf8');
  return asked.length === ours.length && timingSafeEqual(asked, ours);
}

/**
 * Run the handshake. Resolves with the agreement once the client has chosen the
 * export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), or undefined when it aborted or asked
 * for something else (the connection should then be closed). Rejects on a protocol
 * violation or a dropped connection.
 */
/**
 * Reply bytes a connection may leave unread before the server stops reading its
 * requests: a client that pipelines requests and never reads what they answer would
 * otherwise make the server keep every reply in memory.
 */
export const REPLY_BACKLOG = 1024 * 1024;

/**
 * How long a client may leave replies unread before the server closes its connection: it
 * holds a connection (and what its replies hold) for as long as it does.
 */
export const REPLY_STALL_MS = 120_000;

/**
 * Resolves once `socket` can take more: at once unless a write was refused (it holds more
 * than its high-water mark), else at its 'drain' (or close). Node emits 'drain' only
 * after a refused write: waiting for it otherwise would wait for good. A client that
 * reads nothing for `stallMs` is disconnected (then this resolves too).
 */
export function drained(socket: Socket, stallMs = REPLY_STALL_MS): Promise<void> {
  if (!socket.writableNeedDrain || socket.destroyed) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const stalled = setTimeout(() => socket.destroy(), stallMs);
    stalled.unref();
    const done = (): void => {
      clearTimeout(stalled);
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

export async function serveHandshake(socket: Socket, reader: ExactReader, info: ExportInfo, stallMs = REPLY_STALL_MS): Promise<Agreed | undefined> {
  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(NBD_INIT_MAGIC, 0);
  greeting.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  greeting.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  socket.write(greeting);
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if (clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) return undefined; // Flags we do not know: the spec says close.
  const noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;
  const agreed: Agreed = { structuredReplies: false, allocationContext: undefined };

  const reply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)): void => {
    const head = Buffer.allocUnsafe(20);
    head.writeBigUInt64BE(NBD_REP_MAGIC, 0);
    head.writeUInt32BE(opt, 8);
    head.writeUInt32BE(type, 12);
    head.writeUInt32BE(data.length, 16);
    socket.write(data.length ? Buffer.concat([head, data]) : head);
  };
  const refuse = (opt: number, type: number, why: string): void => reply(opt, type, Buffer.from(why, 'utf8'));

  for (;;) {
    // A client that sends options without reading the replies: stop reading it until it does.
    if (socket.writableLength > REPLY_BACKLOG) {
      socket.pause();
      await drained(socket, stallMs);
      socket.resume();
    }
    const head = await reader.read(16);
    if (head.readBigUInt64BE(0) !== NBD_OPTS_MAGIC) throw new VmvaultError('NBD', 'NBD client sent an option without the IHAVEOPT magic');
    const opt = head.readUInt32BE(8);
    const length = head.readUInt32BE(12);
    if (length > MAX_OPTION_DATA) {
      if (opt === NBD_OPT_EXPORT_NAME) return undefined;
      refuse(opt, NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is too large`);
      return undefined; // Not worth reading the payload to stay in sync: end the session.
    }
    const data = length > 0 ? Buffer.from(await reader.read(length)) : Buffer.alloc(0);
    switch (opt) {
      case NBD_OPT_EXPORT_NAME: {
        if (!known(info, data.toString('utf8'))) return undefined; // This old option cannot report errors: close.
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        writeU64(out, info.size, 0);
        out.writeUInt16BE(info.transmissionFlags, 8);
        socket.write(out);
        return agreed;
      }
      case NBD_OPT_ABORT:
        reply(opt, NBD_REP_ACK);
        return undefined;
      case NBD_OPT_LIST:
        if (length !== 0) { refuse(opt, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data'); break; }
        if (!info.secretName) reply(opt, NBD_REP_SERVER, lengthPrefixed(info.name));
        reply(opt, NBD_REP_ACK);
        break;
      case NBD_OPT_STRUCTURED_REPLY:
        if (length !== 0) { refuse(opt, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data'); break; }
        agreed.structuredReplies = true;
        reply(opt, NBD_REP_ACK);
        break;
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        metaContext(opt, data, info, agreed, reply, refuse);
        break;
      case NBD_OPT_INFO:
      case NBD_OPT_GO: {
        const parsed = parseInfoRequest(data);
        if (!parsed) { refuse(opt, NBD_REP_ERR_INVALID, 'malformed NBD_OPT_INFO/NBD_OPT_GO request'); break; }
        if (!known(info, parsed.name)) { refuse(opt, NBD_REP_ERR_UNKNOWN, info.secretName ? `no export named "${parsed.name}"` : `no export named "${parsed.name}"; this server offers "${info.name}"`); break; }
        sendInfo(opt, info, parsed.items, reply);
        reply(opt, NBD_REP_ACK);
        if (opt === NBD_OPT_GO) return agreed;
        break;
      }
      default:
        refuse(opt, NBD_REP_ERR_UNSUP, `option ${opt} is not supported`);
    }
  }
}

function parseInfoRequest(data: Buffer): { name: string; items: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (data.length < 4 + nameLength + 2) return undefined;
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 4 + nameLength + 2 + 2 * count) return undefined;
  const items: number[] = [];
  for (let i = 0; i < count; i++) items.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { name, items };
}

function sendInfo(opt: number, info: ExportInfo, items: number[], reply: (opt: number, type: number, data?: Buffer) => void): void {
  const exp = Buffer.allocUnsafe(12);
  exp.writeUInt16BE(NBD_INFO_EXPORT, 0);
  writeU64(exp, info.size, 2);
  exp.writeUInt16BE(info.transmissionFlags, 10);
  reply(opt, NBD_REP_INFO, exp);
  const text = (item: number, value: string): Buffer => {
    const b = Buffer.from(value, 'utf8');
    const out = Buffer.allocUnsafe(2 + b.length);
    out.writeUInt16BE(item, 0);
    b.copy(out, 2);
    return out;
  };
  if (items.includes(NBD_INFO_NAME)) reply(opt, NBD_REP_INFO, text(NBD_INFO_NAME, info.name));
  if (items.includes(NBD_INFO_DESCRIPTION)) reply(opt, NBD_REP_INFO, text(NBD_INFO_DESCRIPTION, info.description));
  // Always sent (qemu-nbd does too): a minimum of 1 asks nothing of a client that did not request it.
  const sizes = Buffer.allocUnsafe(14);
  sizes.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  sizes.writeUInt32BE(1, 2);
  sizes.writeUInt32BE(4096, 6);
  sizes.writeUInt32BE(Math.min(info.maxPayload, DEFAULT_MAX_PAYLOAD), 10);
  reply(opt, NBD_REP_INFO, sizes);
}

function metaContext(
  opt: number, data: Buffer, info: ExportInfo, agreed: Agreed,
  reply: (opt: number, type: number, data?: Buffer) => void, refuse: (opt: number, type: number, why: string) => void,
): void {
  const set = opt === NBD_OPT_SET_META_CONTEXT;
  if (set && !agreed.structuredReplies) return refuse(opt, NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY before NBD_OPT_SET_META_CONTEXT');
  const queries: string[] = [];
  let at = 0;
  const take = (): string | undefined => {
    if (at + 4 > data.length) return undefined;
    const n = data.readUInt32BE(at);
    if (at + 4 + n > data.length) return undefined;
    const s = data.toString('utf8', at + 4, at + 4 + n);
    at += 4 + n;
    return s;
  };
  const name = take();
  if (name === undefined || at + 4 > data.length) return refuse(opt, NBD_REP_ERR_INVALID, 'malformed meta context request');
  const count = data.readUInt32BE(at);
  at += 4;
  for (let i = 0; i < count; i++) {
    const q = take();
    if (q === undefined) return refuse(opt, NBD_REP_ERR_INVALID, 'malformed meta context query');
    queries.push(q);
  }
  if (at !== data.length) return refuse(opt, NBD_REP_ERR_INVALID, 'trailing bytes after the meta context queries');
  if (!known(info, name)) return refuse(opt, NBD_REP_ERR_UNKNOWN, `no export named "${name}"`);
  const matches = set
    ? queries.includes(BASE_ALLOCATION)
    : queries.length === 0 || queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
  if (set) agreed.allocationContext = matches ? ALLOCATION_CONTEXT_ID : undefined;
  if (matches) {
    const b = Buffer.from(BASE_ALLOCATION, 'utf8');
    const out = Buffer.allocUnsafe(4 + b.length);
    out.writeUInt32BE(ALLOCATION_CONTEXT_ID, 0);
    b.copy(out, 4);
    reply(opt, NBD_REP_META_CONTEXT, out);
  }
  reply(opt, NBD_REP_ACK);
}

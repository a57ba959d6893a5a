/**
 * NBD protocol constants and the few fixed-layout encoders the client needs.
 * Values are from the protocol spec (github.com/NetworkBlockDevice/nbd doc/proto.md);
 * names follow the spec so they can be grepped there.
 */

/** 'NBDMAGIC', then 'IHAVEOPT': the fixed newstyle server greeting. */
export const NBD_INIT_MAGIC = 0x4e42444d41474943n;
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** What an oldstyle server sends instead of IHAVEOPT (we refuse those). */
export const NBD_CLISERV_MAGIC = 0x00420281861253n;
export const NBD_REP_MAGIC = 0x3e889045565a9n;

// Handshake flags (server) and client flags.
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

// Option replies. Errors have bit 31 set.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

const OPTION_ERRORS: Record<number, string> = {
  [NBD_REP_FLAG_ERROR + 1]: 'NBD_REP_ERR_UNSUP (option not supported by the server)',
  [NBD_REP_FLAG_ERROR + 2]: 'NBD_REP_ERR_POLICY (forbidden by server policy)',
  [NBD_REP_FLAG_ERROR + 3]: 'NBD_REP_ERR_INVALID (invalid option)',
  [NBD_REP_FLAG_ERROR + 4]: 'NBD_REP_ERR_PLATFORM (not supported on the server platform)',
  [NBD_REP_FLAG_ERROR + 5]: 'NBD_REP_ERR_TLS_REQD (the server requires TLS)',
  [NBD_REP_FLAG_ERROR + 6]: 'NBD_REP_ERR_UNKNOWN (no such export)',
  [NBD_REP_FLAG_ERROR + 7]: 'NBD_REP_ERR_SHUTDOWN (the server is shutting down)',
  [NBD_REP_FLAG_ERROR + 8]: 'NBD_REP_ERR_BLOCK_SIZE_REQD (the server requires block size negotiation)',
  [NBD_REP_FLAG_ERROR + 9]: 'NBD_REP_ERR_TOO_BIG (request or reply too large)',
};

export function optionErrorName(type: number): string {
  return OPTION_ERRORS[type] ?? `option error 0x${type.toString(16)}`;
}

// NBD_INFO_* items inside NBD_REP_INFO.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags.
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

// Requests.
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_REQUEST_SIZE = 28;
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
/** Block status: one descriptor is enough. */
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;

// Error numbers on the wire (the spec fixes them; they are Linux's).
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_EINVAL = 22;
export const NBD_ESHUTDOWN = 108;

export const COMMAND_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disconnect',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write-zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block-status',
};

// Replies.
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_SIMPLE_REPLY_SIZE = 16;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_STRUCTURED_REPLY_SIZE = 20;
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Every error chunk type has bit 15 set; these two are the defined ones. */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT + 2;

// base:allocation status flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
export const BASE_ALLOCATION = 'base:allocation';

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM (operation not permitted)',
  5: 'EIO (input/output error)',
  12: 'ENOMEM (cannot allocate memory)',
  22: 'EINVAL (invalid argument)',
  28: 'ENOSPC (no space left on device)',
  75: 'EOVERFLOW (value too large)',
  95: 'ENOTSUP (operation not supported)',
  108: 'ESHUTDOWN (server is shutting down)',
};

export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `error ${errno}`;
}

/** The errno code of an NBD error number (`ENOSPC`), or undefined for one the protocol does not define. */
export function errnoCodeOf(errno: number): string | undefined {
  return ERRNO_NAMES[errno]?.split(' ')[0];
}

/**
 * When the server sends no NBD_INFO_BLOCK_SIZE, the spec tells clients not to send
 * payloads above 32 MiB; qemu-nbd's own limit (NBD_MAX_BUFFER_SIZE) is the same.
 */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

/** Write a u64 that is a JS number (< 2^53) in network order, without BigInt. */
export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** Read a u64 in network order as a number; values above 2^53 lose precision (never valid here). */
export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 0x100000000 + buf.readUInt32BE(at + 4);
}

/** One 28-byte request header. */
export function encodeRequest(flags: number, type: number, handle: number, offset: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(NBD_REQUEST_SIZE);
  buf.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  writeU64(buf, handle, 8);
  writeU64(buf, offset, 16);
  buf.writeUInt32BE(length, 24);
  return buf;
}

/** One option request during the handshake: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.allocUnsafe(16);
  head.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  head.writeUInt32BE(option, 8);
  head.writeUInt32BE(data.length, 12);
  return Buffer.concat([head, data]);
}

/** A u32 length-prefixed string, as export names and queries are sent. */
export function lengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32BE(bytes.length, 0);
  return Buffer.concat([len, bytes]);
}

/**
 * One chunk object: the plaintext is compressed with zstd (or stored as is when it
 * does not shrink), prefixed with a one-byte codec tag, and sealed with the chunk id
 * as additional data. Opening re-computes the id from the plaintext, so a chunk can
 * neither be damaged nor swapped for another without being noticed.
 * These functions are pure CPU work and run in the worker threads of pipeline/pool.ts.
 */
import { Decompressor } from 'zstd-napi';
import zstd from 'zstd-napi/binding.js';
import { IntegrityError } from '../errors.js';
import { chunkId, type ChunkIdKey } from '../crypto/chunk-id.js';
import { PLAIN_AT, SEAL_OVERHEAD, additionalData, open, openInPlace, sealInPlace } from '../crypto/seal.js';
import { copyBytes } from '../bytes.js';
import { looksIncompressible } from './compressible.js';

/** What sealing and opening chunks needs of a repository's keys (a chunk worker gets no more). */
export type ChunkKeys = ChunkIdKey & { encKey: Uint8Array };

const CODEC_RAW = 0;
const CODEC_ZSTD = 1;

// One (de)compression context per thread, reused: a fresh context per chunk costs
// megabytes of native allocation each time. Compression writes straight into the
// sealed chunk's buffer, so a chunk leaves no compressed garbage behind (the high-level
// API allocates a compressBound-sized buffer per call, and garbage of that size is what
// makes the collector run).
let compressor: { level: number; ctx: InstanceType<typeof zstd.CCtx> } | undefined;
let decompressor: Decompressor | undefined;
let dctx: InstanceType<typeof zstd.DCtx> | undefined;

function cctx(level: number): InstanceType<typeof zstd.CCtx> {
  if (compressor?.level !== level) {
    const ctx = new zstd.CCtx();
    ctx.setParameter(zstd.CParameter.compressionLevel, level);
    compressor = { level, ctx };
  }
  return compressor.ctx;
}

/** Compresses `plain` into `dst`; -1 when the result would not fit (so not worth storing compressed). */
function compressInto(dst: Uint8Array, plain: Uint8Array, level: number): number {
  try {
    return cctx(level).compress2(dst, plain);
  } catch (err) {
    if ((err as Error).message === 'Destination buffer is too small') return -1;
    throw err;
  }
}

function decompress(packed: Uint8Array): Buffer {
  decompressor ??= new Decompressor();
  return decompressor.decompress(packed);
}

export function chunkName(id: string): string {
  return `chunks/${id.slice(0, 2)}/${id}`;
}

export function isChunkId(s: string): boolean {
  return /^[0-9a-f]{64}$/.test(s);
}

/** The most bytes a sealed chunk of `plainLength` bytes takes (stored raw when zstd does not shrink it). */
export function sealedChunkBound(plainLength: number): number {
  return SEAL_OVERHEAD + 1 + plainLength;
}

/**
 * Why a stored chunk of `size` bytes cannot be a sealed chunk of a repository with
 * `chunkSize`-byte chunks (shorter than a sealed empty payload, or longer than the
 * largest), or undefined when its size is possible. A crash on a filesystem that loses
 * unsynced data, or a copy cut short, leaves such objects (zero-length most often):
 * they must be neither reused by a backup nor counted as present by verify.
 */
export function implausibleChunkSize(size: number, chunkSize: number): string | undefined {
  if (size < SEAL_OVERHEAD + 2) return `damaged: ${size} bytes, shorter than any sealed chunk`;
  if (size > sealedChunkBound(chunkSize)) return `damaged: ${size} bytes, longer than any sealed chunk of ${chunkSize}-byte chunks`;
  return undefined;
}

/**
 * Compresses and seals a chunk, into `into` (sealedChunkBound bytes at least) when
 * given, else into a new buffer; the result is a view of it. zstd writes straight to
 * where the plaintext of the sealed object lies, refused when it would not come out
 * shorter than the chunk (then the chunk is copied there as it is), and the cipher
 * encrypts it where it lies.
 */
export function sealChunk(keys: ChunkKeys, repoId: string, id: string, plain: Uint8Array, level: number, into: Uint8Array = Buffer.allocUnsafeSlow(sealedChunkBound(plain.length))): Buffer {
  if (into.length < sealedChunkBound(plain.length)) throw new RangeError(`a sealed chunk of ${plain.length} bytes needs ${sealedChunkBound(plain.length)}, not ${into.length}`);
  const body = into.subarray(PLAIN_AT + 1, PLAIN_AT + 1 + plain.length);
  const tryZstd = level > 0 && plain.length > 0 && !looksIncompressible(plain);
  let length = tryZstd ? compressInto(body.subarray(0, plain.length - 1), plain, level) : -1;
  into[PLAIN_AT] = length >= 0 ? CODEC_ZSTD : CODEC_RAW;
  if (length < 0) length = copyBytes(plain, body);
  return sealInPlace(keys.encKey, 'chunk', into, 1 + length, additionalData(repoId, 'chunk', id));
}

/**
 * Decrypts, decompresses and re-hashes; throws IntegrityError naming the chunk. With
 * `into`, the plaintext is written there (a chunk that does not fit is damaged: no
 * chunk is larger than the repository's chunk size) and the result is a view of it;
 * `sealed` is then decrypted where it lies, and holds no sealed chunk afterwards
 * (unless `keepSealed`): with libsodium's native code, nothing is allocated.
 */
export function openChunk(keys: ChunkKeys, repoId: string, id: string, sealed: Uint8Array, into?: Uint8Array, keepSealed = false): Buffer {
  const what = `chunk ${chunkName(id)}`;
  const ad = additionalData(repoId, 'chunk', id);
  const framed = into && !keepSealed ? openInPlace(keys.encKey, 'chunk', sealed, ad, what) : open(keys.encKey, 'chunk', sealed, ad, what);
  const body = framed.subarray(1);
  let plain: Buffer;
  if (framed[0] === CODEC_RAW) {
    if (into && body.length > into.length) throw new IntegrityError(`${what} holds ${body.length} bytes, more than a chunk of this repository`);
    plain = into ? Buffer.from(into.buffer, into.byteOffset, copyBytes(body, into)) : body;
  } else if (framed[0] === CODEC_ZSTD) {
    try {
      plain = into ? Buffer.from(into.buffer, into.byteOffset, (dctx ??= new zstd.DCtx()).decompress(into, body)) : decompress(body);
    } catch (err) {
      throw new IntegrityError(`${what} does not decompress${into ? ' into a chunk of this repository' : ''}: ${(err as Error).message}`);
    }
  } else throw new IntegrityError(`${what} uses unknown codec ${framed[0]}`);
  if (chunkId(keys, plain) !== id) throw new IntegrityError(`${what} does not match its id: its content is not what was backed up`);
  return plain;
}

/**
 * What an image file says about itself, read by vmvault rather than by qemu: the
 * format its magic bytes claim, and every other file its metadata names.
 *
 * A guest controls every byte of a raw disk, so it can write a qcow2 header naming a
 * backing file such as /etc/shadow, or a vmdk descriptor naming an extent. Had qemu
 * probed such a disk, the backup would hold the host's file instead of the guest's
 * data. So qemu is never asked to probe (the format is always given with `-f`), and
 * before qemu opens an image in a format that can name other files, this module reads
 * those names itself: qemu never gets the chance to open one we did not allow.
 *
 * Pure parsing over a small positional reader; no qemu, no writes.
 */
import type { FileHandle } from 'node:fs/promises';
import { VmvaultError } from '../errors.js';
import type { ImageFormat } from './image-format.js';

/** Another file (or protocol address) an image's metadata names. */
export interface ImageReference {
  kind: 'backing file' | 'data file' | 'vmdk extent' | 'vmdk parent';
  /** As written in the image: relative names are relative to the image's directory. */
  name: string;
  /** The backing file's format as the image states it (qcow2 only). */
  format?: string;
}

/** Reads `length` bytes at `position`; shorter at the end of the file. */
export type ReadAt = (position: number, length: number) => Promise<Buffer>;

export function fileReader(fh: FileHandle): ReadAt {
  return async (position, length) => {
    // Node reads a position past 2^53 (a 64-bit offset from an image's metadata, made a
    // number) from somewhere else in the file, without an error: refused here for every parser.
    if (!Number.isSafeInteger(position) || position < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new VmvaultError('UNSAFE_IMAGE', `the image's metadata asks for ${length} bytes at byte ${position}, which no file holds: it is damaged or crafted; nothing was read there`);
    }
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, position);
    return buf.subarray(0, bytesRead);
  };
}

/** Formats qemu knows but vmvault does not read; a disk that looks like one is refused, not read as raw by surprise. */
const FOREIGN_MAGICS: { name: string; at: number; magic: Buffer }[] = [
  { name: 'qed', at: 0, magic: Buffer.from('QFI\0', 'latin1') },
  { name: 'vpc (vhd)', at: 0, magic: Buffer.from('conectix', 'latin1') },
  { name: 'vhdx', at: 0, magic: Buffer.from('vhdxfile', 'latin1') },
  { name: 'luks', at: 0, magic: Buffer.from('LUKS\xba\xbe', 'latin1') },
  { name: 'vmdk (COWD)', at: 0, magic: Buffer.from('COWD', 'latin1') },
  { name: 'parallels', at: 0, magic: Buffer.from('WithoutFreeSpace', 'latin1') },
  { name: 'parallels', at: 0, magic: Buffer.from('WithouFreSpacExt', 'latin1') },
  { name: 'bochs', at: 0, magic: Buffer.from('Bochs Virtual HD Image', 'latin1') },
  { name: 'cloop', at: 0, magic: Buffer.from('#!/bin/sh\n#V2.0 Format\n', 'latin1') },
];

const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"
const VMDK_SPARSE_MAGIC = Buffer.from('KDMV', 'latin1');
const VDI_SIGNATURE = 0xbeda107f; // little-endian at offset 0x40

export type Probe = { format: ImageFormat } | { foreign: string };

/**
 * The format an image's first bytes claim, as qemu's probe would see it: qcow2, vmdk
 * (sparse or descriptor), vdi, another format vmvault does not read (`foreign`), or
 * raw when no magic matches. Only the caller's configuration may turn this into the
 * format the image is read as.
 */
export async function probeFormat(read: ReadAt): Promise<Probe> {
  const head = await read(0, 512);
  if (head.length >= 8 && head.readUInt32BE(0) === QCOW_MAGIC) {
    const version = head.readUInt32BE(4);
    return version === 2 || version === 3 ? { format: 'qcow2' } : { foreign: `qcow version ${version}` };
  }
  if (head.subarray(0, 4).equals(VMDK_SPARSE_MAGIC) || isVmdkDescriptor(head)) return { format: 'vmdk' };
  if (head.length >= 0x44 && head.readUInt32LE(0x40) === VDI_SIGNATURE) return { format: 'vdi' };
  for (const f of FOREIGN_MAGICS) {
    if (head.subarray(f.at, f.at + f.magic.length).equals(f.magic)) return { foreign: f.name };
  }
  return { format: 'raw' };
}

/**
 * qemu's test for a text vmdk descriptor (block/vmdk.c, vmdk_probe): comment lines
 * and blank lines, then `version=1|2|3` on a line of its own.
 */
export function isVmdkDescriptor(head: Buffer): boolean {
  const text = head.toString('latin1');
  let at = 0;
  while (at < text.length) {
    if (text[at] === '#') {
      const nl = text.indexOf('\n', at);
      if (nl < 0) return false;
      at = nl + 1;
      continue;
    }
    if (text[at] === ' ') {
      while (text[at] === ' ') at++;
      if (text[at] === '\r') at++;
      if (text[at] !== '\n') return false;
      at++;
      continue;
    }
    return /^version=[123]\r?\n/.test(text.slice(at, at + 11));
  }
  return false;
}

/** Every other file the image's metadata names when it is read as `format`. */
export async function imageReferences(read: ReadAt, format: ImageFormat, ownName: string): Promise<ImageReference[]> {
  switch (format) {
    case 'qcow2': return qcow2References(read);
    case 'vmdk': return vmdkReferences(read, ownName);
    case 'raw':
    case 'vdi': return []; // raw has no metadata; qemu's vdi reads no differencing images.
  }
}

const MAX_NAME = 4096;
const EXT_DATA_FILE = 0x44415441; // "DATA"
const EXT_BACKING_FORMAT = 0xe2792aca;
const INCOMPAT_DATA_FILE = 1n << 2n;

/** qcow2: the backing file (header fields 8–19) and the external data file (incompatible bit 2, header extension "DATA"). */
async function qcow2References(read: ReadAt): Promise<ImageReference[]> {
  const h = await read(0, 112);
  if (h.length < 72) return [{ kind: 'backing file', name: '(truncated qcow2 header)' }];
  const version = h.readUInt32BE(4);
  const backingOffset = h.readBigUInt64BE(8);
  const backingSize = h.readUInt32BE(16);
  const refs: ImageReference[] = [];
  let dataFileFlag = false;
  let headerLength = 72;
  if (version >= 3 && h.length >= 104) {
    dataFileFlag = (h.readBigUInt64BE(72) & INCOMPAT_DATA_FILE) !== 0n;
    headerLength = h.readUInt32BE(100);
  }
  const ext = await qcow2Extensions(read, headerLength);
  if (backingOffset !== 0n) {
    // An offset past any file (qemu refuses it) still names a backing file: described, not
    // read, as Node reads a position beyond 2^53 from somewhere else in the file.
    const readable = backingSize > 0 && backingSize <= MAX_NAME && backingOffset <= BigInt(Number.MAX_SAFE_INTEGER - MAX_NAME);
    const name = readable
      ? (await read(Number(backingOffset), backingSize)).toString('utf8')
      : `(backing file name of ${backingSize} bytes at offset ${backingOffset})`;
    const format = ext.get(EXT_BACKING_FORMAT)?.toString('utf8');
    refs.push({ kind: 'backing file', name, ...(format ? { format } : {}) });
  }
  const dataFile = ext.get(EXT_DATA_FILE);
  if (dataFileFlag || dataFile) {
    // Without a name in the image, qemu takes the data file from its options: still another file.
    refs.push({ kind: 'data file', name: dataFile ? dataFile.toString('utf8') : '(named by the opener)' });
  }
  return refs;
}

/** qcow2 header extensions: type, length, data padded to 8 bytes; type 0 ends them. */
async function qcow2Extensions(read: ReadAt, start: number): Promise<Map<number, Buffer>> {
  const out = new Map<number, Buffer>();
  let at = start;
  for (let i = 0; i < 64; i++) {
    const h = await read(at, 8);
    if (h.length < 8) break;
    const type = h.readUInt32BE(0);
    const length = h.readUInt32BE(4);
    if (type === 0 || length > 65536) break;
    out.set(type, await read(at + 8, length));
    at += 8 + Math.ceil(length / 8) * 8;
  }
  return out;
}

const VMDK3_MAGIC = Buffer.from('COWD', 'latin1');
/** What qemu reads of a descriptor (block/vmdk.c, vmdk_read_desc): the file's first MiB less a byte, as a C string. */
const VMDK_DESC_READ = 1024 * 1024 - 1;
/** What qemu searches for the parent (vmdk_parent_open): DESC_SIZE, 20 sectors. */
const VMDK_PARENT_WINDOW = 20 * 512;
const PARENT_HINT = 'parentFileNameHint';
/** The longest extent name qemu takes (`%511[^\n\r"]`); a longer one is cut there. */
const MAX_EXTENT_NAME = 511;

/**
 * vmdk, read the way qemu 7.2's block/vmdk.c reads it:
 * - a text descriptor (any file without a sparse magic) is the whole file: its
 *   extent lines name other files;
 * - a sparse file (KDMV, COWD) is its own one extent, and qemu ignores the extent
 *   lines of the descriptor embedded in it, except when the header's capacity is 0
 *   and its descriptor offset is not (vmdk_open_vmdk4): that descriptor is then
 *   opened as a descriptor file, its extents followed;
 * - the parent is the first `parentFileNameHint` anywhere in the descriptor window
 *   (a strstr, comments included), at offset 0 for a text descriptor and always at
 *   0x200 for a sparse file, wherever its header puts the descriptor.
 */
async function vmdkReferences(read: ReadAt, ownName: string): Promise<ImageReference[]> {
  const head = zeroFilled(await read(0, 64), 64); // qemu reads past the end as zeros
  const magic = head.subarray(0, 4);
  const sparse = magic.equals(VMDK_SPARSE_MAGIC) || magic.equals(VMDK3_MAGIC);
  const refs: ImageReference[] = [];
  if (!sparse) {
    refs.push(...vmdkExtents(cString(await read(0, VMDK_DESC_READ)), ownName));
  } else if (magic.equals(VMDK_SPARSE_MAGIC) && head.readBigUInt64LE(12) === 0n && head.readBigUInt64LE(28) !== 0n) {
    // qemu shifts the sector in 64 bits; an offset past any file reads as zeros there: an empty descriptor.
    const at = (head.readBigUInt64LE(28) << 9n) & 0xffffffffffffffffn;
    if (at <= BigInt(Number.MAX_SAFE_INTEGER)) refs.push(...vmdkExtents(cString(await read(Number(at), VMDK_DESC_READ)), ownName));
  }
  const parent = vmdkParent(await read(sparse ? 512 : 0, VMDK_PARENT_WINDOW));
  if (parent !== undefined) refs.push({ kind: 'vmdk parent', name: parent });
  return refs;
}

/** C's isspace in the C locale, which qemu's sscanf skips (newlines included). */
const C_SPACE = ' \t\n\v\f\r';
/**
 * An extent line as qemu's sscanf reads it, `%10s %SCNd64 %10s "%511[^\n\r"]" %SCNd64`,
 * made wider: any access word of VMware's (qemu takes RW only), any type, a missing
 * closing quote (qemu takes the name without it). Like sscanf, it crosses line ends
 * wherever whitespace may stand, takes a signed number, and needs no space between
 * the number and the type, nor between a type and the quote.
 */
const EXTENT_LINE = new RegExp(
  `(?:RW|RDONLY|NOACCESS)[${C_SPACE}]+[+-]?[0-9]+[${C_SPACE}]*([^${C_SPACE}"]+)(?:[${C_SPACE}]*"([^\n\r"]{1,${MAX_EXTENT_NAME}}))?`, 'y');

/**
 * The files other than the image itself (`ownName`, in its directory) that the extent
 * lines of a descriptor name, and '(unnamed extent)' for an extent line without a
 * name (other than ZERO), which qemu skips. qemu's vmdk_parse_extents runs
 * its sscanf from the start of every line; one that skips blank lines lands on the
 * first character of the next line that is not, so trying each line's first
 * non-blank character tries every place qemu does.
 */
function vmdkExtents(desc: string, ownName: string): ImageReference[] {
  const names = new Set<string>();
  for (let line = 0; line < desc.length;) {
    let at = line;
    while (at < desc.length && ' \t\v\f\r'.includes(desc[at]!)) at++;
    const nl = desc.indexOf('\n', line);
    line = nl < 0 ? desc.length : nl + 1;
    if (at >= desc.length || desc[at] === '\n') continue;
    EXTENT_LINE.lastIndex = at;
    const m = EXTENT_LINE.exec(desc);
    if (!m) continue;
    const [, type, name] = m;
    if (name !== undefined) {
      if (fileName(name) !== ownName) names.add(fileName(name));
    } else if (type !== 'ZERO') {
      names.add('(unnamed extent)');
    }
  }
  return [...names].map((name) => ({ kind: 'vmdk extent', name }));
}

/**
 * qemu's vmdk_parent_open: the first `parentFileNameHint` before the window's first
 * NUL, then, two characters on (`="`, not checked), the name up to the next `"`.
 * None when there is no closing quote (qemu then fails to open the image) or the name
 * is empty (qemu opens no parent).
 */
function vmdkParent(window: Buffer): string | undefined {
  const desc = zeroFilled(window, VMDK_PARENT_WINDOW + 1);
  const nul = desc.indexOf(0);
  const at = desc.subarray(0, nul < 0 ? desc.length : nul).indexOf(PARENT_HINT, 0, 'latin1');
  if (at < 0) return undefined;
  const start = at + PARENT_HINT.length + 2;
  let end = start;
  while (end < desc.length && desc[end] !== 0x22 && desc[end] !== 0) end++;
  if (end >= desc.length || desc[end] !== 0x22 || end === start) return undefined;
  return desc.subarray(start, end).toString('utf8');
}

/** `buf` padded with zeros to `length`. */
function zeroFilled(buf: Buffer, length: number): Buffer {
  return buf.length >= length ? buf : Buffer.concat([buf, Buffer.alloc(length - buf.length)]);
}

/** The text qemu sees in a buffer it reads as a C string: up to the first NUL, byte for character. */
function cString(buf: Buffer): string {
  const nul = buf.indexOf(0);
  return buf.subarray(0, nul < 0 ? buf.length : nul).toString('latin1');
}

/** A name taken from `cString` text, as the file name its bytes spell (UTF-8). */
function fileName(latin1: string): string {
  return Buffer.from(latin1, 'latin1').toString('utf8');
}

/**
 * A name qemu would take for a protocol (`nbd:`, `http:`, `json:{…}` …) rather than a
 * file: anything with a colon before its first slash. Such a reference is never allowed.
 */
export function isProtocolName(name: string): boolean {
  const colon = name.indexOf(':');
  if (colon < 0) return false;
  const slash = name.indexOf('/');
  return slash < 0 || colon < slash;
}

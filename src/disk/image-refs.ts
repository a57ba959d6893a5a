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
    const name = backingSize > 0 && backingSize <= MAX_NAME
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

/**
 * vmdk: the extents and parent named by its descriptor, which is the whole file
 * (a text descriptor) or embedded in a sparse extent (header fields 28–43, in
 * sectors). qemu reads a sparse file as its own one extent, ignoring the embedded
 * extent lines, but follows its parentFileNameHint.
 */
async function vmdkReferences(read: ReadAt, ownName: string): Promise<ImageReference[]> {
  const head = await read(0, 64);
  let text: string;
  const sparse = head.subarray(0, 4).equals(VMDK_SPARSE_MAGIC);
  if (sparse) {
    const offset = Number(head.readBigUInt64LE(28)) * 512;
    const size = Math.min(Number(head.readBigUInt64LE(36)) * 512, 1024 * 1024);
    if (offset === 0 || size === 0) return []; // No embedded descriptor: the sparse extent stands alone.
    text = (await read(offset, size)).toString('latin1');
  } else {
    text = (await read(0, 1024 * 1024)).toString('latin1');
  }
  const refs: ImageReference[] = [];
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.replace(/\0.*$/, '').trim();
    // Extent lines: ACCESS SECTORS TYPE "FILENAME" [OFFSET]
    const extent = /^(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+(?:\s+"([^"]*)")?/.exec(line);
    if (extent) {
      if (sparse) continue;
      const name = extent[1];
      if (name !== undefined && name !== ownName) refs.push({ kind: 'vmdk extent', name });
      else if (name === undefined && !/\bZERO\b/.test(line)) refs.push({ kind: 'vmdk extent', name: '(unnamed extent)' });
      continue;
    }
    const parent = /^parentFileNameHint\s*=\s*"([^"]*)"/.exec(line);
    if (parent) refs.push({ kind: 'vmdk parent', name: parent[1]! });
  }
  return refs;
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

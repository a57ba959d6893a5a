/**
 * A persistent dirty bitmap of a qcow2 image, read from the image's own file
 * (docs/interop/qcow2.txt in QEMU, "Bitmaps"): the header's bitmaps extension, the
 * bitmap directory, the named bitmap's table and its data clusters. An offline
 * incremental backup asks it which ranges changed instead of starting a qemu-nbd to
 * serve the bitmap over NBD (about 0.3 s and two processes per disk, most of an
 * unchanged VM's backup).
 *
 * Only what is certain is used, as in qcow2-map.ts: a bitmap that is in use (a QEMU
 * had the image open and did not store it), disabled, of another type, with extra data
 * that may not be ignored, of a size other than the disk's, or whose directory, table
 * or data lie outside the file or have reserved bits set, is not read, and the caller
 * asks qemu instead. Every offset is one in this image's file, checked against its size.
 *
 * The whole bitmap is read when it is opened, then the extension and the directory entry
 * are read again and must be unchanged: any QEMU program that opens the image read-write
 * stores its bitmaps to new clusters on close and frees the old ones (they then read as
 * zeros), so data clusters read later, or read while that happens, could call changed
 * ranges clean. A bitmap of more than MAX_BITMAP_BYTES goes to qemu.
 */
import type { ReadAt } from './image-refs.js';
import { isUnmapped, readExactly, readHeader, u64, type Unmapped } from './qcow2-map.js';

const BITMAPS_EXTENSION = 0x23852875;
/** qemu's own limits (block/qcow2.h, block/qcow2-bitmap.c). */
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
const MAX_NAME_BYTES = 1023;
/** Table entries read at once: 8 MiB of table covers 32 TiB of disk at 64 KiB granularity and clusters; larger goes to qemu. */
const MAX_TABLE_ENTRIES = 1024 * 1024;
/** Bitmap data held in memory: 64 MiB covers 32 TiB of disk at 64 KiB granularity; larger goes to qemu. */
const MAX_BITMAP_BYTES = 64 * 1024 * 1024;

const FLAG_IN_USE = 1;
const FLAG_AUTO = 2;

/** A dirty bitmap that can be asked which ranges were written. */
export interface DirtyBitmap {
  /** Bytes of disk per bit. */
  readonly granularity: number;
  /** True when no bit is set: nothing was written since the bitmap was added. */
  readonly clean: boolean;
  /** The ranges of [offset, offset+length) the bitmap marks as written, in order, merged, clipped to it. */
  dirty(offset: number, length: number): Promise<{ offset: number; length: number }[]>;
}

/** The bitmap extension's directory: where it is and how many entries it holds. */
async function findDirectory(read: ReadAt, headerLength: number, clusterSize: number, fileSize: number): Promise<{ count: number; size: number; offset: number; raw: Buffer } | Unmapped> {
  // The extensions lie between the header and the end of the first cluster: read once.
  const first = await readExactly(read, 0, Math.min(clusterSize, fileSize), 'the first cluster');
  if (isUnmapped(first)) return first;
  let found: { count: number; size: number; offset: number; raw: Buffer } | Unmapped | undefined;
  for (let at = headerLength; at + 8 <= first.length;) {
    const type = first.readUInt32BE(at);
    const length = first.readUInt32BE(at + 4);
    if (type === 0) break;
    if (at + 8 + length > first.length) return { unmapped: 'a header extension runs past the first cluster' };
    if (type === BITMAPS_EXTENSION) {
      // As qemu: exactly 24 bytes, and only one such extension.
      if (found) return { unmapped: 'it has two bitmaps extensions' };
      if (length !== 24) return { unmapped: `the bitmaps extension is ${length} bytes, not 24` };
      const ext = first.subarray(at + 8, at + 32);
      const size = u64(ext, 8);
      const offset = u64(ext, 16);
      found = ext.readUInt32BE(4) !== 0 || size === undefined || offset === undefined
        ? { unmapped: 'the bitmaps extension has a field out of range' }
        : { count: ext.readUInt32BE(0), size, offset, raw: Buffer.from(ext) };
    }
    at += 8 + length + ((8 - (length % 8)) % 8);
  }
  return found ?? { unmapped: 'it has no bitmaps extension' };
}

/**
 * Bitmap `name` of the image (its current state: bitmaps belong to the image, not to a
 * snapshot), for a disk of `virtualSize` bytes, or why it is not read here.
 */
export async function openQcow2Bitmap(read: ReadAt, fileSize: number, virtualSize: number, name: string): Promise<DirtyBitmap | Unmapped> {
  const h = await readHeader(read, fileSize);
  if (isUnmapped(h)) return h;
  if (h.version !== 3) return { unmapped: 'qcow2 version 2 images hold no bitmaps' };
  if (!h.bitmapsConsistent) return { unmapped: 'its bitmaps extension is marked inconsistent (autoclear bit 0 is clear)' };
  if (h.size !== virtualSize) return { unmapped: `its size is ${h.size} bytes, not the ${virtualSize} inspected` };
  const clusterSize = 2 ** h.clusterBits;
  const dir = await findDirectory(read, h.headerLength, clusterSize, fileSize);
  if (isUnmapped(dir)) return dir;
  if (dir.count < 1 || dir.count > MAX_BITMAPS || dir.size > MAX_DIRECTORY_BYTES) return { unmapped: `a bitmap directory of ${dir.count} entries in ${dir.size} bytes` };
  if (dir.offset % clusterSize !== 0 || dir.offset + dir.size > fileSize) return { unmapped: 'the bitmap directory lies outside the file' };
  const entries = await readExactly(read, dir.offset, dir.size, 'the bitmap directory');
  if (isUnmapped(entries)) return entries;

  let found: { tableOffset: number; tableSize: number; flags: number; type: number; granularityBits: number; extra: number; raw: Buffer; at: number } | undefined;
  let at = 0;
  for (let i = 0; i < dir.count; i++) {
    if (at + 24 > entries.length) return { unmapped: 'the bitmap directory is shorter than its entries' };
    const nameSize = entries.readUInt16BE(at + 18);
    const extra = entries.readUInt32BE(at + 20);
    const end = at + 24 + extra + nameSize;
    if (nameSize === 0 || nameSize > MAX_NAME_BYTES || end > entries.length) return { unmapped: `bitmap directory entry ${i} is malformed` };
    if (entries.toString('utf8', at + 24 + extra, end) === name) {
      if (found) return { unmapped: `two bitmaps are named "${name}"` };
      const tableOffset = u64(entries, at);
      if (tableOffset === undefined) return { unmapped: `bitmap "${name}" has a field out of range` };
      found = {
        tableOffset, tableSize: entries.readUInt32BE(at + 8), flags: entries.readUInt32BE(at + 12), type: entries[at + 16]!, granularityBits: entries[at + 17]!, extra,
        raw: Buffer.from(entries.subarray(at, end)), at,
      };
    }
    at = end + ((8 - (end % 8)) % 8);
  }
  if (at !== entries.length) return { unmapped: 'the bitmap directory is longer than its entries' };
  if (!found) return { unmapped: `it has no bitmap named "${name}"` };
  const b = found;
  if (b.flags & FLAG_IN_USE) return { unmapped: `bitmap "${name}" is in use: a QEMU that had the image open did not store it` };
  if (!(b.flags & FLAG_AUTO)) return { unmapped: `bitmap "${name}" is disabled` };
  // As qemu (BME_RESERVED_FLAGS): flag bit 2, extra_data_compatible, is reserved too, and an image with it does not open.
  if (b.flags & ~(FLAG_IN_USE | FLAG_AUTO)) return { unmapped: `bitmap "${name}" has unknown flags 0x${b.flags.toString(16)}` };
  if (b.type !== 1) return { unmapped: `bitmap "${name}" is of type ${b.type}, not a dirty tracking bitmap` };
  if (b.extra !== 0) return { unmapped: `bitmap "${name}" has ${b.extra} bytes of extra data` };
  if (b.granularityBits < 9 || b.granularityBits > 31) return { unmapped: `bitmap "${name}" has granularity bits ${b.granularityBits}` };
  const granularity = 2 ** b.granularityBits;
  const bits = Math.ceil(virtualSize / granularity);
  const clusterBits = clusterSize * 8;
  const expected = Math.ceil(bits / clusterBits);
  if (b.tableSize !== expected) return { unmapped: `bitmap "${name}" has ${b.tableSize} table entries where the disk needs ${expected}` };
  if (b.tableSize > MAX_TABLE_ENTRIES) return { unmapped: `bitmap "${name}" has ${b.tableSize} table entries` };
  if (b.tableOffset % clusterSize !== 0 || b.tableOffset + b.tableSize * 8 > fileSize) return { unmapped: `the table of bitmap "${name}" lies outside the file` };
  const table = await readExactly(read, b.tableOffset, b.tableSize * 8, `the table of bitmap "${name}"`);
  if (isUnmapped(table)) return table;

  const bytes = Math.ceil(bits / 8);
  if (bytes > MAX_BITMAP_BYTES) return { unmapped: `bitmap "${name}" holds ${bytes} bytes` };
  // The whole bitmap, now: every data cluster in place, unallocated ones as their table entry says.
  const data = Buffer.alloc(bytes);
  for (let i = 0; i < b.tableSize; i++) {
    const hi = table.readUInt32BE(i * 8);
    const lo = table.readUInt32BE(i * 8 + 4);
    if ((hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0) return { unmapped: `the table of bitmap "${name}" has reserved bits set` };
    const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
    const at = i * clusterSize;
    const length = Math.min(clusterSize, bytes - at);
    if (offset === 0) {
      if (lo & 1) data.fill(0xff, at, at + length);
      continue;
    }
    if (lo & 1 || offset % clusterSize !== 0 || offset + clusterSize > fileSize) return { unmapped: `the table of bitmap "${name}" names a cluster outside the file` };
    const cluster = await readExactly(read, offset, length, `a data cluster of bitmap "${name}"`);
    if (isUnmapped(cluster)) return cluster;
    cluster.copy(data, at);
  }
  // Unchanged since it was first read, or a QEMU program stored the bitmaps meanwhile (to new clusters).
  const again = await findDirectory(read, h.headerLength, clusterSize, fileSize);
  const entryAgain = isUnmapped(again) || !again.raw.equals(dir.raw) ? undefined : await read(dir.offset + b.at, b.raw.length);
  if (!entryAgain?.equals(b.raw)) return { unmapped: `the bitmaps of the image changed while bitmap "${name}" was read` };
  return new MemoryBitmap(granularity, bits, data);
}

/** A bitmap held whole in memory: bit n (least significant first in each byte) covers [n × granularity, (n + 1) × granularity). */
class MemoryBitmap implements DirtyBitmap {
  readonly clean: boolean;

  constructor(
    readonly granularity: number,
    private readonly bits: number,
    private readonly data: Buffer,
  ) {
    // Bits past the disk's end are zero by the format; they are never read below anyway.
    this.clean = data.every((x) => x === 0);
  }

  async dirty(offset: number, length: number): Promise<{ offset: number; length: number }[]> {
    const out: { offset: number; length: number }[] = [];
    if (length <= 0) return out;
    const end = offset + length;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(this.bits, Math.ceil(end / this.granularity));
    const add = (fromBit: number, toBit: number) => {
      const from = Math.max(offset, fromBit * this.granularity);
      const to = Math.min(end, toBit * this.granularity);
      if (to <= from) return;
      const prev = out[out.length - 1];
      if (prev && prev.offset + prev.length === from) prev.length += to - from;
      else out.push({ offset: from, length: to - from });
    };
    const data = this.data;
    let runStart = -1;
    for (let bit = first; bit < last; bit++) {
      const byte = data[bit >> 3]!;
      // A byte of zeros skips eight bits at once (most of a bitmap is clean).
      if (byte === 0 && (bit & 7) === 0 && runStart < 0 && bit + 8 <= last) {
        bit += 7;
        continue;
      }
      const set = (byte >> (bit & 7)) & 1;
      if (set && runStart < 0) runStart = bit;
      else if (!set && runStart >= 0) {
        add(runStart, bit);
        runStart = -1;
      }
    }
    if (runStart >= 0) add(runStart, last);
    return out;
  }
}

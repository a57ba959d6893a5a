/**
 * Where a qcow2 image (or one of its internal snapshots) keeps each guest cluster in
 * its own file: the header, the snapshot table, and the L1 and L2 tables, read with
 * vmvault's own code so that a backup can read data clusters straight from the file
 * (src/disk/direct-read.ts) instead of through a qemu-nbd.
 *
 * Only what is certain is mapped. Any image this code does not fully understand
 * (a backing or external data file, encryption, extended L2 entries, an unknown or a
 * dirty or corrupt flag, a snapshot whose size differs) is not mapped at all, and
 * any cluster it cannot place with certainty (compressed, or an entry with reserved
 * bits set, misaligned or outside the file) is marked `qemu`: the caller reads those
 * through qemu, which knows them or reports the damage. The metadata never names
 * another file here: every offset is one in this image's file, checked against its size.
 *
 * Why reading a snapshot this way is safe while a VM may run on the image: a cluster
 * (data or L2 table) that an internal snapshot references has a reference count above
 * one, and qcow2 never writes such a cluster in place: a write copies it first. So
 * what the snapshot's L1 table reaches stays as it was until the snapshot is deleted.
 */
import type { ReadAt } from './image-refs.js';

const QCOW_MAGIC = 0x514649fb;
/** qemu's own limits (block/qcow2.h): larger values are not images qemu wrote. */
const MAX_L1_BYTES = 32 * 1024 * 1024;
const MAX_SNAPSHOTS = 65536;
const MAX_SNAPSHOT_EXTRA = 1024;
/** Incompatible feature bit 3: the compression type field (only compressed clusters use it, and those go to qemu). */
const KNOWN_INCOMPATIBLE = 1 << 3;
/** L2 tables kept in memory, in bytes (at least one table): 8 MiB covers 512 GiB of guest at 64 KiB clusters. */
const L2_CACHE_BYTES = 8 * 1024 * 1024;
/** Offsets past 2^53 do not fit a JavaScript number exactly; no image holds that much. */
const MAX_SAFE_HIGH = 2 ** 21;

/** A stretch of guest clusters with the same kind; `host` is the file offset of the first byte (data only). */
export interface Qcow2Run {
  offset: number;
  length: number;
  /** data: at `host` in the file; zero: reads zeros; hole: unallocated (zeros: no backing file); qemu: read it through qemu. */
  kind: 'data' | 'zero' | 'hole' | 'qemu';
  host: number;
}

export interface Qcow2Map {
  readonly clusterSize: number;
  readonly virtualSize: number;
  /** The runs covering exactly [offset, offset+length) of the guest disk, merged where contiguous. */
  runs(offset: number, length: number): Promise<Qcow2Run[]>;
}

/** Why an image is not mapped (it is then read through qemu-nbd as a whole). */
export interface Unmapped { unmapped: string }

export interface Header {
  version: number;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1Offset: number;
  snapshots: number;
  snapshotsOffset: number;
  /** Where the header extensions start (version 2: 72). */
  headerLength: number;
  /** Autoclear feature bit 0: the bitmaps extension is consistent (version 3 only). */
  bitmapsConsistent: boolean;
}

/** A 64-bit big-endian field as a number, or undefined when it does not fit one exactly. */
export function u64(buf: Buffer, at: number): number | undefined {
  const hi = buf.readUInt32BE(at);
  if (hi >= MAX_SAFE_HIGH) return undefined;
  return hi * 2 ** 32 + buf.readUInt32BE(at + 4);
}

export async function readExactly(read: ReadAt, at: number, length: number, what: string): Promise<Buffer | Unmapped> {
  const buf = await read(at, length);
  return buf.length === length ? buf : { unmapped: `${what} runs past the end of the file` };
}

export function isUnmapped(x: unknown): x is Unmapped {
  return typeof x === 'object' && x !== null && 'unmapped' in x;
}

export async function readHeader(read: ReadAt, fileSize: number): Promise<Header | Unmapped> {
  const h = await readExactly(read, 0, 104, 'the qcow2 header');
  if (isUnmapped(h)) return h;
  if (h.readUInt32BE(0) !== QCOW_MAGIC) return { unmapped: 'it does not start with the qcow2 magic' };
  const version = h.readUInt32BE(4);
  if (version !== 2 && version !== 3) return { unmapped: `qcow2 version ${version}` };
  if (u64(h, 8) !== 0) return { unmapped: 'it names a backing file' };
  const clusterBits = h.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) return { unmapped: `cluster bits ${clusterBits}` };
  if (h.readUInt32BE(32) !== 0) return { unmapped: 'it is encrypted' };
  const size = u64(h, 24);
  const l1Offset = u64(h, 40);
  const snapshotsOffset = u64(h, 64);
  if (size === undefined || l1Offset === undefined || snapshotsOffset === undefined) return { unmapped: 'a header field is out of range' };
  // qemu rounds such a size down to whole sectors (qemu-img never writes one): the disk would not be the header's.
  if (size % 512 !== 0) return { unmapped: `its size of ${size} bytes is not a whole number of 512-byte sectors` };
  if (version === 3) {
    const incompatible = h.readBigUInt64BE(72);
    if (incompatible & 1n) return { unmapped: 'its dirty flag is set (qemu repairs its reference counts on the next write open)' };
    if (incompatible & 2n) return { unmapped: 'it is marked corrupt' };
    if (incompatible & 4n) return { unmapped: 'it has an external data file' };
    if (incompatible & 16n) return { unmapped: 'it uses extended L2 entries (subclusters)' };
    if (incompatible & ~BigInt(KNOWN_INCOMPATIBLE)) return { unmapped: `unknown incompatible features 0x${incompatible.toString(16)}` };
  }
  if (l1Offset >= fileSize || snapshotsOffset > fileSize) return { unmapped: 'a table lies outside the file' };
  const headerLength = version === 3 ? h.readUInt32BE(100) : 72;
  if (version === 3 && (headerLength < 104 || headerLength % 8 !== 0 || headerLength >= 2 ** clusterBits)) return { unmapped: `header length ${headerLength}` };
  return {
    version, clusterBits, size, l1Size: h.readUInt32BE(36), l1Offset, snapshots: h.readUInt32BE(60), snapshotsOffset,
    headerLength, bitmapsConsistent: version === 3 && (h.readBigUInt64BE(88) & 1n) === 1n,
  };
}

/** The L1 table (offset, entries) and disk size of snapshot `name`, from the snapshot table. */
async function findSnapshot(read: ReadAt, h: Header, name: string): Promise<{ l1Offset: number; l1Size: number; size: number } | Unmapped> {
  if (h.snapshots > MAX_SNAPSHOTS) return { unmapped: `${h.snapshots} snapshots` };
  let at = h.snapshotsOffset;
  let found: { l1Offset: number; l1Size: number; size: number } | undefined;
  for (let i = 0; i < h.snapshots; i++) {
    const fixed = await readExactly(read, at, 40, 'the snapshot table');
    if (isUnmapped(fixed)) return fixed;
    const idSize = fixed.readUInt16BE(12);
    const nameSize = fixed.readUInt16BE(14);
    const extraSize = fixed.readUInt32BE(36);
    if (extraSize > MAX_SNAPSHOT_EXTRA) return { unmapped: `snapshot table entry ${i} has ${extraSize} bytes of extra data` };
    const rest = await readExactly(read, at + 40, extraSize + idSize + nameSize, 'the snapshot table');
    if (isUnmapped(rest)) return rest;
    if (rest.toString('utf8', extraSize + idSize) === name) {
      if (found) return { unmapped: `two snapshots are named "${name}"` };
      const l1Offset = u64(fixed, 0);
      // Extra data from qemu 4.2 on: VM state size, then the disk size at the snapshot.
      const size = extraSize >= 16 ? u64(rest, 8) : h.size;
      if (l1Offset === undefined || size === undefined) return { unmapped: `snapshot "${name}" has a field out of range` };
      found = { l1Offset, l1Size: fixed.readUInt32BE(8), size };
    }
    at += 40 + extraSize + idSize + nameSize;
    at += (8 - (at % 8)) % 8;
  }
  return found ?? { unmapped: `it has no snapshot named "${name}"` };
}

/**
 * The map of `snapshot` (or of the image's current state when absent), or why there
 * is none. `expectSize`: the disk's virtual size as the inspection saw it; a
 * different size here is not mapped.
 */
export async function openQcow2Map(read: ReadAt, fileSize: number, expectSize: number, snapshot?: string): Promise<Qcow2Map | Unmapped> {
  const h = await readHeader(read, fileSize);
  if (isUnmapped(h)) return h;
  const table = snapshot === undefined ? { l1Offset: h.l1Offset, l1Size: h.l1Size, size: h.size } : await findSnapshot(read, h, snapshot);
  if (isUnmapped(table)) return table;
  if (table.size !== expectSize) return { unmapped: `its size is ${table.size} bytes, not the ${expectSize} inspected` };
  // qemu reads a snapshot (qemu-nbd -l, qemu-img convert -l) with the image's current size, not the snapshot's.
  if (table.size !== h.size) return { unmapped: `snapshot "${snapshot}" is of ${table.size} bytes, the image of ${h.size}` };
  const clusterSize = 2 ** h.clusterBits;
  const perL2 = clusterSize / 8;
  const needed = Math.ceil(table.size / (clusterSize * perL2));
  if (table.l1Size < needed || table.l1Size * 8 > MAX_L1_BYTES) return { unmapped: `its L1 table has ${table.l1Size} entries for ${table.size} bytes` };
  if (table.l1Offset % 512 !== 0 || table.l1Offset + needed * 8 > fileSize) return { unmapped: 'its L1 table lies outside the file' };
  const l1 = await readExactly(read, table.l1Offset, needed * 8, 'the L1 table');
  if (isUnmapped(l1)) return l1;
  return new Mapped(read, fileSize, h.version, h.clusterBits, table.size, l1);
}

/** An L2 table: its entries, none (unallocated: all holes), or untrusted (all `qemu`). */
type L2 = Buffer | 'none' | 'untrusted';

class Mapped implements Qcow2Map {
  readonly clusterSize: number;
  private readonly perL2: number;
  private readonly l2Cache = new Map<number, Promise<L2>>();
  private readonly l2Keep: number;

  constructor(
    private readonly read: ReadAt, private readonly fileSize: number, private readonly version: number,
    private readonly clusterBits: number, readonly virtualSize: number, private readonly l1: Buffer,
  ) {
    this.clusterSize = 2 ** clusterBits;
    this.perL2 = this.clusterSize / 8;
    this.l2Keep = Math.max(1, Math.floor(L2_CACHE_BYTES / this.clusterSize));
  }

  async runs(offset: number, length: number): Promise<Qcow2Run[]> {
    if (offset < 0 || length < 0 || offset + length > this.virtualSize) throw new RangeError(`range ${offset}+${length} is outside the ${this.virtualSize}-byte disk`);
    const out: Qcow2Run[] = [];
    const end = offset + length;
    const push = (at: number, len: number, kind: Qcow2Run['kind'], host: number) => {
      const last = out[out.length - 1];
      if (last && last.kind === kind && (kind !== 'data' || last.host + last.length === host)) last.length += len;
      else out.push({ offset: at, length: len, kind, host });
    };
    let at = offset;
    while (at < end) {
      const cluster = Math.floor(at / this.clusterSize);
      const l1Index = Math.floor(cluster / this.perL2);
      const table = await this.l2(l1Index);
      const tableEnd = Math.min(end, (l1Index + 1) * this.perL2 * this.clusterSize);
      if (typeof table === 'string') {
        push(at, tableEnd - at, table === 'none' ? 'hole' : 'qemu', 0);
        at = tableEnd;
        continue;
      }
      for (let c = cluster; at < tableEnd; c++) {
        const within = at - c * this.clusterSize;
        const len = Math.min(tableEnd, (c + 1) * this.clusterSize) - at;
        const place = this.place(table, (c % this.perL2) * 8);
        push(at, len, place.kind, place.host + within);
        at += len;
      }
    }
    return out;
  }

  /** What an L2 entry says of its cluster (see the module comment for what goes to qemu). */
  private place(table: Buffer, at: number): { kind: Qcow2Run['kind']; host: number } {
    const hi = table.readUInt32BE(at);
    const lo = table.readUInt32BE(at + 4);
    if (hi & 0x40000000) return { kind: 'qemu', host: 0 }; // compressed
    const zeroFlag = (lo & 1) !== 0;
    if ((lo & 0x1fe) !== 0 || (hi & 0x3f000000) !== 0 || (zeroFlag && this.version < 3)) return { kind: 'qemu', host: 0 };
    const high = hi & 0x00ffffff;
    if (high >= MAX_SAFE_HIGH) return { kind: 'qemu', host: 0 };
    const host = high * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
    if (zeroFlag) return { kind: 'zero', host: 0 };
    if (host === 0) return { kind: 'hole', host: 0 };
    if (host % this.clusterSize !== 0 || host >= this.fileSize) return { kind: 'qemu', host: 0 };
    return { kind: 'data', host };
  }

  private l2(index: number): Promise<L2> {
    const cached = this.l2Cache.get(index);
    if (cached) {
      this.l2Cache.delete(index);
      this.l2Cache.set(index, cached);
      return cached;
    }
    const loading = this.loadL2(index);
    this.l2Cache.set(index, loading);
    if (this.l2Cache.size > this.l2Keep) this.l2Cache.delete(this.l2Cache.keys().next().value!);
    return loading;
  }

  private async loadL2(index: number): Promise<L2> {
    const hi = this.l1.readUInt32BE(index * 8);
    const lo = this.l1.readUInt32BE(index * 8 + 4);
    const high = hi & 0x00ffffff;
    const offset = high * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
    if ((lo & 0x1ff) !== 0 || (hi & 0x7f000000) !== 0 || high >= MAX_SAFE_HIGH) return 'untrusted';
    if (offset === 0) return 'none';
    if (offset % this.clusterSize !== 0 || offset + this.clusterSize > this.fileSize) return 'untrusted';
    const table = await this.read(offset, this.clusterSize);
    return table.length === this.clusterSize ? table : 'untrusted';
  }
}

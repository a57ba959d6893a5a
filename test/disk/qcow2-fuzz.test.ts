/**
 * Differential fuzzing of vmvault's own qcow2 parsing (src/disk/qcow2-map.ts,
 * src/disk/qcow2-bitmap.ts) against qemu: small real images made by qemu-img and
 * qemu-io, their metadata mutated (header fields and extensions, L1 and L2 entries,
 * the snapshot table, the bitmaps extension, directory and table, stray bytes,
 * a truncated file), and each mutant read both ways.
 *
 * The invariants, for every mutant:
 * - opening the map or the bitmap returns a map, a bitmap or a reason, and never throws;
 *   no read asks for more than the documented limits, none hangs;
 * - the runs cover the range asked exactly, and a data run starts inside the file;
 * - wherever qemu (format pinned, no backing, read-only) reads a sector of the mutant,
 *   the bytes a backup would take through the map (data runs from the file, zero and
 *   hole runs as zeros; `qemu` runs are qemu's anyway) are qemu's bytes;
 * - a bitmap read from the file is one qemu loads too, with the same dirty ranges.
 *
 * Deterministic: mutant n of seed s is the same on every run (VMVAULT_FUZZ_SEED,
 * VMVAULT_FUZZ_ITERATIONS for a longer run, VMVAULT_FUZZ_ONLY=n to run one, and
 * VMVAULT_FUZZ_KEEP=dir to keep the mutants that break an invariant).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { ReadAt } from '../../src/disk/image-refs.js';
import { openQcow2Map, type Qcow2Run } from '../../src/disk/qcow2-map.js';
import { openQcow2Bitmap } from '../../src/disk/qcow2-bitmap.js';
import { qemuIo, tempDir, type TempDir } from '../helpers/images.js';
import { Rng, eachMutant, fuzzRun } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const { iterations: ITERATIONS, seed: SEED, only: ONLY, keep: KEEP } = fuzzRun({ iterations: 450, seed: 0x5eed });
/** The largest single read the parsers may ask for: the bitmap directory (qcow2-bitmap.ts's MAX_DIRECTORY_BYTES). */
const MAX_READ = 1024 * 65535;
/** Disks larger than this (a mutated size) are mapped and walked in part, not compared with qemu. */
const COMPARE_MAX = 64 * MiB;
const OFFSET_MASK = 0x00fffffffffffe00n;

// ---------------------------------------------------------------------------
// The base images and where their metadata lies (read from the qemu-made image).

interface Layout {
  name: string;
  bytes: Buffer;
  version: number;
  clusterSize: number;
  size: number;
  headerLength: number;
  l1Tables: { offset: number; size: number }[];
  l2Tables: number[];
  /** File positions of L2 entries, and those that are non-zero. */
  l2Entries: number[];
  usedL2Entries: number[];
  dataClusters: number[];
  refcountTable: number;
  snapshotsOffset: number;
  snapshotEntries: number[];
  extensions: { at: number; type: number; length: number }[];
  bitmapExt?: number;
  bitmapDir?: { offset: number; size: number };
  bitmapEntries: number[];
  bitmapTableEntries: number[];
  hasSnapshot: boolean;
  hasBitmap: boolean;
}

function num(b: Buffer, at: number): number { return Number(b.readBigUInt64BE(at)); }

function layoutOf(name: string, bytes: Buffer): Layout {
  const version = bytes.readUInt32BE(4);
  const clusterSize = 2 ** bytes.readUInt32BE(20);
  const headerLength = version === 3 ? bytes.readUInt32BE(100) : 72;
  const l: Layout = {
    name, bytes, version, clusterSize, size: num(bytes, 24), headerLength,
    l1Tables: [{ offset: num(bytes, 40), size: bytes.readUInt32BE(36) }], l2Tables: [], l2Entries: [], usedL2Entries: [], dataClusters: [],
    refcountTable: num(bytes, 48), snapshotsOffset: num(bytes, 64), snapshotEntries: [], extensions: [], bitmapEntries: [], bitmapTableEntries: [],
    hasSnapshot: bytes.readUInt32BE(60) > 0, hasBitmap: false,
  };
  let at = l.snapshotsOffset;
  for (let i = 0; i < bytes.readUInt32BE(60); i++) {
    l.snapshotEntries.push(at);
    l.l1Tables.push({ offset: num(bytes, at), size: bytes.readUInt32BE(at + 8) });
    at += 40 + bytes.readUInt32BE(at + 36) + bytes.readUInt16BE(at + 12) + bytes.readUInt16BE(at + 14);
    at += (8 - (at % 8)) % 8;
  }
  for (const t of l.l1Tables) {
    for (let i = 0; i < t.size; i++) {
      const l2 = Number(bytes.readBigUInt64BE(t.offset + i * 8) & OFFSET_MASK);
      if (l2 !== 0 && !l.l2Tables.includes(l2)) l.l2Tables.push(l2);
    }
  }
  for (const t of l.l2Tables) {
    for (let i = 0; i < clusterSize / 8; i++) {
      const e = bytes.readBigUInt64BE(t + i * 8);
      l.l2Entries.push(t + i * 8);
      if (e !== 0n) l.usedL2Entries.push(t + i * 8);
      if (e !== 0n && !(e & (1n << 62n)) && (e & OFFSET_MASK) !== 0n) l.dataClusters.push(Number(e & OFFSET_MASK));
    }
  }
  for (at = headerLength; at + 8 <= clusterSize;) {
    const type = bytes.readUInt32BE(at);
    const length = bytes.readUInt32BE(at + 4);
    l.extensions.push({ at, type, length });
    if (type === 0) break;
    if (type === 0x23852875) {
      l.hasBitmap = true;
      l.bitmapExt = at + 8;
      l.bitmapDir = { offset: num(bytes, at + 8 + 16), size: num(bytes, at + 8 + 8) };
      let e = l.bitmapDir.offset;
      for (let i = 0; i < bytes.readUInt32BE(at + 8); i++) {
        l.bitmapEntries.push(e);
        const table = num(bytes, e);
        for (let j = 0; j < bytes.readUInt32BE(e + 8); j++) l.bitmapTableEntries.push(table + j * 8);
        e += 24 + bytes.readUInt32BE(e + 20) + bytes.readUInt16BE(e + 18);
        e += (8 - (e % 8)) % 8;
      }
    }
    at += 8 + length + ((8 - (length % 8)) % 8);
  }
  return l;
}

// ---------------------------------------------------------------------------
// Mutations: each changes a copy of the image in place and says what it did.

type Mutation = (img: Buffer, l: Layout, r: Rng) => string;

/** A value for an offset field: the places a hostile or damaged image would point at. */
function offsetValue(l: Layout, r: Rng, orig: bigint): bigint {
  const cs = BigInt(l.clusterSize);
  const fs = BigInt(l.bytes.length);
  const picks: (() => bigint)[] = [
    () => 0n, () => 512n, () => cs, () => BigInt(l.l1Tables[0]!.offset), () => BigInt(r.pick(l.l1Tables).offset),
    () => BigInt(r.pick(l.l2Tables)), () => BigInt(r.pick(l.dataClusters.length ? l.dataClusters : [0])), () => BigInt(l.refcountTable),
    () => BigInt(l.snapshotsOffset), () => BigInt(l.bitmapDir?.offset ?? 0), () => fs, () => fs - cs, () => fs - 512n, () => fs + cs,
    () => 1n << 40n, () => (1n << 55n) - cs, () => orig + 512n, () => orig + cs, () => (orig >= cs ? orig - cs : 0n),
    () => BigInt(r.int(l.bytes.length / 512)) * 512n, () => BigInt(r.int(l.bytes.length / l.clusterSize + 2)) * cs, () => BigInt(r.int(l.bytes.length)),
  ];
  return r.pick(picks)();
}

function smallValue(r: Rng, orig: number, bits: number): number {
  const max = 2 ** bits;
  const v = r.pick([0, 1, orig + 1, orig - 1, orig * 2, Math.floor(orig / 2), max - 1, orig ^ (1 << r.int(bits)), r.int(max), r.int(64), orig + 8, orig - 8]);
  return ((v % max) + max) % max;
}

function writeField(img: Buffer, at: number, width: number, v: bigint | number): void {
  if (at + width > img.length) return;
  const b = BigInt.asUintN(width * 8, BigInt(v));
  if (width === 8) img.writeBigUInt64BE(b, at);
  else if (width === 4) img.writeUInt32BE(Number(b), at);
  else if (width === 2) img.writeUInt16BE(Number(b), at);
  else img[at] = Number(b);
}

function readField(img: Buffer, at: number, width: number): bigint {
  if (at + width > img.length) return 0n;
  return width === 8 ? img.readBigUInt64BE(at) : width === 4 ? BigInt(img.readUInt32BE(at)) : width === 2 ? BigInt(img.readUInt16BE(at)) : BigInt(img[at]!);
}

/** Sets a field: offsets get offset values, flag words a flipped bit, counts a small value. */
function mutateField(img: Buffer, l: Layout, r: Rng, at: number, width: number, kind: 'offset' | 'count' | 'flags' | 'size', what: string): string {
  const orig = readField(img, at, width);
  let v: bigint;
  if (kind === 'offset') v = offsetValue(l, r, orig);
  else if (kind === 'flags') v = orig ^ (1n << BigInt(r.chance(0.7) ? r.int(8) : r.int(width * 8)));
  else if (kind === 'size') {
    const cs = BigInt(l.clusterSize);
    v = r.pick([0n, 512n, orig + 512n, orig - 512n, orig + cs, orig - cs, orig * 2n, orig / 2n, orig + 1n, 1n << 50n, r.u64(), orig + cs * BigInt(l.clusterSize / 8)]);
  } else v = BigInt(smallValue(r, Number(orig), Math.min(32, width * 8)));
  writeField(img, at, width, v);
  return `${what}@${at}: ${orig} -> ${BigInt.asUintN(width * 8, v)}`;
}

const HEADER_FIELDS: [number, number, 'offset' | 'count' | 'flags' | 'size', string][] = [
  [4, 4, 'count', 'version'], [8, 8, 'offset', 'backing_file_offset'], [16, 4, 'count', 'backing_file_size'], [20, 4, 'count', 'cluster_bits'],
  [24, 8, 'size', 'size'], [32, 4, 'count', 'crypt_method'], [36, 4, 'count', 'l1_size'], [40, 8, 'offset', 'l1_table_offset'],
  [48, 8, 'offset', 'refcount_table_offset'], [56, 4, 'count', 'refcount_table_clusters'], [60, 4, 'count', 'nb_snapshots'], [64, 8, 'offset', 'snapshots_offset'],
];
const HEADER_V3_FIELDS: typeof HEADER_FIELDS = [
  [72, 8, 'flags', 'incompatible_features'], [80, 8, 'flags', 'compatible_features'], [88, 8, 'flags', 'autoclear_features'],
  [96, 4, 'count', 'refcount_order'], [100, 4, 'count', 'header_length'], [104, 1, 'count', 'compression_type'],
];

/** A 64-bit table entry (L1, L2, bitmap table): its offset, its flags, its reserved bits. */
function mutateEntry(img: Buffer, l: Layout, r: Rng, at: number, others: number[], what: string): string {
  const e = img.readBigUInt64BE(at);
  const ops: [string, () => bigint][] = [
    ['offset', () => (e & ~OFFSET_MASK) | (offsetValue(l, r, e & OFFSET_MASK) & OFFSET_MASK)],
    ['raw offset', () => offsetValue(l, r, e & OFFSET_MASK)],
    ['compressed bit', () => e ^ (1n << 62n)],
    ['zero bit', () => e ^ 1n],
    ['copied bit', () => e ^ (1n << 63n)],
    ['reserved bit', () => e ^ (1n << BigInt(r.pick([1, 2, 3, 4, 5, 6, 7, 8, 56, 57, 58, 59, 60, 61])))],
    ['other entry', () => img.readBigUInt64BE(r.pick(others))],
    ['cleared', () => 0n],
    ['misaligned', () => e + 512n],
    ['random', () => r.u64()],
    ['compressed, random', () => (1n << 62n) | (r.u64() & ((1n << 62n) - 1n))],
  ];
  const [name, op] = r.pick(ops);
  const v = BigInt.asUintN(64, op());
  img.writeBigUInt64BE(v, at);
  return `${what}@${at} ${name}: 0x${e.toString(16)} -> 0x${v.toString(16)}`;
}

const MUTATIONS: Record<string, Mutation> = {
  header(img, l, r) {
    const [at, width, kind, name] = r.pick(l.version === 3 && r.chance(0.4) ? HEADER_V3_FIELDS : HEADER_FIELDS);
    return mutateField(img, l, r, at, width, kind, name);
  },
  extension(img, l, r) {
    const e = r.pick(l.extensions);
    switch (r.int(4)) {
      case 0: return mutateField(img, l, r, e.at, 4, 'count', 'extension type');
      case 1: return mutateField(img, l, r, e.at + 4, 4, 'count', 'extension length');
      case 2: {
        const at = e.at + 8 + r.int(Math.max(1, e.length));
        img[at] = r.int(256);
        return `extension byte@${at}`;
      }
      default: {
        writeField(img, e.at, 8, 0n);
        return `end of extensions@${e.at}`;
      }
    }
  },
  l1(img, l, r) {
    const t = r.pick(l.l1Tables);
    const used = [...Array(t.size).keys()].filter((i) => img.readBigUInt64BE(t.offset + i * 8) !== 0n);
    const i = used.length && r.chance(0.7) ? r.pick(used) : r.int(t.size);
    return mutateEntry(img, l, r, t.offset + i * 8, l.l1Tables.map((x) => x.offset), 'L1 entry');
  },
  l2(img, l, r) {
    const at = l.usedL2Entries.length && r.chance(0.8) ? r.pick(l.usedL2Entries) : r.pick(l.l2Entries);
    return mutateEntry(img, l, r, at, l.usedL2Entries.length ? l.usedL2Entries : l.l2Entries, 'L2 entry');
  },
  snapshot(img, l, r) {
    if (!l.snapshotEntries.length) return MUTATIONS.header!(img, l, r);
    const at = r.pick(l.snapshotEntries);
    const [off, width, kind, name] = r.pick([[0, 8, 'offset', 'snapshot l1_table_offset'], [8, 4, 'count', 'snapshot l1_size'], [12, 2, 'count', 'snapshot id_size'],
      [14, 2, 'count', 'snapshot name_size'], [36, 4, 'count', 'snapshot extra_size'], [40 + 8, 8, 'size', 'snapshot disk size'], [40 + 16, 8, 'flags', 'snapshot icount']] as const);
    return mutateField(img, l, r, at + off, width, kind, name);
  },
  bitmap(img, l, r) {
    if (l.bitmapExt === undefined) return MUTATIONS.l2!(img, l, r);
    switch (r.int(3)) {
      case 0: {
        const [off, width, kind, name] = r.pick([[0, 4, 'count', 'nb_bitmaps'], [4, 4, 'count', 'bitmaps reserved32'], [8, 8, 'size', 'bitmap_directory_size'], [16, 8, 'offset', 'bitmap_directory_offset']] as const);
        return mutateField(img, l, r, l.bitmapExt + off, width, kind, name);
      }
      case 1: {
        const at = r.pick(l.bitmapEntries);
        const [off, width, kind, name] = r.pick([[0, 8, 'offset', 'bitmap_table_offset'], [8, 4, 'count', 'bitmap_table_size'], [12, 4, 'flags', 'bitmap flags'],
          [16, 1, 'count', 'bitmap type'], [17, 1, 'count', 'granularity_bits'], [18, 2, 'count', 'bitmap name_size'], [20, 4, 'count', 'bitmap extra_data_size'], [24, 1, 'count', 'bitmap name byte']] as const);
        return mutateField(img, l, r, at + off, width, kind, name);
      }
      default:
        return mutateEntry(img, l, r, r.pick(l.bitmapTableEntries), l.bitmapTableEntries, 'bitmap table entry');
    }
  },
  byte(img, l, r) {
    const regions = [[0, Math.min(l.clusterSize, 512)], ...l.l1Tables.map((t) => [t.offset, t.size * 8]), ...l.l2Tables.map((t) => [t, l.clusterSize]),
      ...(l.snapshotEntries.length ? [[l.snapshotsOffset, 256]] : []), ...(l.bitmapDir ? [[l.bitmapDir.offset, l.bitmapDir.size]] : [])];
    const [start, length] = r.pick(regions) as [number, number];
    const at = start + r.int(Math.max(1, length));
    if (at >= img.length) return 'byte past the end';
    const old = img[at]!;
    img[at] = r.chance(0.5) ? old ^ (1 << r.int(8)) : r.int(256);
    return `byte@${at}: ${old} -> ${img[at]}`;
  },
};
const KINDS = Object.keys(MUTATIONS);

/** A mutant: the base image with 1–3 mutations, maybe truncated; and which view of it to read. */
function mutant(bases: Layout[], index: number): { base: Layout; img: Buffer; view: 'current' | 's1' | 'bitmap'; steps: string[]; kinds: string[] } {
  // Mutant n depends on the seed and n only (test/helpers/rng.ts).
  const r = new Rng((SEED ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
  const base = r.pick(bases);
  let img = Buffer.from(base.bytes);
  const steps: string[] = [];
  const kinds: string[] = [];
  const n = 1 + (r.chance(0.6) ? 0 : r.int(3));
  for (let i = 0; i < n; i++) {
    const kind = base.hasBitmap && r.chance(0.15) ? 'bitmap' : r.pick(KINDS);
    kinds.push(kind);
    steps.push(`${kind}: ${MUTATIONS[kind]!(img, base, r)}`);
  }
  if (r.chance(0.08)) {
    const length = r.chance(0.5) ? r.int(img.length) : img.length - 1 - r.int(base.clusterSize * 2);
    img = img.subarray(0, Math.max(0, length));
    kinds.push('truncate');
    steps.push(`truncated to ${img.length} bytes`);
  }
  const view = kinds.includes('bitmap') ? 'bitmap' : base.hasSnapshot && (kinds.includes('snapshot') || r.chance(0.3)) ? 's1' : 'current';
  return { base, img, view, steps, kinds };
}

// ---------------------------------------------------------------------------
// Reading a mutant both ways.

/** Reads of the image held in memory, as fileReader reads the file: short at its end; each checked against the limits. */
function memoryReader(img: Buffer, deadline: number): ReadAt {
  return async (position, length) => {
    if (!Number.isSafeInteger(position) || position < 0 || !Number.isSafeInteger(length) || length < 0) throw new Error(`invariant: a read of ${length} bytes at ${position}`);
    if (length > MAX_READ) throw new Error(`invariant: a read of ${length} bytes, past the documented limits`);
    if (Date.now() > deadline) throw new Error('invariant: still reading after 20 s');
    return Buffer.from(img.subarray(Math.min(position, img.length), Math.min(position + length, img.length)));
  };
}

function pinned(file: string): string {
  return `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } })}`;
}

/** qemu's reading of the image as raw, and the sectors it could not read; undefined when it refuses the image. */
async function qemuRaw(file: string, out: string, snapshot?: string): Promise<{ bytes: Buffer; failed: Set<number> } | undefined> {
  await fs.rm(out, { force: true });
  const r = await execa('qemu-img', ['convert', '--salvage', ...(snapshot ? ['-l', `snapshot.name=${snapshot}`] : []), '-O', 'raw', pinned(file), out], { reject: false, timeout: 30_000 });
  if (r.exitCode !== 0) return undefined;
  const failed = new Set<number>();
  for (const m of r.stderr.matchAll(/error while reading (?:block status at )?offset (\d+)/g)) failed.add(Number(m[1]) / 512);
  return { bytes: await fs.readFile(out), failed };
}

/**
 * The first sector where the bytes a backup would take through `runs` differ from
 * qemu's, sectors qemu could not read and `qemu` runs aside; and how many bytes were compared.
 */
export function firstDifference(runs: Qcow2Run[], img: Buffer, qemu: { bytes: Buffer; failed: Set<number> }): { at?: number; compared: number } {
  let compared = 0;
  for (const run of runs) {
    if (run.kind === 'qemu') continue;
    for (let at = run.offset; at < run.offset + run.length; at += 512) {
      if (qemu.failed.has(Math.floor(at / 512))) continue;
      const n = Math.min(512, run.offset + run.length - at);
      const theirs = qemu.bytes.subarray(at, at + n);
      let ours: Buffer;
      if (run.kind === 'data') {
        ours = Buffer.alloc(n);
        const from = run.host + (at - run.offset);
        if (from < img.length) img.copy(ours, 0, from, Math.min(img.length, from + n));
      } else ours = Buffer.alloc(n);
      if (!ours.equals(theirs)) return { at, compared };
      compared += n;
    }
  }
  return { compared };
}

interface Result { outcome: string; violation?: string; compared: number }

async function checkMap(img: Buffer, base: Layout, view: 'current' | 's1', file: string, out: string): Promise<Result> {
  const deadline = Date.now() + 20_000;
  const headerSize = img.length >= 32 ? num(img, 24) : base.size;
  const expect = view === 's1' ? base.size : Number.isSafeInteger(headerSize) ? headerSize : base.size;
  let map;
  try {
    map = await openQcow2Map(memoryReader(img, deadline), img.length, expect, view === 's1' ? 's1' : undefined);
  } catch (err) {
    return { outcome: 'threw', violation: `openQcow2Map threw: ${(err as Error).stack}`, compared: 0 };
  }
  if ('unmapped' in map) return { outcome: 'unmapped', compared: 0 };
  const size = map.virtualSize;
  // Walked in uneven pieces, so that runs split mid-cluster and tables are read in any order.
  const walk = size <= COMPARE_MAX ? size : 4 * MiB;
  const piece = 1 * MiB + 4608;
  const runs: Qcow2Run[] = [];
  try {
    for (const start of size <= COMPARE_MAX ? [0] : [0, size - walk]) {
      for (let at = start; at < start + walk; at += piece) {
        const n = Math.min(piece, start + walk - at);
        const got = await map.runs(at, n);
        let next = at;
        for (const run of got) {
          if (run.offset !== next || run.length <= 0) return { outcome: 'mapped', violation: `runs of ${at}+${n} do not cover it: ${JSON.stringify(got)}`, compared: 0 };
          next += run.length;
          if (run.kind === 'data') {
            const end = run.host + run.length;
            if (!Number.isSafeInteger(run.host) || run.host < 0 || run.host >= img.length || end > Math.ceil(img.length / map.clusterSize) * map.clusterSize) {
              return { outcome: 'mapped', violation: `a data run outside the ${img.length}-byte file: ${JSON.stringify(run)}`, compared: 0 };
            }
          }
        }
        if (next !== at + n) return { outcome: 'mapped', violation: `runs of ${at}+${n} end at ${next}`, compared: 0 };
        runs.push(...got);
      }
    }
  } catch (err) {
    return { outcome: 'threw', violation: `runs threw: ${(err as Error).stack}`, compared: 0 };
  }
  if (size > COMPARE_MAX) return { outcome: 'mapped, too large to compare', compared: 0 };
  if (runs.every((run) => run.kind === 'qemu')) return { outcome: 'mapped, all to qemu', compared: 0 };
  await fs.writeFile(file, img);
  const qemu = await qemuRaw(file, out, view === 's1' ? 's1' : undefined);
  if (!qemu) return { outcome: 'mapped, qemu refuses', compared: 0 };
  if (qemu.bytes.length !== size) return { outcome: 'mapped', violation: `qemu reads ${qemu.bytes.length} bytes of disk, the map ${size}`, compared: 0 };
  const diff = firstDifference(runs, img, qemu);
  if (diff.at !== undefined) {
    const run = runs.find((x) => x.offset <= diff.at! && diff.at! < x.offset + x.length);
    return { outcome: 'mapped', violation: `guest byte ${diff.at} differs from qemu's (run ${JSON.stringify(run)})`, compared: diff.compared };
  }
  return { outcome: 'mapped, same as qemu', compared: diff.compared };
}

async function checkBitmap(img: Buffer, base: Layout, file: string, out: string): Promise<Result> {
  const deadline = Date.now() + 20_000;
  let b;
  try {
    b = await openQcow2Bitmap(memoryReader(img, deadline), img.length, base.size, 'b');
  } catch (err) {
    return { outcome: 'threw', violation: `openQcow2Bitmap threw: ${(err as Error).stack}`, compared: 0 };
  }
  if ('unmapped' in b) return { outcome: 'bitmap refused', compared: 0 };
  const ours = await b.dirty(0, base.size);
  // qemu's bitmap: copied by qemu-img convert --bitmaps into a fresh image, read from there.
  await fs.writeFile(file, img);
  await fs.rm(out, { force: true });
  const r = await execa('qemu-img', ['convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', pinned(file), out], { reject: false, timeout: 30_000 });
  if (r.exitCode !== 0) {
    // An image qemu does not open is not backed up (its inspection fails); one it refuses for its bitmaps, the reader must refuse too.
    if (!/bitmap/i.test(r.stderr)) return { outcome: 'bitmap read, qemu refuses the image', compared: 0 };
    return { outcome: 'bitmap read, qemu refuses its bitmaps', violation: `the bitmap is read from the file, but qemu refuses the image: ${r.stderr.trim()}`, compared: 0 };
  }
  const copy = await fs.readFile(out);
  const theirs = await openQcow2Bitmap(memoryReader(copy, deadline), copy.length, base.size, 'b');
  if ('unmapped' in theirs) return { outcome: 'bitmap read, qemu skips it', violation: `the bitmap is read from the file, but qemu does not load it (${theirs.unmapped}): ${r.stderr.trim()}`, compared: 0 };
  const same = JSON.stringify(ours) === JSON.stringify(await theirs.dirty(0, base.size)) && b.granularity === theirs.granularity;
  if (!same) return { outcome: 'bitmap read', violation: `dirty ranges differ: ours ${JSON.stringify(ours).slice(0, 300)}, qemu's ${JSON.stringify(await theirs.dirty(0, base.size)).slice(0, 300)}`, compared: 0 };
  return { outcome: 'bitmap same as qemu', compared: base.size };
}

// ---------------------------------------------------------------------------

let dir: TempDir;
const bases: Layout[] = [];

/** A qcow2 image with data, zero clusters, a discarded range, snapshot s1, then bitmap b and writes it records. */
async function makeBase(name: string, size: number, createArgs: string[], compressed: boolean, bitmapArgs: string[] = []): Promise<void> {
  const file = path.join(dir.path, name);
  if (compressed) {
    const raw = path.join(dir.path, `${name}.raw`);
    await execa('qemu-img', ['create', '-q', '-f', 'raw', raw, String(size)]);
    await qemuIo(raw, 'raw', ['write -P 0x41 0 1M', 'write -P 0x42 2M 512k']);
    await execa('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', ...createArgs, raw, file]);
  } else {
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', ...createArgs, file, String(size)]);
  }
  await qemuIo(file, 'qcow2', ['write -P 0x11 65536 196608', 'write -P 0x12 3145728 102400', 'write -P 0x13 1048576 131072', 'write -z 1048576 65536', 'discard 1114112 65536']);
  const v3 = !createArgs.join(',').includes('compat=0.10');
  await execa('qemu-img', ['snapshot', '-c', 's1', file]);
  if (v3) await execa('qemu-img', ['bitmap', '--add', ...bitmapArgs, '-f', 'qcow2', file, 'b']);
  await qemuIo(file, 'qcow2', ['write -P 0x21 0 4096', 'write -P 0x22 3211264 70000', `write -P 0x23 ${size - 8192} 8192`, 'write -z 65536 65536']);
  bases.push(layoutOf(name, await fs.readFile(file)));
}

before(async () => {
  dir = await tempDir('vmvault-fuzz-');
  await makeBase('64k-v3.qcow2', 8 * MiB, ['-o', 'cluster_size=65536'], false);
  // Tables of several clusters: 128 L1 entries, and a bitmap of 8192 bits in two data clusters.
  await makeBase('512-v3.qcow2', 4 * MiB, ['-o', 'cluster_size=512'], false, ['-g', '512']);
  await makeBase('4k-v2-compressed.qcow2', 4 * MiB, ['-o', 'cluster_size=4096,compat=0.10'], true);
  await makeBase('4k-v3-compressed.qcow2', 6 * MiB + 4096, ['-o', 'cluster_size=4096'], true);
});
after(async () => { await dir.cleanup(); });

describe('qcow2 metadata fuzzed, read by vmvault and by qemu', () => {
  test('the base images read as qemu reads them, and a wrong read would be caught', async () => {
    for (const base of bases) {
      assert.ok(base.l2Tables.length >= 1 && base.usedL2Entries.length > 0, `${base.name}: no L2 entries found`);
      if (base.clusterSize === 512) assert.ok(base.l1Tables[0]!.size * 8 > 512 && base.bitmapTableEntries.length > 1, `${base.name}: tables of one cluster`);
      for (const view of base.hasSnapshot ? ['current', 's1'] as const : ['current'] as const) {
        const r = await checkMap(base.bytes, base, view, path.join(dir.path, 'check.qcow2'), path.join(dir.path, 'check.raw'));
        assert.equal(r.violation, undefined);
        assert.equal(r.outcome, 'mapped, same as qemu', `${base.name} ${view}`);
        assert.ok(r.compared > MiB, `${base.name} ${view}: compared ${r.compared} bytes`);
      }
      if (base.hasBitmap) assert.equal((await checkBitmap(base.bytes, base, path.join(dir.path, 'check.qcow2'), path.join(dir.path, 'check.out'))).outcome, 'bitmap same as qemu');
    }
    // The comparison itself: a data run moved by one sector in the file is a difference.
    const base = bases[0]!;
    const map = await openQcow2Map(memoryReader(base.bytes, Date.now() + 20_000), base.bytes.length, base.size);
    assert.ok(!('unmapped' in map));
    const runs = await map.runs(0, base.size);
    await fs.writeFile(path.join(dir.path, 'check.qcow2'), base.bytes);
    const qemu = (await qemuRaw(path.join(dir.path, 'check.qcow2'), path.join(dir.path, 'check.raw')))!;
    assert.equal(firstDifference(runs, base.bytes, qemu).at, undefined);
    const moved = runs.map((run) => run.kind === 'data' ? { ...run, host: run.host + 512 } : run);
    assert.notEqual(firstDifference(moved, base.bytes, qemu).at, undefined);
  });

  test(`mutants agree with qemu (seed ${SEED}, ${ONLY === undefined ? ITERATIONS : `mutant ${ONLY}`})`, { timeout: 6 * 3600_000 }, async (t) => {
    const outcomes = new Map<string, number>();
    const kinds = new Map<string, number>();
    const violations: string[] = [];
    let compared = 0;
    const last = ONLY === undefined ? ITERATIONS : ONLY + 1;
    const started = Date.now();
    await eachMutant(ONLY ?? 0, last, 2, async (index, w) => {
      const m = mutant(bases, index);
      for (const k of m.kinds) kinds.set(k, (kinds.get(k) ?? 0) + 1);
      const file = path.join(dir.path, `w${w}.qcow2`);
      const out = path.join(dir.path, `w${w}.out`);
      const r = m.view === 'bitmap' ? await checkBitmap(m.img, m.base, file, out) : await checkMap(m.img, m.base, m.view, file, out);
      outcomes.set(`${m.view}: ${r.outcome}`, (outcomes.get(`${m.view}: ${r.outcome}`) ?? 0) + 1);
      compared += r.compared;
      if (r.violation) {
        violations.push(`mutant ${index} (seed ${SEED}) of ${m.base.name}, ${m.view}: ${m.steps.join('; ')}\n  ${r.violation}`);
        if (KEEP) await fs.writeFile(path.join(KEEP, `mutant-${SEED}-${index}.qcow2`), m.img);
      }
      if (ONLY !== undefined) t.diagnostic(`mutant ${index} of ${m.base.name}, ${m.view}: ${m.steps.join('; ')} -> ${r.outcome}`);
    });
    t.diagnostic(`${last - (ONLY ?? 0)} mutants in ${((Date.now() - started) / 1000).toFixed(1)} s, ${(compared / MiB).toFixed(0)} MiB compared with qemu`);
    t.diagnostic(`mutations: ${[...kinds].map(([k, n]) => `${k} ${n}`).join(', ')}`);
    t.diagnostic(`outcomes: ${[...outcomes].sort().map(([k, n]) => `${k} ${n}`).join(', ')}`);
    assert.deepEqual(violations, [], violations.slice(0, 20).join('\n'));
    if (ONLY === undefined) {
      // The fuzzing must reach the comparison, not only the refusals.
      assert.ok((outcomes.get('current: mapped, same as qemu') ?? 0) > ITERATIONS / 20, 'too few mutants compared with qemu');
      assert.ok((outcomes.get('current: unmapped') ?? 0) > 0, 'no mutant was refused');
    }
  });
});

/** The mutants the fuzzer found, minimized: each read by qemu (the test means something) and by vmvault. */
describe('mutants the fuzzer found', () => {
  const baseNamed = (name: string) => bases.find((b) => b.name === name)!;
  const qemuSize = async (file: string, snapshot?: string) => {
    const q = await qemuRaw(file, path.join(dir.path, 'found.raw'), snapshot);
    assert.ok(q, 'qemu refuses the mutant');
    return q.bytes.length;
  };
  const reader = (img: Buffer) => memoryReader(img, Date.now() + 20_000);

  test('a disk size that is not whole sectors: qemu rounds it down, the map does not map it', async () => {
    const img = Buffer.from(baseNamed('4k-v3-compressed.qcow2').bytes);
    const size = num(img, 24);
    img.writeBigUInt64BE(BigInt(size + 1), 24);
    const file = path.join(dir.path, 'found-size.qcow2');
    await fs.writeFile(file, img);
    assert.equal(await qemuSize(file), size);
    const map = await openQcow2Map(reader(img), img.length, size + 1);
    assert.ok('unmapped' in map && /not a whole number of 512-byte sectors/.test(map.unmapped), JSON.stringify(map));
    const bitmap = await openQcow2Bitmap(reader(img), img.length, size + 1, 'b');
    assert.ok('unmapped' in bitmap && /512-byte sectors/.test(bitmap.unmapped), JSON.stringify(bitmap));
  });

  test('a snapshot whose size differs from the image\'s: qemu reads it at the image\'s size, the map does not map it', async () => {
    const base = baseNamed('4k-v2-compressed.qcow2');
    const img = Buffer.from(base.bytes);
    assert.ok(img.readUInt32BE(base.snapshotEntries[0]! + 36) >= 16, 'the snapshot records its disk size');
    img.writeBigUInt64BE(BigInt(base.size / 2), 24);
    const file = path.join(dir.path, 'found-snapshot-size.qcow2');
    await fs.writeFile(file, img);
    assert.equal(await qemuSize(file, 's1'), base.size / 2);
    // Asked for the snapshot's own size (the inspection reports the image's, which is refused anyway).
    const map = await openQcow2Map(reader(img), img.length, base.size, 's1');
    assert.ok('unmapped' in map && /snapshot "s1" is of 4194304 bytes, the image of 2097152/.test(map.unmapped), JSON.stringify(map));
    const inspected = await openQcow2Map(reader(img), img.length, base.size / 2, 's1');
    assert.ok('unmapped' in inspected, JSON.stringify(inspected));
  });

  test('a bitmap flagged extra_data_compatible: qemu refuses the image, the reader refuses the bitmap', async () => {
    const base = baseNamed('64k-v3.qcow2');
    const img = Buffer.from(base.bytes);
    const entry = base.bitmapEntries[0]!;
    assert.equal(img.readUInt32BE(entry + 12), 2, 'the bitmap is enabled (auto), nothing else');
    img.writeUInt32BE(6, entry + 12);
    const file = path.join(dir.path, 'found-bitmap-flags.qcow2');
    await fs.writeFile(file, img);
    const r = await execa('qemu-img', ['info', pinned(file)], { reject: false });
    assert.notEqual(r.exitCode, 0);
    assert.match(r.stderr, /Bitmap 'b' doesn't satisfy the constraints/);
    const b = await openQcow2Bitmap(reader(img), img.length, base.size, 'b');
    assert.ok('unmapped' in b && /unknown flags 0x6/.test(b.unmapped), JSON.stringify(b));
  });
});

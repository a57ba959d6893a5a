/**
 * Changed-block tracking for images no VM has open: which disks can be read
 * incrementally, from what, and why not when they cannot (DESIGN.md, data path
 * step 2). Any doubt means a full read of that disk, never an error.
 *
 * - qcow2: a persistent dirty bitmap `vmvault-<repository tag>-<backup id>` is added to the image just
 *   before the backup's internal snapshot (a write between the two is counted twice,
 *   never missed). Every qemu program that later opens the image for writing (the VM,
 *   qemu-io, qemu-nbd) marks what it writes. The next backup reads only the ranges
 *   that bitmap marks; once it commits, the old bitmap is removed and its own carries
 *   on. A failed or killed backup leaves the old one in place: tracking is never lost.
 *   A bitmap left `in-use` or `inconsistent` (QEMU killed) is not trusted.
 * - raw: no bitmap can live in a raw file; as restic does for files, an image whose
 *   device, inode, size, mtime and ctime are those the previous backup recorded is
 *   taken as unchanged.
 * - vmdk, vdi: read in full.
 *
 * Running VMs (the qemu driver) keep the same bitmaps in the running QEMU instead:
 * see src/vm/live-bitmaps.ts; `decideRunning` below is their decision.
 */
import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs/promises';
import { fileReader } from '../disk/image-refs.js';
import { openQcow2Bitmap } from '../disk/qcow2-bitmap.js';
import { exportImage, type NbdExport } from '../disk/qemu.js';
import { NbdClient } from '../disk/nbd.js';
import type { ChangedBlocks, FileStamp, FrozenDisk, NamedDisk } from '../pipeline/backup.js';

export const BITMAP_PREFIX = 'vmvault-';

/**
 * `vmvault-<repository tag>-<backup id>`, the tag being the first 8 hex digits of the
 * repository id: a disk backed up into two repositories (on site and off site, say)
 * keeps one bitmap for each, and neither backup removes the other's.
 */
export function bitmapName(repoId: string, backupId: string): string {
  return `${BITMAP_PREFIX}${repoId.slice(0, 8)}-${backupId}`;
}

/**
 * Whether vmvault bitmap (or libvirt checkpoint) `name` is this repository's to rotate
 * and remove: its own, or one named before names carried their repository
 * (`vmvault-<backup id>`), which the first backup of each repository then replaces.
 */
export function ownBitmap(repoId: string, name: string): boolean {
  return name.startsWith(`${BITMAP_PREFIX}${repoId.slice(0, 8)}-`) || /^vmvault-[0-9a-f]{64}$/.test(name);
}

export interface Decision {
  mode: 'full' | 'incremental';
  reason: string;
  /** qcow2 incremental: the bitmap counting changes since the previous backup. */
  since?: string;
  /** Read in full although tracking could be used, and compare what tracking would have taken. */
  audit?: boolean;
}

export interface AuditPolicy {
  /** Audit now, whatever the schedule (`--audit`). */
  audit?: boolean;
  /** Audit when the disk's last full read is older than this (ms; the policy's `fullReadEvery`). */
  fullReadEveryMs?: number;
  now?: number;
}

/**
 * An incremental decision turned into an audited full read when one is due: every
 * chunk is read, and those tracking called unchanged are compared with the previous
 * backup's ids (src/pipeline/backup.ts). A difference is a tracking bug, reported loudly.
 */
export function withAudit(d: NamedDisk, decision: Decision, policy: AuditPolicy): Decision {
  if (decision.mode !== 'incremental') return decision;
  const last = d.previous?.lastFullRead;
  const due = policy.audit || (policy.fullReadEveryMs !== undefined && (last === undefined || (policy.now ?? Date.now()) - Date.parse(last) >= policy.fullReadEveryMs));
  if (!due) return decision;
  const why = policy.audit ? 'an audit was asked for' : `the last full read of this disk was ${last ? `at ${last}` : 'never'}`;
  return { ...decision, mode: 'full', audit: true, reason: `audit (${why}): read in full and compared with what change tracking says, ${decision.reason}` };
}

const full = (reason: string): Decision => ({ mode: 'full', reason });

/** How a disk can be read, from what it is now and what its previous backup recorded. Pure. */
export function decide(d: NamedDisk, opts: { fullRead?: boolean; stamp?: FileStamp; chainStamps?: FileStamp[] }): Decision {
  if (opts.fullRead) return full('a full read was asked for');
  if (d.format !== 'qcow2' && d.format !== 'raw') return full(`${d.format} images have no change tracking`);
  const prev = d.previous;
  if (!prev) return full('no earlier backup of this disk');
  const p = prev.entry;
  const since = `backup ${prev.backupId.slice(0, 12)}`;
  if (p.format !== d.format) return full(`the disk was ${p.format} at ${since}`);
  if (p.virtualSize !== d.virtualSize) return full(`the disk was resized (${p.virtualSize} bytes at ${since}, ${d.virtualSize} now)`);
  if (p.chunks.length !== Math.ceil(d.virtualSize / prev.chunkSize)) return full(`${since} has a chunk list of another length`);
  if (d.format === 'raw') {
    if (!p.fileStamp || !opts.stamp) return full(`${since} recorded no file identity`);
    return sameStamp(opts.stamp, p.fileStamp)
      ? { mode: 'incremental', reason: `unchanged since ${since} (same device, inode, size, mtime and ctime)` }
      : full(`the raw image changed since ${since}`);
  }
  if (!p.bitmap) return full(`${since} left no bitmap`);
  // A linked clone's bitmap counts writes to the image only, never to its backing files.
  if ((d.below ?? d.chain).length) {
    if (!p.chainStamps || !opts.chainStamps) return full(`the image has a backing chain, and ${since} recorded no identity of its files: its bitmap counts writes to the image only`);
    const same = (p.chain ?? []).length === d.chain.length && d.chain.every((f, i) => p.chain![i] === f) &&
      p.chainStamps.length === opts.chainStamps.length && opts.chainStamps.every((s, i) => sameStamp(s, p.chainStamps![i]!));
    if (!same) return full(`a file of the image's backing chain changed since ${since} (its bitmap counts writes to the image only)`);
  }
  const bitmap = d.bitmaps.find((b) => b.name === p.bitmap);
  if (!bitmap) return full(`bitmap ${p.bitmap} of ${since} is missing from the image`);
  if (bitmap.flags.includes('in-use') || bitmap.flags.includes('inconsistent')) {
    return full(`bitmap ${p.bitmap} is inconsistent: a QEMU that had the image open did not close it cleanly`);
  }
  if (bitmap.flags.includes('busy')) return full(`bitmap ${p.bitmap} is busy (another block job or export of QEMU uses it)`);
  if (!bitmap.flags.includes('auto')) return full(`bitmap ${p.bitmap} is disabled`);
  return { mode: 'incremental', reason: `changes since ${since} (bitmap ${p.bitmap})`, since: p.bitmap };
}

/** A dirty bitmap as a running QEMU lists it on a node (query-named-block-nodes). */
export interface NodeBitmap { name: string; recording: boolean; busy: boolean; persistent: boolean; inconsistent?: boolean }

/**
 * How a running VM's disk can be read. Only a qcow2 image can hold a persistent
 * bitmap (`untrackable` says why this one cannot, e.g. qcow2 version 2); one is trusted only if QEMU lists it on the disk's node, persistent,
 * recording, neither inconsistent (QEMU killed while it was in use) nor busy. Pure.
 */
export function decideRunning(d: NamedDisk, onNode: readonly NodeBitmap[], opts: { fullRead?: boolean; untrackable?: string; chainStamps?: FileStamp[] }): Decision {
  if (opts.fullRead) return full('a full read was asked for');
  if (d.format !== 'qcow2') return full(`${d.format} disks of a running VM are read in full: only a qcow2 image can hold a dirty bitmap`);
  if (opts.untrackable) return full(opts.untrackable);
  const bitmaps = onNode.map((b) => ({
    name: b.name,
    flags: [...(b.inconsistent ? ['inconsistent'] : []), ...(b.busy ? ['busy'] : []), ...(b.recording ? ['auto'] : [])],
  }));
  const decision = decide({ ...d, bitmaps }, opts);
  const used = onNode.find((b) => b.name === decision.since);
  if (decision.since && used && !used.persistent) return full(`bitmap ${used.name} is not persistent`);
  return decision;
}

/** Whether two stamps are of one file, unchanged. */
export function sameStamp(a: FileStamp, b: FileStamp): boolean {
  return (Object.keys(a) as (keyof FileStamp)[]).every((k) => a[k] === b[k]);
}

/** The stamps of the files below a disk (its backing chain, in order: InspectedDisk.below); none without one. */
export function chainStamps(d: Pick<NamedDisk, 'chain' | 'below'>): Promise<FileStamp[]> {
  return Promise.all((d.below ?? d.chain).map(statStamp));
}

/** A file's identity and times, to nanoseconds. */
export async function statStamp(path: string): Promise<FileStamp> {
  const st = await fs.stat(path, { bigint: true });
  return { dev: Number(st.dev), ino: Number(st.ino), size: Number(st.size), mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs) };
}

/**
 * The dirty ranges of bitmap `since`, and the data of `snapshot`, from one read-only
 * qemu-nbd (`-l SNAPSHOT -B BITMAP`, two clients), started on first use. The bitmap is
 * the image's own (it lives in the active image, not in the snapshot): its writes
 * after the instant only make the answer larger.
 */
export function bitmapExport(d: NamedDisk, since: string, snapshot: string, exports: { close(): Promise<void> }[]): { changes: ChangedBlocks; connect: () => Promise<NbdClient> } {
  let opened: Promise<NbdExport> | undefined;
  const open = () => (opened ??= exportImage(d.path, { format: 'qcow2', readOnly: true, snapshot, bitmap: since, shared: 2 }).then((e) => (exports.push(e), e)));
  return {
    changes: { previous: d.previous!.entry.chunks, dirty: async (offset, length) => (await open()).client.dirtyExtents(offset, length) },
    connect: async () => NbdClient.connect((await open()).socketPath),
  };
}

/**
 * The changes of a disk no VM has open, from bitmap `since` read out of the image file
 * itself (src/disk/qcow2-bitmap.ts, whole, into memory): no qemu-nbd is started, and the
 * pipeline reads the snapshot from the file too. `clean`: nothing was written since the
 * bitmap was added. `why` when the bitmap cannot be read with certainty here; the caller
 * then serves it through qemu-nbd (bitmapExport).
 */
export async function bitmapFromFile(d: NamedDisk, since: string): Promise<{ changes: ChangedBlocks; clean: boolean } | { why: string }> {
  let fh: fs.FileHandle;
  try {
    // Non-blocking: something other than a regular file at the path is refused, never waited on.
    fh = await fs.open(d.path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } catch (err) {
    return { why: `cannot open ${d.path}: ${(err as Error).message}` };
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) return { why: 'it is not a regular file' };
    const bitmap = await openQcow2Bitmap(fileReader(fh), st.size, d.virtualSize, since);
    if ('unmapped' in bitmap) return { why: bitmap.unmapped };
    return { changes: { previous: d.previous!.entry.chunks, dirty: (offset, length) => bitmap.dirty(offset, length) }, clean: bitmap.clean };
  } catch (err) {
    return { why: (err as Error).message };
  } finally {
    await fh.close();
  }
}

/** A raw image found unchanged: nothing is dirty. */
export function unchanged(d: NamedDisk): ChangedBlocks {
  return { previous: d.previous!.entry.chunks, dirty: async () => [] };
}

/** The frozen view of a disk with its tracking decision applied. */
export function tracked(d: NamedDisk, decision: Decision, changes: ChangedBlocks | undefined, extra: Partial<FrozenDisk> = {}): FrozenDisk {
  return {
    ...d, ...extra, mode: changes ? decision.mode : 'full', reason: decision.reason,
    ...(changes ? { changes } : {}), ...(changes && decision.audit ? { audit: true } : {}),
  };
}

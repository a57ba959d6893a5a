/**
 * Two ways to reach a VM's qcow2 internal snapshots, behind one small interface:
 * - offline: qemu-img on the image files (the VM is not running);
 * - running: the VM's own QEMU over QMP (snapshot-save / snapshot-load /
 *   snapshot-delete jobs), which also saves and restores the VM's RAM and devices.
 *
 * Contract of every SnapshotDriver:
 * - `list` reports, per inventory disk, the internal snapshots it holds;
 * - `create` takes one snapshot of every disk under one name, or none: a disk that
 *   fails makes the others' snapshots be removed again;
 * - `revert` checks every disk before changing any; offline, an image a process
 *   holds (a running VM) is refused with IMAGE_LOCKED: qemu-img must never write an
 *   image in use, and reverting a running VM's disks under it would corrupt it;
 * - `remove` deletes the snapshot from the disks that have it;
 * - `bitmaps` lists vmvault's dirty bitmaps on each disk, `removeBitmap` removes one
 *   (src/vm/bitmaps.ts: those of repositories that are gone).
 */
import path from 'node:path';
import { errorMessage, NotFoundError, VmvaultError } from '../errors.js';
import {
  ambiguousSnapshot, bitmapChange, imageInfo, snapshotApply, snapshotCreate, snapshotDelete, snapshotList, type ImageFormat, type InternalSnapshot,
} from '../disk/qemu.js';
import { inspectDisk } from '../disk/inspect.js';
import { BITMAP_PREFIX } from './change-tracking.js';
import { nodeBitmaps } from './live-bitmaps.js';
import { isOverlayFile } from './qemu-blocks.js';
import { QmpClient } from './qmp.js';

/** What snapshot operations need to know of an inventory VM. */
export interface SnapshotTarget {
  vm: string;
  driver: 'image' | 'qemu' | 'libvirt';
  disks: { path: string; name: string; format?: ImageFormat; allowChain?: boolean }[];
  /** QMP socket of the running QEMU (driver qemu). */
  qmpSocket?: string;
  /** Guest agent socket: an exported backup of the running VM freezes its filesystems through it. */
  guestAgentSocket?: string;
}

export interface SnapshotDriver {
  readonly kind: 'offline' | 'running';
  /** Per inventory disk (same order), the snapshots it holds. */
  list(): Promise<InternalSnapshot[][]>;
  create(name: string): Promise<void>;
  revert(name: string): Promise<void>;
  /** Deletes `name` from the disks (indexes into target.disks) that hold it. */
  remove(name: string, disks: number[]): Promise<void>;
  /** Per inventory disk (same order), its `vmvault-` dirty bitmaps (other bitmaps are not vmvault's business). */
  bitmaps(): Promise<DiskBitmap[][]>;
  /** Removes dirty bitmap `name` from disk `disk` (an index into target.disks). */
  removeBitmap(disk: number, name: string): Promise<void>;
  close(): Promise<void>;
}

/** A dirty bitmap on a disk, and whether it can be trusted as it is. */
export interface DiskBitmap {
  name: string;
  /** `recording`; `disabled` (not recording); `in use` (a QEMU that had the image open did not close it cleanly, or has it open); `inconsistent`; `busy` (a job or export uses it). */
  state: 'recording' | 'disabled' | 'in use' | 'inconsistent' | 'busy';
}

/**
 * The driver for `target` now: over QMP when the VM has a QMP socket and a QEMU
 * answers on it; with qemu-img otherwise (a stopped VM's images are plain files,
 * and qemu-img's lock probe still refuses one that something else holds).
 */
export async function openSnapshotDriver(target: SnapshotTarget): Promise<SnapshotDriver> {
  if (target.disks.length === 0) throw new VmvaultError('BAD_INPUT', `VM "${target.vm}" has no disks in the inventory: add disks: [{ path: ... }]`);
  if (target.driver === 'qemu' && target.qmpSocket) {
    const qmp = await connectIfRunning(target.qmpSocket);
    if (qmp) return new RunningDriver(target, qmp);
  }
  return new OfflineDriver(target);
}

/** Runs `fn` with the driver for `target` now, closing it whatever happens. */
export async function withSnapshotDriver<T>(target: SnapshotTarget, fn: (d: SnapshotDriver) => Promise<T>): Promise<T> {
  const driver = await openSnapshotDriver(target);
  try {
    return await fn(driver);
  } finally {
    await driver.close();
  }
}

/** The QMP client, or undefined when no QEMU runs on the socket (missing, or connection refused). */
export async function connectIfRunning(socket: string): Promise<QmpClient | undefined> {
  try {
    return await QmpClient.connect(socket);
  } catch (err) {
    const cause = (err as { cause?: NodeJS.ErrnoException }).cause;
    if (err instanceof NotFoundError || cause?.code === 'ECONNREFUSED' || cause?.code === 'ENOENT') return undefined;
    throw err;
  }
}

class OfflineDriver implements SnapshotDriver {
  readonly kind = 'offline';
  private checked = false;
  constructor(private readonly target: SnapshotTarget) {}

  /** Every disk must be a qcow2 image nobody holds: IMAGE_LOCKED or UNSUPPORTED before anything changes. */
  private async inspect(): Promise<void> {
    if (this.checked) return;
    for (const d of this.target.disks) {
      const info = await inspectDisk(d); // format pinned, no image naming another file
      if (info.format !== 'qcow2') {
        throw new VmvaultError('UNSUPPORTED', `disk "${d.name}" of VM "${this.target.vm}" (${info.path}) is ${info.format}: internal snapshots need qcow2 images (convert it with qemu-img convert -O qcow2)`);
      }
    }
    this.checked = true;
  }

  async list(): Promise<InternalSnapshot[][]> {
    await this.inspect();
    const out: InternalSnapshot[][] = [];
    for (const d of this.target.disks) out.push(await snapshotList(d.path));
    return out;
  }

  async create(name: string): Promise<void> {
    await this.inspect();
    const done: string[] = [];
    try {
      for (const d of this.target.disks) {
        await snapshotCreate(d.path, name);
        done.push(d.path);
      }
    } catch (err) {
      for (const p of done) await snapshotDelete(p, name).catch(() => {});
      throw err;
    }
  }

  async revert(name: string): Promise<void> {
    await this.inspect(); // Every image, before any is changed: IMAGE_LOCKED when a VM runs on one.
    // And on every image, the name means one snapshot: QEMU takes ids first (ambiguousSnapshot).
    for (const d of this.target.disks) {
      const ambiguous = ambiguousSnapshot(await snapshotList(d.path), name, `disk image ${path.resolve(d.path)}`);
      if (ambiguous) throw ambiguous;
    }
    // A revert changes the disks behind change tracking's back (and qemu refuses it while
    // bitmaps exist): vmvault's bitmaps go, and the next backup reads these disks in full.
    for (const d of this.target.disks) {
      for (const b of (await imageInfo(d.path, 'qcow2')).bitmaps.filter((x) => x.name.startsWith(BITMAP_PREFIX))) {
        await bitmapChange(d.path, '--remove', b.name);
      }
    }
    const done: string[] = [];
    for (const d of this.target.disks) {
      try {
        await snapshotApply(d.path, name);
      } catch (err) {
        if (done.length === 0) throw err;
        // Some disks are back at the snapshot, others are not: the VM's disks disagree now.
        throw new VmvaultError('QEMU', `reverting ${d.path} to snapshot "${name}" failed (${errorMessage(err)}) after ${done.join(', ')} ` +
          `had been reverted: the disks are now from different points in time. Do not start the VM; revert it again once the cause is fixed`, { cause: err });
      }
      done.push(d.path);
    }
  }

  async remove(name: string, disks: number[]): Promise<void> {
    await this.inspect();
    for (const i of disks) await snapshotDelete(this.target.disks[i]!.path, name);
  }

  async bitmaps(): Promise<DiskBitmap[][]> {
    const out: DiskBitmap[][] = [];
    for (const d of this.target.disks) {
      // Only qcow2 holds bitmaps: another disk of the VM has none. Inspected like every image (format pinned, not in use).
      const info = await inspectDisk(d);
      if (info.format !== 'qcow2') {
        out.push([]);
        continue;
      }
      out.push(info.bitmaps.filter((b) => b.name.startsWith(BITMAP_PREFIX)).map((b) => ({
        name: b.name,
        state: b.flags.includes('in-use') ? 'in use' : b.flags.includes('inconsistent') ? 'inconsistent' : b.flags.includes('auto') ? 'recording' : 'disabled',
      })));
    }
    return out;
  }

  async removeBitmap(disk: number, name: string): Promise<void> {
    await inspectDisk(this.target.disks[disk]!); // not in use, qcow2 as pinned
    await bitmapChange(this.target.disks[disk]!.path, '--remove', name);
  }

  async close(): Promise<void> {}
}

interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: {
    file: string;
    'node-name'?: string;
    drv: string;
    ro?: boolean;
    image?: { filename: string; format: string; 'backing-image'?: { filename: string }; snapshots?: { id: string; name: string; 'date-sec': number; 'vm-state-size': number }[] };
  };
}

/** Snapshot jobs save the VM's RAM: allow them time (a big VM on a slow disk). */
const JOB_TIMEOUT_MS = 30 * 60_000;

class RunningDriver implements SnapshotDriver {
  readonly kind = 'running';
  private jobs = 0;
  constructor(private readonly target: SnapshotTarget, private readonly qmp: QmpClient) {}

  /** The block node of every inventory disk, matched by image path, with its snapshots. */
  /** With `anyFormat`, a disk that is not qcow2 (bitmaps: it has none) comes back without a node instead of refused. */
  private async nodes(): Promise<{ node: string; snapshots: InternalSnapshot[] }[]>;
  private async nodes(anyFormat: true): Promise<{ node?: string; snapshots: InternalSnapshot[] }[]>;
  private async nodes(anyFormat = false): Promise<{ node?: string; snapshots: InternalSnapshot[] }[]> {
    const blocks = await this.qmp.execute<BlockInfo[]>('query-block');
    return this.target.disks.map((d) => {
      const want = path.resolve(d.path);
      const b = blocks.find((x) => x.inserted && (path.resolve(x.inserted.image?.filename ?? '') === want || path.resolve(x.inserted.file) === want));
      if (!b?.inserted) {
        // A backup killed before its commit leaves the disk running on a vmvault overlay. Saying
        // "not attached" would invite pointing the inventory at the overlay, which no backup then merges.
        const over = blocks.find((x) => x.inserted?.image && isOverlayFile(x.inserted.image.filename) &&
          path.resolve(x.inserted.image['backing-image']?.filename ?? '') === want);
        if (over) {
          throw new VmvaultError('QEMU', `disk "${d.name}" of VM "${this.target.vm}" (${want}) runs on overlay ${over.inserted!.image!.filename}, ` +
            `left by a backup that stopped before merging it back: back the VM up once (vmvault backup, or its next scheduled backup), which merges it first, then try again. ` +
            'Do not delete the overlay or change the inventory to it: it holds the VM\'s newest writes');
        }
        const attached = blocks.flatMap((x) => (x.inserted ? [x.inserted.image?.filename ?? x.inserted.file] : []));
        throw new NotFoundError(`disk "${d.name}" of VM "${this.target.vm}" (${want}) is not attached to the QEMU on ${this.target.qmpSocket} (attached: ${attached.join(', ') || 'none'}): fix the inventory's disk paths`);
      }
      if (b.inserted.drv !== 'qcow2') {
        if (anyFormat) return { snapshots: [] };
        throw new VmvaultError('UNSUPPORTED', `disk "${d.name}" of VM "${this.target.vm}" is ${b.inserted.drv} in the running QEMU: internal snapshots need qcow2 images`);
      }
      const node = b.inserted['node-name'];
      if (!node) throw new VmvaultError('QEMU', `QEMU reports no node name for disk "${d.name}" of VM "${this.target.vm}"`);
      const snapshots = (b.inserted.image?.snapshots ?? []).map((s) => ({
        id: String(s.id), name: s.name, date: new Date(s['date-sec'] * 1000), vmStateSize: s['vm-state-size'],
      }));
      return { node, snapshots };
    });
  }

  private jobId(op: string): string {
    return `vmvault-${op}-${process.pid}-${Date.now()}-${this.jobs++}`;
  }

  async list(): Promise<InternalSnapshot[][]> {
    return (await this.nodes()).map((n) => n.snapshots);
  }

  async create(name: string): Promise<void> {
    const nodes = await this.nodes();
    const devices = nodes.map((n) => n.node);
    // The VM's RAM goes into the first disk; snapshot-save stops the VM meanwhile and resumes it after.
    try {
      await this.qmp.runJob('snapshot-save', { 'job-id': this.jobId('save'), tag: name, vmstate: devices[0]!, devices }, JOB_TIMEOUT_MS);
    } catch (err) {
      // QEMU does not remove what it created on the other disks when one fails; the name was free before, so any of it is ours.
      const left = (await this.nodes().catch(() => [])).filter((n) => n.snapshots.some((s) => s.name === name)).map((n) => n.node);
      if (left.length) await this.qmp.runJob('snapshot-delete', { 'job-id': this.jobId('undo'), tag: name, devices: left }, JOB_TIMEOUT_MS).catch(() => {});
      throw err;
    }
  }

  async revert(name: string): Promise<void> {
    const nodes = await this.nodes();
    for (const n of nodes) {
      const ambiguous = ambiguousSnapshot(n.snapshots, name, `the disk of node ${n.node} of VM "${this.target.vm}"`);
      if (ambiguous) throw ambiguous;
    }
    const holder = nodes.find((n) => n.snapshots.some((s) => s.name === name && s.vmStateSize > 0));
    if (!holder) {
      throw new VmvaultError('UNSUPPORTED',
        `snapshot "${name}" of VM "${this.target.vm}" holds no VM state (it was taken while the VM was stopped): QEMU cannot load it into the running VM. ` +
        'Stop the VM, then revert it (the images are then reverted offline).');
    }
    // As offline: vmvault's bitmaps go (QEMU refuses to load a snapshot under them), and the next backup reads in full.
    const bitmaps = await nodeBitmaps(this.qmp);
    for (const n of nodes) {
      for (const b of (bitmaps.get(n.node) ?? []).filter((x) => x.name.startsWith(BITMAP_PREFIX))) {
        await this.qmp.execute('block-dirty-bitmap-remove', { node: n.node, name: b.name });
      }
    }
    await this.qmp.runJob('snapshot-load', { 'job-id': this.jobId('load'), tag: name, vmstate: holder.node, devices: nodes.map((n) => n.node) }, JOB_TIMEOUT_MS);
  }

  async remove(name: string, disks: number[]): Promise<void> {
    const nodes = await this.nodes();
    const devices = disks.map((i) => nodes[i]!.node);
    if (devices.length > 0) await this.qmp.runJob('snapshot-delete', { 'job-id': this.jobId('delete'), tag: name, devices }, JOB_TIMEOUT_MS);
  }

  async bitmaps(): Promise<DiskBitmap[][]> {
    const [nodes, onNodes] = [await this.nodes(true), await nodeBitmaps(this.qmp)];
    return nodes.map((n) => (n.node === undefined ? [] : onNodes.get(n.node) ?? []).filter((b) => b.name.startsWith(BITMAP_PREFIX)).map((b) => ({
      name: b.name,
      state: b.inconsistent ? 'inconsistent' : b.busy ? 'busy' : b.recording ? 'recording' : 'disabled',
    })));
  }

  async removeBitmap(disk: number, name: string): Promise<void> {
    const node = (await this.nodes(true))[disk]!.node;
    if (node === undefined) throw new NotFoundError(`disk "${this.target.disks[disk]!.name}" of VM "${this.target.vm}" is not qcow2: it has no bitmap ${name}`);
    // QEMU refuses a busy bitmap (a backup's export of it): the error says so.
    await this.qmp.execute('block-dirty-bitmap-remove', { node, name });
  }

  async close(): Promise<void> {
    await this.qmp.close();
  }
}

/**
 * One point-in-time driver interface (DESIGN.md, data path step 1): a driver freezes
 * a VM's disks at one instant and hands the pipeline a read-only view of each; the
 * pipeline reads, chunks and commits; `close()` gives the instant back (deletes the
 * internal snapshot, merges the overlays). A driver may give back what only reading
 * needed earlier, once everything is read and while the backup commits (`read()`: the
 * image driver deletes its snapshot there). Drivers are chosen from one table, as
 * storage backends are (src/vm/drivers.ts), and `backupVm` there is the one backup
 * entry point for the CLI, the worker and snapshot export.
 *
 * Contract of a driver's `open`:
 * - every disk is inspected (src/pipeline/backup.ts inspectDisks: format pinned, no
 *   image naming another file) before anything on the host changes;
 * - when `open` throws, it has undone what it did; when it returns, `close()` must be
 *   called whatever happens, and is safe to call once;
 * - `close()` throws an error that says what state it leaves the VM in.
 */
import { errorMessage, VmvaultError } from '../errors.js';
import type { BackupDisk, FrozenDisk } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import type { GuestAgentOptions, Warn } from './guest-agent.js';
import type { Overlay } from './overlays.js';

export interface PointInTimeTarget {
  vm: string;
  /** The VM's disks; a libvirt domain may leave them out (they then come from virsh domblklist). */
  disks: BackupDisk[];
  /** qemu: the running QEMU's QMP socket. */
  qmpSocket?: string;
  /** qemu: the guest agent's socket, for a filesystem freeze at the instant. */
  guestAgentSocket?: string;
  guestAgent?: GuestAgentOptions;
  /** libvirt: the domain's name (default: the VM's name). */
  domain?: string;
  /** qemu and libvirt: where the temporary overlays go (default: next to each image). */
  overlayDir?: string;
  /** qemu: longest wait for one overlay's commit (default 1 h). */
  commitTimeoutMs?: number;
  /** qemu: called once the overlays exist and before the base images are read (tests). */
  onPointInTime?: (overlays: readonly Overlay[]) => void | Promise<void>;
  /** Read every disk in full, whatever change tracking says (the bitmaps are still rotated). */
  fullRead?: boolean;
  /** Read in full and compare with what change tracking says, on every disk it covers. */
  audit?: boolean;
  /** Such an audit whenever a disk's last full read is older than this (ms): the policy's `fullReadEvery`. */
  fullReadEveryMs?: number;
  /** Warnings (crash-consistent fallback, recovered leftovers). Default: stderr. */
  warn?: Warn;
  /**
   * Called by a driver once it knows some disk will be read, before it takes the instant
   * (the image driver: before its qemu-img runs), so that what reading needs is made ready
   * meanwhile (backupVm: the chunk threads' slots). A driver that does not call it leaves
   * that to the backup, which does it when it starts.
   */
  willRead?: () => void;
}

/** What a driver reports of how it took the instant. */
export interface PointInTimeDetails {
  /** The guest's filesystems were frozen by its agent at the instant. */
  guestFrozen?: boolean;
  /** Leftovers of killed earlier runs cleaned up first. */
  recovered?: number;
  /** libvirt: the domain was running. */
  running?: boolean;
}

export interface PointInTime {
  disks: FrozenDisk[];
  consistency: 'offline' | 'crash' | 'application';
  /** Configuration files the driver captured (a libvirt domain's XML), stored with the backup. */
  configFiles: string[];
  details: PointInTimeDetails;
  /**
   * Everything was read: what held the instant for reading (an internal snapshot, the
   * exports serving it) may go, while the backup commits. Change tracking is left to
   * `close`, which also does this (once) for a driver whose `read` was never called,
   * and reports its failure. Optional: a driver without it gives everything back at `close`.
   */
  read?(): Promise<void>;
  /**
   * Gives the instant back. `committed` says whether the backup was saved: change
   * tracking moves to the new backup only then (the previous bitmap stays otherwise).
   */
  close(committed: boolean): Promise<void>;
}

/** `backupId` is the id the backup will have: bitmaps are named after it. */
export type PointInTimeOpener = (repo: Repository, target: PointInTimeTarget, backupId: string) => Promise<PointInTime>;

export const stderrWarn: Warn = (message, fields) => process.stderr.write(`warning: ${message}${fields ? ` ${JSON.stringify(fields)}` : ''}\n`);

/**
 * The error for a backup that failed and whose point in time could not be given back
 * either: it must say what state the VM is left in, not only why the backup failed.
 */
export function combineFailures(failure: unknown, closeErr: unknown): VmvaultError {
  const code = failure instanceof VmvaultError ? failure.code : 'QEMU';
  return new VmvaultError(code, `${errorMessage(failure)}; and ${errorMessage(closeErr)}`, {
    cause: failure, retriable: failure instanceof VmvaultError && failure.retriable,
  });
}

/** The audit settings of a target, for the drivers' decisions. */
export function auditPolicy(t: PointInTimeTarget): { audit?: boolean; fullReadEveryMs?: number } {
  return { ...(t.audit ? { audit: true } : {}), ...(t.fullReadEveryMs !== undefined ? { fullReadEveryMs: t.fullReadEveryMs } : {}) };
}

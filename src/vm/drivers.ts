/**
 * The point-in-time drivers, chosen from one table, and `backupVm`: the one backup
 * of a VM for the CLI, the worker and snapshot export (see src/vm/point-in-time.ts
 * for the contract every driver keeps).
 */
import type { DRIVERS } from '../config/schema.js';
import { backup, newBackupId, readySlots, type BackupOptions, type BackupResult, type FrozenDisk } from '../pipeline/backup.js';
import { ownPool } from '../pipeline/pool.js';
import type { Manifest } from '../repo/manifest.js';
import type { Repository } from '../repo/repository.js';
import { openImages } from './image-driver.js';
import { openLibvirt } from './libvirt.js';
import { openRunningVm } from './live.js';
import { combineFailures, stderrWarn, type PointInTime, type PointInTimeDetails, type PointInTimeOpener, type PointInTimeTarget } from './point-in-time.js';

export type Driver = (typeof DRIVERS)[number];

const OPENERS: Record<Driver, PointInTimeOpener> = {
  image: openImages,
  qemu: openRunningVm,
  libvirt: openLibvirt,
};

/** Freezes the VM's disks with `driver`; the caller must `close()` what it returns. */
export function openPointInTime(repo: Repository, driver: Driver, target: PointInTimeTarget, backupId: string): Promise<PointInTime> {
  return OPENERS[driver](repo, target, backupId);
}

export interface VmBackupRequest extends PointInTimeTarget, BackupOptions {
  driver: Driver;
  /**
   * Called once the point in time is taken, with its disks (their snapshots and new
   * bitmaps): a caller that may have to exit without giving it back can say what is left.
   */
  onFrozen?: (disks: readonly FrozenDisk[]) => void;
}

export type VmBackupResult = BackupResult & PointInTimeDetails;

/**
 * Takes the VM's point in time with its driver, backs it up, and gives the instant
 * back. A failed backup and a failed give-back are both reported: the error says what
 * state the VM is left in.
 */
export async function backupVm(repo: Repository, req: VmBackupRequest): Promise<VmBackupResult> {
  const id = newBackupId();
  // The chunk threads make their slots ready while the point in time is taken, once the
  // driver knows something will be read (PointInTimeTarget.willRead): for images, that is
  // mostly waiting for qemu-img, and the pages would otherwise be faulted in on the data
  // path (ChunkPool.warm). A disk found unchanged starts no thread; drivers of running
  // guests do not call it (their freeze is not to be lengthened), and backup() does it then.
  const lease = (req.chunkPool ?? (() => ownPool(repo.workerInit())))();
  let handed = false;
  const chunkPool = () => { handed = true; return lease; };
  // Asked again (another disk, a retried freeze), warm() has the slots already and does nothing.
  const willRead = () => {
    req.willRead?.();
    try {
      void readySlots(repo, req, lease.pool);
    } catch {
      // Threads that cannot start now are started, or their failure reported, by backup().
    }
  };
  let result: BackupResult | undefined;
  let failure: unknown;
  let pit: PointInTime;
  try {
    pit = await openPointInTime(repo, req.driver, { ...req, willRead }, id);
  } catch (err) {
    await lease.release().catch(() => undefined);
    throw err;
  }
  req.onFrozen?.(pit.disks);
  // Read in full: the snapshot goes while the backup commits. Its failure is close()'s to report.
  const onRead = pit.read ? () => void pit.read!().catch(() => undefined) : undefined;
  try {
    result = await backup(repo, {
      ...req, id, disks: pit.disks, consistency: pit.consistency, configs: [...(req.configs ?? []), ...pit.configFiles], chunkPool, ...(onRead ? { onRead } : {}),
    });
  } catch (err) {
    failure = err;
  }
  // backup() releases the pool it took; one that failed before taking it did not.
  if (!handed) await lease.release().catch(() => undefined);
  try {
    await pit.close(result !== undefined);
  } catch (closeErr) {
    if (failure !== undefined) throw combineFailures(failure, closeErr);
    // The backup itself is committed and valid; what is wrong is the VM's state.
    (req.warn ?? stderrWarn)(`backup ${result!.manifest.id} was saved, but giving its point in time back failed`);
    throw closeErr;
  }
  if (failure !== undefined) throw failure;
  return { ...result!, ...pit.details };
}

/** What an audited backup found wrong with change tracking, one message per disk (none when it agreed). */
export function auditFailures(m: Manifest): string[] {
  return m.disks.filter((d) => d.audit && d.audit.differing > 0).map((d) =>
    `AUDIT: change tracking missed writes on disk "${d.name}" of VM "${m.vm}": ${d.audit!.differing} of the ${d.audit!.unchanged} chunk(s) it called unchanged ` +
    `were not (first at byte offset(s) ${d.audit!.offsets.slice(0, 4).join(', ')}). Backup ${m.id} read everything and is correct; ` +
    'earlier incremental backups of this disk may miss data: back the VM up with --full-read until the cause (hypervisor, storage or vmvault) is found');
}

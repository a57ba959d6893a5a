/**
 * The `image` driver: disk images no VM has open. A qcow2 image is frozen by an
 * internal snapshot (`vmvault-<run id>`, deleted by `close`; one left by a killed run
 * is deleted by the next, since an image nobody holds has no other writer of ours)
 * and tracked by a persistent dirty bitmap (src/vm/change-tracking.ts); any other
 * image is read as it is, nothing writing to it (a raw image some process writes to
 * is refused by the inspection's lock probe).
 */
import { randomBytes } from 'node:crypto';
import { VmvaultError, errorMessage } from '../errors.js';
import { bitmapChange, imageCheck, snapshotCreate, snapshotDelete, WriterStopped } from '../disk/qemu.js';
import type { NbdClient } from '../disk/nbd.js';
import { prepareExports, retryIfOrphansHeld } from '../disk/qemu-nbd.js';
import { inspectDisks, type ChangedBlocks, type FrozenDisk, type NamedDisk } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import { bitmapExport, bitmapFromFile, bitmapName, chainStamps, ownBitmap, decide, sameStamp, statStamp, tracked, unchanged, withAudit, type AuditPolicy } from './change-tracking.js';
import type { Warn } from './guest-agent.js';
import { auditPolicy, stderrWarn, type PointInTime, type PointInTimeTarget } from './point-in-time.js';

/** Internal snapshots this tool creates are named with this prefix, so leftovers can be found. */
export const SNAPSHOT_PREFIX = 'vmvault-';

export function openImages(repo: Repository, target: PointInTimeTarget, backupId: string): Promise<PointInTime> {
  // A disk locked by a qemu-nbd that a killed vmvault left behind is freed, and all is tried again.
  return retryIfOrphansHeld(async () => {
    // Every disk is inspected before any is snapshotted.
    const disks = await inspectDisks(repo, target.vm, target.disks);
    return freezeImages(disks, freezeOptions(repo, target, backupId, target.warn ?? stderrWarn));
  });
}

/** What freezeImages needs of a backup's target (the libvirt driver's shut-off domains too). */
export function freezeOptions(repo: Repository, target: PointInTimeTarget, backupId: string, warn: Warn): FreezeOptions {
  return { ...auditPolicy(target), repoId: repo.id, backupId, fullRead: target.fullRead ?? false, warn, ...(target.willRead ? { willRead: target.willRead } : {}) };
}

interface Taken { disk: FrozenDisk; newBitmap?: string; oldBitmap?: string }

/** Snapshots and tracks already-inspected images (the libvirt driver's shut-off domains come here too). */
/** `repoId` and `backupId` name the new bitmaps (change-tracking.ts bitmapName). */
export interface FreezeOptions extends AuditPolicy { repoId: string; backupId: string; fullRead: boolean; warn: Warn; willRead?: () => void }

export async function freezeImages(disks: NamedDisk[], opts: FreezeOptions): Promise<PointInTime> {
  const snapshot = `${SNAPSHOT_PREFIX}${randomBytes(8).toString('hex')}`;
  const taken: Taken[] = [];
  // The qemu-nbd exports that serve bitmaps the image file could not give with certainty.
  const exports: { close(): Promise<void> }[] = [];
  let recovered = 0;
  let dropped: Promise<void> | undefined;
  // The exports and snapshots, once: as soon as the backup has read everything (read), or at close.
  const dropInstant = () => (dropped ??= (async () => {
    for (const e of exports.splice(0)) await e.close();
    for (const { disk } of taken) if (disk.snapshot) await snapshotDelete(disk.path, disk.snapshot, { known: true });
  })());
  const release = async (committed: boolean) => {
    await dropInstant();
    // Tracking moves to the new bitmap only once its backup is saved; a bitmap that cannot
    // be removed now (a VM started meanwhile) is removed as stale by the next backup.
    for (const t of taken) {
      const drop = committed ? t.oldBitmap : t.newBitmap;
      if (drop) await bitmapChange(t.disk.path, '--remove', drop).catch((err: unknown) => opts.warn(`could not remove dirty bitmap ${drop} from ${t.disk.path} (${errorMessage(err)}): the next backup removes it`));
    }
  };
  try {
    for (const d of disks) {
      if (d.format === 'qcow2') {
        // Nothing is written to an image whose metadata is wrong: checked before the first
        // write (none for a disk found unchanged), and then it is read as it is.
        let checked: Promise<Unwritable | undefined> | undefined;
        const unwritable = () => (checked ??= checkBeforeWriting(d));
        if (leftoversOf(d, opts.repoId).length) {
          const bad = await unwritable();
          if (bad) {
            taken.push({ disk: await readAsIs(d, bad, opts) });
            continue;
          }
          recovered += await removeLeftovers(d, opts.repoId);
        }
        taken.push(await freezeQcow2(d, snapshot, opts, exports, unwritable));
      } else {
        const stamp = d.format === 'raw' ? await statStamp(d.path) : undefined;
        const decision = withAudit(d, decide(d, { fullRead: opts.fullRead, ...(stamp ? { stamp } : {}) }), opts);
        // Incremental here means unchanged (the file's stamp is the same); an audit is a full read.
        const same = decision.mode === 'incremental';
        if (!same) opts.willRead?.();
        taken.push({ disk: tracked(d, decision, same ? unchanged(d) : undefined, { ...(stamp ? { fileStamp: stamp } : {}), ...(same ? { readsNothing: true } : {}) }) });
      }
    }
  } catch (err) {
    await release(false).catch(() => {});
    throw err;
  }
  let closing: Promise<void> | undefined;
  return {
    disks: taken.map((t) => t.disk), consistency: 'offline', configFiles: [], details: { recovered },
    read: dropInstant,
    close: (committed) => (closing ??= release(committed)),
  };
}

/** The new bitmap first, then the snapshot: a write between the two is counted, never missed. */
async function freezeQcow2(
  d: NamedDisk, snapshot: string, opts: FreezeOptions, exports: { close(): Promise<void> }[], unwritable: () => Promise<Unwritable | undefined>,
): Promise<Taken> {
  const stamps = await chainStamps(d);
  const decision = withAudit(d, decide(d, { fullRead: opts.fullRead, chainStamps: stamps }), opts);
  // Nothing written since the previous backup (its bitmap, read from the file, is clean):
  // there is nothing to read, so no snapshot is taken, and that bitmap goes on counting
  // for the next backup (it holds the changes since an instant whose content this backup
  // records again). An image no VM has open cannot change in between: a QEMU that opens
  // it marks the bitmap in use, which the next backup sees.
  if (decision.mode === 'incremental' && decision.since && !decision.audit && await bitmapClean(d, decision.since)) {
    const reason = `unchanged since backup ${d.previous!.backupId.slice(0, 12)} (bitmap ${decision.since} is clean)`;
    const since = decision.since;
    // A chunk storage lacks is read from the image itself (which heals it): the bitmap, still
    // clean and not in use after the read, proves nothing wrote to the image meanwhile.
    const verifyRead = async () => {
      if (await bitmapClean(d, since)) return;
      throw new VmvaultError('QEMU', `${d.path} was written to while this backup read it (it had found the disk unchanged and took no snapshot): run the backup again`, { retriable: true });
    };
    return { disk: tracked(d, { ...decision, reason }, unchanged(d), { bitmap: since, verifyRead, readsNothing: true, chainStamps: stamps }) };
  }
  const bad = await unwritable();
  if (bad) return { disk: await readAsIs(d, bad, opts) };
  opts.willRead?.();
  const newBitmap = bitmapName(opts.repoId, opts.backupId);
  await bitmapChange(d.path, '--add', newBitmap);
  try {
    await snapshotCreate(d.path, snapshot, d.snapshots);
  } catch (err) {
    // A snapshot stopped for its time bound leaves an image qemu must not write to unless it checks clean.
    if (!(err instanceof WriterStopped) || err.checksClean) await bitmapChange(d.path, '--remove', newBitmap).catch(() => {});
    throw err;
  }
  const served = decision.since ? await changesSince(d, decision.since, snapshot, exports) : undefined;
  return {
    disk: tracked(d, decision, served?.changes, { snapshot, bitmap: newBitmap, chainStamps: stamps, ...(served ? { connect: served.connect } : {}) }),
    newBitmap, ...(d.previous?.entry.bitmap ? { oldBitmap: d.previous.entry.bitmap } : {}),
  };
}

/**
 * A qcow2 image whose metadata `qemu-img check` finds wrong (clusters whose refcounts
 * disagree with the tables that use them), or cannot check: a bitmap or a snapshot would
 * make qemu allocate clusters for its own metadata, and one it thinks free may hold guest
 * data, overwritten then. So nothing is written to it: it is read in full as qemu reads
 * it now, with no snapshot (its identity unchanged after every read proves nothing wrote
 * to it meanwhile) and no bitmap (the next backup reads in full again).
 */
type Unwritable = { corruptions: number } | { failed: string; timedOut?: true };

/** Why qemu must not write to image `d` (qemu-img check), or undefined. IMAGE_LOCKED when a process holds it (a VM that started since inspection). */
async function checkBeforeWriting(d: NamedDisk): Promise<Unwritable | undefined> {
  const check = await imageCheck(d.path);
  return 'failed' in check || check.corruptions > 0 ? check : undefined;
}

async function readAsIs(d: NamedDisk, check: Unwritable, opts: FreezeOptions): Promise<FrozenDisk> {
  const what = 'failed' in check ? `could not be checked (${check.failed})` : `has ${check.corruptions} metadata corruption(s) (qemu-img check)`;
  if ('timedOut' in check) {
    // A slow check says nothing of the image: only that its metadata was not verified before qemu would write to it.
    opts.warn(`disk image ${d.path} ${what}: it is backed up as qemu reads it now, without a snapshot or dirty bitmap, because qemu writes nothing ` +
      'to an image whose metadata was not checked. A check takes long on a very large image, on slow storage or on one crafted to make it long: ' +
      `run "qemu-img check -f qcow2 ${d.path}" yourself while nothing writes to it, and if it finishes clean, give later backups the time it took ` +
      '(VMVAULT_TOOL_TIMEOUTS=check=MILLISECONDS); until then, every backup of it reads it in full');
  } else {
    opts.warn(`disk image ${d.path} ${what}: it is backed up as qemu reads it now, without a snapshot or dirty bitmap, because qemu writing to it could ` +
      'overwrite guest data. Stop using it, and repair a copy first (qemu-img check -r all on the copy, then compare); until then, every backup of it reads it in full');
  }
  const before = await statStamp(d.path);
  const verifyRead = async () => {
    const now = await statStamp(d.path);
    if (sameStamp(before, now)) return;
    throw new VmvaultError('QEMU', `${d.path} was written to while this backup read it (it took no snapshot: the image's metadata is damaged): stop what writes to it, then run the backup again`, { retriable: true });
  };
  opts.willRead?.();
  return tracked(d, { mode: 'full', reason: `the image ${what}: read as it is, without a snapshot or bitmap` }, undefined, { verifyRead, chainStamps: await chainStamps(d) });
}

/** Whether bitmap `since` of the image file marks nothing written (false when it cannot be read with certainty). */
async function bitmapClean(d: NamedDisk, since: string): Promise<boolean> {
  const fromFile = await bitmapFromFile(d, since);
  return 'clean' in fromFile && fromFile.clean;
}

/**
 * The changes since bitmap `since`: read from the image file where its bitmap can be
 * read with certainty (no process started; the snapshot is then read from the file
 * too), else served by a qemu-nbd of the snapshot with the bitmap.
 */
async function changesSince(d: NamedDisk, since: string, snapshot: string, open: { close(): Promise<void> }[]): Promise<{ changes: ChangedBlocks; connect?: () => Promise<NbdClient> }> {
  const fromFile = await bitmapFromFile(d, since);
  if ('changes' in fromFile) return { changes: fromFile.changes };
  prepareExports();
  return bitmapExport(d, since, snapshot, open);
}

/**
 * Snapshots and bitmaps of killed earlier runs: the image is not in use (the
 * inspection checked), so every `vmvault-` snapshot is ours to remove, and every bitmap
 * of this repository but the one the newest backup of this disk left (another
 * repository's bitmaps are its own to rotate).
 */
async function removeLeftovers(d: NamedDisk, repoId: string): Promise<number> {
  const left = leftoversOf(d, repoId);
  for (const l of left) {
    if (l.kind === 'snapshot') await snapshotDelete(d.path, l.name, { known: true });
    else await bitmapChange(d.path, '--remove', l.name);
  }
  return left.length;
}

function leftoversOf(d: NamedDisk, repoId: string): { kind: 'snapshot' | 'bitmap'; name: string }[] {
  const keep = d.previous?.entry.bitmap;
  return [
    ...d.snapshots.filter((x) => x.name.startsWith(SNAPSHOT_PREFIX)).map((s) => ({ kind: 'snapshot' as const, name: s.name })),
    ...d.bitmaps.filter((x) => ownBitmap(repoId, x.name) && x.name !== keep).map((b) => ({ kind: 'bitmap' as const, name: b.name })),
  ];
}

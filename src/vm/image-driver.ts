/**
 * The `image` driver: disk images no VM has open. A qcow2 image is frozen by an
 * internal snapshot (`vmvault-<run id>`, deleted by `close`; one left by a killed run
 * is deleted by the next, since an image nobody holds has no other writer of ours);
 * any other image is read as it is, nothing writing to it (a raw image some process
 * writes to is refused by the inspection's lock probe).
 */
import { randomBytes } from 'node:crypto';
import { snapshotCreate, snapshotDelete } from '../disk/qemu.js';
import { inspectDisks, type FrozenDisk, type NamedDisk } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import type { PointInTime, PointInTimeTarget } from './point-in-time.js';

/** Internal snapshots this tool creates are named with this prefix, so leftovers can be found. */
export const SNAPSHOT_PREFIX = 'vmvault-';

export async function openImages(repo: Repository, target: PointInTimeTarget): Promise<PointInTime> {
  // Every disk is inspected before any is snapshotted.
  return freezeImages(await inspectDisks(repo, target.vm, target.disks));
}

/** Snapshots the qcow2 disks among already-inspected ones (the libvirt driver's shut-off domains come here too). */
export async function freezeImages(disks: NamedDisk[]): Promise<PointInTime> {
  const snapshot = `${SNAPSHOT_PREFIX}${randomBytes(8).toString('hex')}`;
  const taken: FrozenDisk[] = [];
  let recovered = 0;
  const close = async () => {
    for (const d of taken) if (d.snapshot) await snapshotDelete(d.path, d.snapshot);
  };
  try {
    for (const d of disks) {
      if (d.format !== 'qcow2') {
        taken.push(d);
        continue;
      }
      for (const s of d.snapshots.filter((x) => x.name.startsWith(SNAPSHOT_PREFIX))) {
        await snapshotDelete(d.path, s.name);
        recovered++;
      }
      await snapshotCreate(d.path, snapshot);
      taken.push({ ...d, snapshot });
    }
  } catch (err) {
    await close().catch(() => {});
    throw err;
  }
  let closing: Promise<void> | undefined;
  return { disks: taken, consistency: 'offline', configFiles: [], details: { recovered }, close: () => (closing ??= close()) };
}

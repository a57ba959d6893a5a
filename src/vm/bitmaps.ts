/**
 * vmvault's dirty bitmaps on a VM's disks, by the repository each belongs to: listed,
 * and removed once that repository is gone (`vmvault bitmaps`).
 *
 * A backup rotates only its own repository's bitmaps (change-tracking.ts): it cannot
 * know whether another repository still uses its bitmaps (a disk backed up on site and
 * off site keeps one for each). So a repository that is deleted, or recreated under a
 * new id, leaves its last bitmap on each disk for good, and such bitmaps pile up. Each
 * costs: a running QEMU updates every recording bitmap on every write of the guest, and
 * qemu-img reads them all whenever it opens the image (118 left bitmaps made every
 * qemu-img step of a backup three times slower). Only the operator knows which
 * repositories are gone, so removal is by repository tag and asked for, never guessed.
 */
import { NotFoundError, VmvaultError } from '../errors.js';
import { BITMAP_PREFIX } from './change-tracking.js';
import { withSnapshotDriver, type DiskBitmap, type SnapshotTarget } from './snapshot-drivers.js';

/** A vmvault bitmap of one disk, with what its name says. */
export interface VmvaultBitmap extends DiskBitmap {
  disk: string;
  /** Tag of the repository it belongs to (first 8 hex digits of the repository id); absent for names from before tags (`vmvault-<backup id>`). */
  tag?: string;
  /**
   * The backup that added it. While the bitmap is current, the repository's newest backup
   * of this disk records it: that backup, or a later one that found the disk unchanged.
   */
  backupId?: string;
}

const NAME_RE = /^vmvault-(?:([0-9a-f]{8})-)?([0-9a-f]{64})$/;
const TAG_RE = /^[0-9a-f]{8}$/;

/** Repository tag and backup id that a bitmap name carries (change-tracking.ts bitmapName); undefined parts for names of another shape. */
export function parseBitmapName(name: string): { tag?: string; backupId?: string } {
  const m = NAME_RE.exec(name);
  if (!m) return {};
  return { ...(m[1] ? { tag: m[1] } : {}), backupId: m[2]! };
}

/** The tag of a repository id, as bitmap names carry it. */
export function repositoryTag(repoId: string): string {
  return repoId.slice(0, 8);
}

/** Which bitmaps `removeBitmaps` removes: those of one repository tag, or one by its full name. */
export type BitmapSelector = { tag: string } | { name: string };

/** Every vmvault bitmap on the target's disks, disk by disk. */
export async function listBitmaps(target: SnapshotTarget): Promise<VmvaultBitmap[]> {
  return withSnapshotDriver(target, async (driver) => described(target, await driver.bitmaps()));
}

/**
 * Removes the selected bitmaps from every disk that has them and returns them. Nothing
 * is lost by removing a bitmap a repository still uses: that repository's next backup
 * of the disk finds it missing and reads the disk in full.
 */
export async function removeBitmaps(target: SnapshotTarget, select: BitmapSelector): Promise<VmvaultBitmap[]> {
  if ('tag' in select && !TAG_RE.test(select.tag)) {
    throw new VmvaultError('BAD_INPUT', `"${select.tag}" is not a repository tag: a tag is the first 8 hex digits of a repository id, as "vmvault bitmaps list" shows it`);
  }
  if ('name' in select && !select.name.startsWith(BITMAP_PREFIX)) {
    throw new VmvaultError('BAD_INPUT', `"${select.name}" is not a vmvault bitmap (their names start with "${BITMAP_PREFIX}"): vmvault removes only its own`);
  }
  if (target.driver === 'libvirt') {
    // libvirt keeps these bitmaps as checkpoints of the domain: removed under it, its checkpoint list would lie.
    throw new VmvaultError('UNSUPPORTED', `VM "${target.vm}" is a libvirt domain: its vmvault bitmaps are libvirt checkpoints. ` +
      `List them with "virsh checkpoint-list ${target.vm}" and remove one with "virsh checkpoint-delete ${target.vm} NAME", which removes its bitmaps too`);
  }
  return withSnapshotDriver(target, async (driver) => {
    const perDisk = await driver.bitmaps();
    const all = described(target, perDisk);
    const picked = (b: VmvaultBitmap) => ('tag' in select ? b.tag === select.tag : b.name === select.name);
    const chosen = all.filter(picked);
    if (chosen.length === 0) {
      const what = 'tag' in select ? `of repository tag ${select.tag}` : `named ${select.name}`;
      throw new NotFoundError(`no disk of VM "${target.vm}" has a vmvault bitmap ${what}` +
        (all.length ? ` (its disks carry: ${summary(all)})` : ' (its disks carry no vmvault bitmap)'));
    }
    // By disk index, not name: one backup gives every disk of a VM the same bitmap name.
    for (const [i, bitmaps] of perDisk.entries()) {
      for (const b of bitmaps) if (picked({ disk: target.disks[i]!.name, ...b, ...parseBitmapName(b.name) })) await driver.removeBitmap(i, b.name);
    }
    return chosen;
  });
}

/** "tag 1a2b3c4d on root, data; vmvault-<backup id> (no tag) on root": what remove can be given. */
export function summary(bitmaps: VmvaultBitmap[]): string {
  const by = new Map<string, Set<string>>();
  for (const b of bitmaps) {
    const k = b.tag ? `tag ${b.tag}` : `${b.name} (no tag)`;
    by.set(k, (by.get(k) ?? new Set()).add(b.disk));
  }
  return [...by].map(([k, disks]) => `${k} on ${[...disks].join(', ')}`).join('; ');
}

function described(target: SnapshotTarget, perDisk: DiskBitmap[][]): VmvaultBitmap[] {
  return perDisk.flatMap((bitmaps, i) => bitmaps.map((b) => ({ disk: target.disks[i]!.name, ...b, ...parseBitmapName(b.name) })));
}


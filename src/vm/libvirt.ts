/**
 * The `libvirt` driver, used where `virsh` is present: the domain's XML is stored
 * with the backup as `<vm>.xml`, its disks come from `virsh domblklist --details`
 * (unless the inventory lists them), and the point in time depends on its state:
 *
 * - shut off: the offline image driver (internal qcow2 snapshot or the file itself,
 *   with its qemu-img dirty bitmaps);
 * - running or paused: libvirt's own pull-mode backup with a checkpoint
 *   (src/vm/libvirt-backup.ts): libvirt owns the VM's monitor and its picture of each
 *   disk, so everything goes through virsh, never raw QMP behind its back.
 *
 * Older versions froze running domains with external overlays: a disk whose active
 * source is still a `<image>.vmvault-overlay-<id>.qcow2` (a killed run's) is
 * committed back first (`blockcommit --active --pivot`).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NotFoundError, VmvaultError, errorMessage } from '../errors.js';
import { virsh, VirshTimeout } from './virsh.js';
export { virshAvailable } from './virsh.js';
import { inspectDisks, type BackupDisk } from '../pipeline/backup.js';
import { diskNameFromPath } from '../pipeline/names.js';
import type { Repository } from '../repo/repository.js';
import type { Warn } from './guest-agent.js';
import { retryIfOrphansHeld } from '../disk/qemu-nbd.js';
import { freezeImages, freezeOptions } from './image-driver.js';
import { openRunningDomain } from './libvirt-backup.js';
import { auditPolicy, combineFailures, stderrWarn, type PointInTime, type PointInTimeTarget } from './point-in-time.js';
import { isOverlayFile, OVERLAY_MARK } from './qemu-blocks.js';
import { libvirtDisks } from '../pipeline/libvirt-xml.js';
import { isImageFormat } from '../disk/image-format.js';

export interface DomblkEntry { type: string; device: string; target: string; source: string }

/** Parses `virsh domblklist DOMAIN --details` (Type, Device, Target, Source columns; `-` for no source). */
export function parseDomblklist(out: string): DomblkEntry[] {
  const rows: DomblkEntry[] = [];
  for (const line of out.split('\n')) {
    const m = /^\s*(\S+)\s+(\S+)\s+(\S+)\s+(.+?)\s*$/.exec(line);
    if (!m || /^-+$/.test(m[1]!) || m[1] === 'Type') continue;
    rows.push({ type: m[1]!, device: m[2]!, target: m[3]!, source: m[4]! });
  }
  return rows;
}

/** The image disks of a domain: file or block sources of disk devices (not cdroms, floppies or empty drives). */
export function imageDisks(entries: DomblkEntry[]): DomblkEntry[] {
  return entries.filter((e) => e.device === 'disk' && (e.type === 'file' || e.type === 'block') && e.source !== '-');
}

/** Freezes a libvirt domain's disks and captures its XML; see the file comment for how. */
export async function openLibvirt(repo: Repository, target: PointInTimeTarget, backupId: string): Promise<PointInTime> {
  const warn = target.warn ?? stderrWarn;
  const domain = target.domain ?? target.vm;
  const xml = await virsh(['dumpxml', '--inactive', domain], domain);
  const entries = parseDomblklist(await virsh(['domblklist', domain, '--details'], domain));
  const state = (await virsh(['domstate', domain], domain)).trim();
  const running = state === 'running' || state === 'paused';
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'vmvault-libvirt-'));
  const removeTmp = () => fs.rm(tmp, { recursive: true, force: true });
  try {
    const xmlFile = path.join(tmp, `${target.vm}.xml`);
    await fs.writeFile(xmlFile, xml);
    const listed: BackupDisk[] = target.disks.length ? target.disks : imageDisks(entries).map((e) => ({ path: baseOf(e.source), name: diskNameFromPath(baseOf(e.source)) }));
    if (listed.length === 0) throw new VmvaultError('BAD_INPUT', `libvirt domain "${domain}" has no file or block disk to back up`);
    // Each disk's format is the domain's `<driver type=…>` unless the inventory states it.
    const declared = libvirtDisks(xml);
    const disks = listed.map((d) => {
      const format = d.format ?? declared.find((x) => x.path === d.path || baseOf(x.path) === d.path)?.format;
      return format !== undefined && isImageFormat(format) ? { ...d, format } : d;
    });
    const pit = running
      ? await freezeRunningDomain(repo, target, backupId, disks, domain, entries, warn)
      // A disk locked by a qemu-nbd that a killed vmvault left behind is freed, and all is tried again (as openImages does).
      : { ...(await retryIfOrphansHeld(async () => freezeImages(await inspectDisks(repo, target.vm, disks), freezeOptions(repo, target, backupId, warn)))), details: { running: false, guestFrozen: false } };
    let closing: Promise<void> | undefined;
    return {
      ...pit, configFiles: [xmlFile],
      close: (committed) => (closing ??= pit.close(committed).finally(removeTmp)),
    };
  } catch (err) {
    await removeTmp();
    throw err;
  }
}

/** The image under a vmvault overlay, or the source itself. */
function baseOf(source: string): string {
  const i = source.indexOf(OVERLAY_MARK);
  return isOverlayFile(source) && i > 0 ? source.slice(0, i) : source;
}

/**
 * A running domain: overlays a killed run of an older vmvault left are merged back
 * first, then libvirt's pull-mode backup with a checkpoint (src/vm/libvirt-backup.ts).
 */
async function freezeRunningDomain(repo: Repository, target: PointInTimeTarget, backupId: string, disks: BackupDisk[], domain: string, entries: DomblkEntry[], warn: Warn): Promise<PointInTime> {
  const attached = disks.map((d) => {
    const e = entries.find((x) => x.source === d.path || baseOf(x.source) === d.path);
    if (!e) throw new NotFoundError(`disk ${d.path} is not attached to libvirt domain "${domain}" (attached: ${entries.map((x) => `${x.target}: ${x.source}`).join(', ')}): fix the VM's disks in the inventory`);
    if (d.format === undefined) throw new VmvaultError('BAD_INPUT', `disk ${d.path} of libvirt domain "${domain}" has no <driver type> in the domain and none in the inventory: state its format`);
    return { ...d, format: d.format, target: e.target, leftover: isOverlayFile(e.source) ? e.source : undefined };
  });
  let recovered = 0;
  for (const t of attached.filter((x) => x.leftover)) {
    warn(`recovering from an earlier run that stopped before merging overlay ${t.leftover} into ${t.path}`, { domain, target: t.target });
    await commit(domain, t.target, t.leftover!);
    recovered++;
  }
  const pit = await openRunningDomain(repo, {
    vm: target.vm, domain, disks: attached.map(({ leftover: _, ...d }) => d), backupId, fullRead: target.fullRead ?? false,
    audit: auditPolicy(target), scratchDir: target.overlayDir, warn,
  });
  return { ...pit, details: { ...pit.details, recovered } };
}

/** Active commit of `overlay` into its base, pivot, then delete the overlay. */
async function commit(domain: string, target: string, overlay: string): Promise<void> {
  try {
    await virsh(['blockcommit', domain, target, '--active', '--pivot', '--wait'], domain);
  } catch (err) {
    // Stopped for its bound, virsh leaves the commit job in libvirt, waiting for a pivot no
    // one will ask for; another blockcommit on that disk is refused while it exists.
    const next = err instanceof VirshTimeout
      ? `The merge may still be under way in libvirt: see "virsh blockjob ${domain} ${target} --info"; once it is ready (100 %), finish it with ` +
        `"virsh blockjob ${domain} ${target} --pivot" and delete ${overlay}, or cancel it with "virsh blockjob ${domain} ${target} --abort", after which the next backup merges again.`
      : 'The next backup tries again.';
    throw new VmvaultError('QEMU', `could not merge overlay ${overlay} back (domain "${domain}", disk ${target}): ${errorMessage(err)}. ` +
      `The VM keeps running on the overlay, which holds its newest writes: do not delete it before the merge is done. ${next}`, { cause: err });
  }
  await fs.rm(overlay, { force: true });
}

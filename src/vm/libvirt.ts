/**
 * The `libvirt` driver, used where `virsh` is present: the domain's XML is stored
 * with the backup as `<vm>.xml`, its disks come from `virsh domblklist --details`
 * (unless the inventory lists them), and the point in time depends on its state:
 *
 * - shut off: the offline image driver (internal qcow2 snapshot or the file itself);
 * - running or paused: the same overlay scheme as the qemu driver (src/vm/live.ts),
 *   but asked of libvirt: `snapshot-create-as --disk-only --atomic --no-metadata`
 *   (one transaction for all disks; `--quiesce` when the guest agent answers) and
 *   `blockcommit --active --pivot --wait`. libvirt owns the VM's QMP monitor and
 *   keeps its own picture of each disk's backing chain: block jobs sent as raw QMP
 *   behind its back (qemu-monitor-command) would leave that picture wrong, so they
 *   go through virsh.
 *
 * Leftovers of a killed run are recognised as in the qemu driver: a disk whose active
 * source is a `<image>.vmvault-overlay-<id>.qcow2` is committed back first.
 */
import { execa } from 'execa';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NotFoundError, VmvaultError, errorMessage } from '../errors.js';
import { inspectDisks, type BackupDisk } from '../pipeline/backup.js';
import { diskNameFromPath } from '../pipeline/names.js';
import type { Repository } from '../repo/repository.js';
import type { Warn } from './guest-agent.js';
import { freezeImages } from './image-driver.js';
import { readInFull } from './change-tracking.js';
import { auditPolicy, combineFailures, stderrWarn, type PointInTime, type PointInTimeTarget } from './point-in-time.js';
import { isOverlayFile, OVERLAY_MARK, overlayPath } from './qemu-blocks.js';
import { runId } from './overlays.js';
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

let available: Promise<boolean> | undefined;
/** True when `virsh` can be run here. */
export function virshAvailable(): Promise<boolean> {
  available ??= execa('virsh', ['--version'], { reject: false, stdin: 'ignore' }).then((r) => r.exitCode === 0, () => false);
  return available;
}

async function virsh(args: string[], domain: string): Promise<string> {
  const r = await execa('virsh', args, { reject: false, stdin: 'ignore', encoding: 'utf8' });
  if (r.exitCode === undefined) {
    throw new VmvaultError('UNSUPPORTED', `the libvirt driver needs virsh, which ${(r.cause as NodeJS.ErrnoException | undefined)?.code === 'ENOENT' ? 'is not installed (install libvirt-clients)' : `could not be run: ${r.shortMessage}`}`);
  }
  if (r.exitCode !== 0) {
    const said = r.stderr.trim().replace(/\s+/g, ' ');
    if (/failed to get domain|Domain not found/i.test(said)) throw new NotFoundError(`libvirt has no domain "${domain}" (virsh: ${said}): check the VM's name in the inventory`);
    throw new VmvaultError('QEMU', `virsh ${args[0]} on domain "${domain}" failed: ${said || `exit ${r.exitCode}`}`);
  }
  return r.stdout;
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
      ? await freezeRunningDomain(repo, target.vm, disks, domain, entries, target.overlayDir, warn)
      : { ...(await freezeImages(await inspectDisks(repo, target.vm, disks), { ...auditPolicy(target), backupId, fullRead: target.fullRead ?? false, warn })), details: { running: false, guestFrozen: false } };
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

async function freezeRunningDomain(
  repo: Repository, vm: string, disks: BackupDisk[], domain: string, entries: DomblkEntry[], overlayDir: string | undefined, warn: Warn,
): Promise<PointInTime> {
  const targets = disks.map((d) => {
    const e = entries.find((x) => x.source === d.path || baseOf(x.source) === d.path);
    if (!e) throw new NotFoundError(`disk ${d.path} is not attached to libvirt domain "${domain}" (attached: ${entries.map((x) => `${x.target}: ${x.source}`).join(', ')}): fix the VM's disks in the inventory`);
    return { path: d.path, target: e.target, leftover: isOverlayFile(e.source) ? e.source : undefined };
  });
  for (const t of targets.filter((x) => x.leftover)) {
    warn(`recovering from an earlier run that stopped before merging overlay ${t.leftover} into ${t.path}`, { domain, target: t.target });
    await commit(domain, t.target, t.leftover!);
  }
  const id = runId();
  const overlays = targets.map((t) => ({ ...t, file: overlayPath(t.path, id, overlayDir) }));
  const specs = entries.filter((e) => e.device === 'disk').flatMap((e) => {
    const o = overlays.find((x) => x.target === e.target);
    return ['--diskspec', o ? `${e.target},snapshot=external,file=${o.file}` : `${e.target},snapshot=no`];
  });
  const create = (quiesce: boolean) => virsh(['snapshot-create-as', domain, '--name', `vmvault-${id}`, '--disk-only', '--atomic', '--no-metadata', ...(quiesce ? ['--quiesce'] : []), ...specs], domain);
  let guestFrozen = true;
  try {
    await create(true);
  } catch (err) {
    guestFrozen = false;
    warn(`guest filesystems could not be frozen through libvirt: backing up crash-consistent (${errorMessage(err)})`, { domain });
    await create(false);
  }
  const close = async () => {
    const errors: unknown[] = [];
    for (const o of overlays) await commit(domain, o.target, o.file).catch((err: unknown) => errors.push(err));
    if (errors.length > 0) throw errors[0];
  };
  try {
    return {
      disks: (await inspectDisks(repo, vm, disks)).map(readInFull), consistency: guestFrozen ? 'application' : 'crash', configFiles: [],
      details: { running: true, guestFrozen, recovered: targets.filter((x) => x.leftover).length }, close,
    };
  } catch (err) {
    try {
      await close();
    } catch (closeErr) {
      throw combineFailures(err, closeErr);
    }
    throw err;
  }
}

/** Active commit of `overlay` into its base, pivot, then delete the overlay. */
async function commit(domain: string, target: string, overlay: string): Promise<void> {
  try {
    await virsh(['blockcommit', domain, target, '--active', '--pivot', '--wait'], domain);
  } catch (err) {
    throw new VmvaultError('QEMU', `could not merge overlay ${overlay} back (domain "${domain}", disk ${target}): ${errorMessage(err)}. ` +
      'The VM keeps running on the overlay, which holds its newest writes: do not delete it. The next backup tries again.', { cause: err });
  }
  await fs.rm(overlay, { force: true });
}

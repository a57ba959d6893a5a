/**
 * A running libvirt domain's point in time, taken the way libvirt takes backups:
 * one pull-mode `virsh backup-begin` with a checkpoint (DESIGN.md, data path steps 1
 * and 2). libvirt owns the VM's monitor, so everything goes through virsh, and the
 * domain is never tainted by raw monitor commands.
 *
 * - The instant: libvirt starts a backup job over all disks at once (QEMU's
 *   copy-before-write into a scratch file per disk) and serves each disk at that
 *   instant on an NBD server, on a unix socket in a private directory. The pipeline
 *   reads those exports; the guest keeps running and writing.
 * - Changed blocks: the same command creates checkpoint `vmvault-<backup id>` (a
 *   persistent dirty bitmap in every qcow2 image, added in the same transaction as the
 *   instant). A disk whose previous backup left checkpoint P is exported with
 *   `backupmode='incremental' incremental='P'`, and libvirt serves P's changes as the
 *   `qemu:dirty-bitmap:backup-<disk>` context.
 * - Rotation: once the backup is saved every other vmvault checkpoint goes; a failed
 *   or killed backup keeps the previous one (libvirt's checkpoints each count from
 *   their own instant, so deleting one never changes another).
 * - Any doubt means a full read of that disk with its reason: no earlier backup,
 *   resize, raw disk, no libvirt checkpoint P (e.g. the domain was backed up while shut
 *   off, by the image driver), and libvirt refusing P ("missing or broken bitmap", the
 *   state a persistent bitmap is in after QEMU was killed): that disk is then exported
 *   in full and the others stay incremental.
 * - A run killed mid-backup leaves its job in libvirt (its socket path names it as
 *   ours): the next run aborts it first. Someone else's backup job is not touched;
 *   the backup then fails saying so.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NbdClient } from '../disk/nbd.js';
import type { ImageFormat } from '../disk/image-format.js';
import { errorMessage, VmvaultError } from '../errors.js';
import { nameDisks, type BackupDisk, type ChangedBlocks, type FileStamp, type FrozenDisk, type NamedDisk } from '../pipeline/backup.js';
import { libvirtDisks } from '../pipeline/libvirt-xml.js';
import type { Repository } from '../repo/repository.js';
import { bitmapName, chainStamps, decide, ownBitmap, tracked, withAudit, type AuditPolicy, type Decision } from './change-tracking.js';
import type { Warn } from './guest-agent.js';
import type { PointInTime } from './point-in-time.js';
import { virsh, VirshTimeout } from './virsh.js';

const SOCKET_DIR_PREFIX = 'vmvault-libvirt-backup-';

/** A disk of the running domain: the inventory's view plus libvirt's target and format. */
export interface DomainDisk extends BackupDisk { target: string; format: ImageFormat }

export interface RunningDomainOptions {
  vm: string;
  domain: string;
  disks: DomainDisk[];
  backupId: string;
  fullRead: boolean;
  audit: AuditPolicy;
  /** Where the scratch files go (default: next to each image). */
  scratchDir?: string | undefined;
  warn: Warn;
}

interface Planned { named: NamedDisk; disk: DomainDisk; decision: Decision; scratch: string; stamps: FileStamp[] | undefined }

/**
 * How a running domain's disk can be read, from its previous backup and the domain's
 * checkpoints. Pure: the same rules as every other driver (src/vm/change-tracking.ts).
 */
export function decideDomainDisk(d: NamedDisk, checkpoints: readonly string[], fullRead: boolean, chainStamps?: FileStamp[]): Decision {
  if (fullRead) return { mode: 'full', reason: 'a full read was asked for' };
  if (d.format !== 'qcow2') return { mode: 'full', reason: `${d.format} disks of a running libvirt domain are read in full: only a qcow2 image can hold a dirty bitmap` };
  const p = d.previous?.entry.bitmap;
  if (d.previous && p && !checkpoints.includes(p)) {
    return { mode: 'full', reason: `libvirt has no checkpoint ${p} for backup ${d.previous.backupId.slice(0, 12)} (was the domain backed up while shut off, or the checkpoint deleted?)` };
  }
  const decision = decide({ ...d, bitmaps: checkpoints.map((name) => ({ name, flags: ['auto'] })) }, chainStamps ? { chainStamps } : {});
  return decision.since ? { ...decision, reason: `changes since backup ${d.previous!.backupId.slice(0, 12)} (libvirt checkpoint ${decision.since})` } : decision;
}

/** The domain's vmvault checkpoints. */
async function checkpoints(domain: string, repoId: string): Promise<string[]> {
  return (await virsh(['checkpoint-list', domain, '--name'], domain)).split('\n').map((l) => l.trim()).filter((n) => ownBitmap(repoId, n));
}

/** Aborts a backup job a killed run of ours left in the domain; someone else's is refused. */
async function abortLeftoverJob(domain: string, warn: Warn): Promise<void> {
  const info = await virsh(['domjobinfo', domain], domain);
  if (!/Operation:\s+Backup/.test(info)) return;
  const xml = await virsh(['backup-dumpxml', domain], domain).catch(() => '');
  if (!xml.includes(SOCKET_DIR_PREFIX)) {
    throw new VmvaultError('QEMU', `libvirt domain "${domain}" already runs a backup job that vmvault did not start: wait for it to end (virsh domjobinfo ${domain}) and try again`, { retriable: true });
  }
  warn('aborting the libvirt backup job an earlier run left in the domain', { domain });
  await virsh(['domjobabort', domain], domain);
  const socket = /<server\b[^>]*\bsocket='([^']+)'/.exec(xml)?.[1];
  if (socket && path.basename(path.dirname(socket)).startsWith(SOCKET_DIR_PREFIX)) await fs.rm(path.dirname(socket), { recursive: true, force: true });
}

/** The virtual size libvirt reports for a disk (virsh domblkinfo's Capacity). */
async function capacity(domain: string, target: string): Promise<number> {
  const m = /Capacity:\s+(\d+)/.exec(await virsh(['domblkinfo', domain, target], domain));
  if (!m) throw new VmvaultError('QEMU', `virsh domblkinfo printed no capacity for disk ${target} of domain "${domain}"`);
  return Number(m[1]);
}

function backupXml(socket: string, plans: Planned[], others: string[]): string {
  const disks = plans.map((p) => {
    const mode = p.decision.since ? `backupmode='incremental' incremental='${p.decision.since}'` : `backupmode='full'`;
    return `<disk name='${p.disk.target}' backup='yes' type='file' ${mode}><driver type='qcow2'/><scratch file='${xmlAttr(p.scratch)}'/></disk>`;
  });
  return `<domainbackup mode='pull'><server transport='unix' socket='${xmlAttr(socket)}'/><disks>${disks.join('')}${others.map((t) => `<disk name='${t}' backup='no'/>`).join('')}</disks></domainbackup>`;
}

function checkpointXml(name: string, plans: Planned[], others: string[]): string {
  const disks = [...plans.map((p) => `<disk name='${p.disk.target}' checkpoint='${p.named.format === 'qcow2' ? 'bitmap' : 'no'}'/>`), ...others.map((t) => `<disk name='${t}' checkpoint='no'/>`)];
  return `<domaincheckpoint><name>${name}</name><disks>${disks.join('')}</disks></domaincheckpoint>`;
}

function xmlAttr(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/</g, '&lt;');
}

/** Each backed-up disk's export and bitmap names, from `virsh backup-dumpxml`. */
function exportsOf(xml: string): Map<string, { exportName: string; bitmap?: string }> {
  const out = new Map<string, { exportName: string; bitmap?: string }>();
  for (const tag of xml.match(/<disk\b[^>]*>/g) ?? []) {
    const attr = (n: string) => new RegExp(`\\b${n}='([^']*)'`).exec(tag)?.[1];
    const name = attr('name');
    if (!name || attr('backup') !== 'yes') continue;
    const bitmap = attr('exportbitmap');
    out.set(name, { exportName: attr('exportname') ?? name, ...(bitmap ? { bitmap } : {}) });
  }
  return out;
}

/**
 * Starts the backup job: with the checkpoint, and incremental where decided. A disk
 * libvirt names when it refuses is exported in full instead, with libvirt's words as
 * the reason; an image that cannot hold a bitmap makes the job start without a checkpoint.
 */
async function begin(domain: string, dir: string, socket: string, plans: Planned[], others: string[], checkpoint: string, warn: Warn): Promise<boolean> {
  let withCheckpoint = plans.some((p) => p.named.format === 'qcow2');
  for (let attempt = 0; attempt <= plans.length + 1; attempt++) {
    const bx = path.join(dir, 'backup.xml');
    const cx = path.join(dir, 'checkpoint.xml');
    await fs.writeFile(bx, backupXml(socket, plans, others));
    if (withCheckpoint) await fs.writeFile(cx, checkpointXml(checkpoint, plans, others));
    try {
      await virsh(['backup-begin', domain, bx, ...(withCheckpoint ? [cx] : [])], domain);
      return withCheckpoint;
    } catch (err) {
      // libvirt may have started the job after all: trying again would meet it.
      if (err instanceof VirshTimeout) throw err;
      const said = errorMessage(err);
      const named = plans.find((p) => p.decision.since && new RegExp(`\\b(${p.disk.target}|${p.decision.since})\\b`).test(said));
      const incremental = plans.filter((p) => p.decision.since);
      if (named || incremental.length > 0) {
        for (const p of named ? [named] : incremental) {
          p.decision = { mode: 'full', reason: `libvirt refused to read checkpoint ${p.decision.since} (${said.replace(/^virsh backup-begin on domain "[^"]*" failed: /, '')})` };
        }
        continue;
      }
      if (withCheckpoint) {
        warn(`libvirt refused to create checkpoint ${checkpoint} (${said}): backing up without one; the next backup reads these disks in full`, { domain });
        withCheckpoint = false;
        continue;
      }
      throw err;
    }
  }
  throw new VmvaultError('QEMU', `libvirt did not start a backup job for domain "${domain}"`);
}

/**
 * Freezes a running domain's disks at one instant with a pull-mode backup job and a
 * checkpoint; see the file comment. `close(committed)` ends the job and rotates the
 * checkpoints, and never throws for a checkpoint it could not delete (the next run does).
 */
export async function openRunningDomain(repo: Repository, o: RunningDomainOptions): Promise<PointInTime & { guestFrozen: boolean }> {
  const { domain, warn } = o;
  await abortLeftoverJob(domain, warn);
  const existing = await checkpoints(domain, repo.id);
  // The chain libvirt found below each disk (a linked clone's template): its bitmap counts writes to the disk only.
  const live = libvirtDisks(await virsh(['dumpxml', domain], domain));
  const plans: Planned[] = [];
  for (const { disk, name, previous } of await nameDisks(repo, o.vm, o.disks)) {
    const d = disk as DomainDisk;
    // libvirt opened the image with the domain's configured format and owns its chain:
    // vmvault reads only what libvirt exports, and never opens the image itself.
    const named: NamedDisk = {
      path: path.resolve(d.path), format: d.format, virtualSize: await capacity(domain, d.target), actualSize: 0,
      references: [], snapshots: [], bitmaps: [], formatSource: 'declared', chain: [], name, ...(previous ? { previous } : {}),
      below: (live.find((x) => x.target === d.target)?.backing ?? []).map((f) => path.resolve(f)),
    };
    // A file that cannot be looked at (another host's path, a protocol libvirt reads) proves nothing: a full read.
    const stamps = await chainStamps(named).catch(() => undefined);
    const scratch = path.join(o.scratchDir ?? path.dirname(named.path), `${path.basename(named.path)}.vmvault-scratch-${d.target}-${o.backupId.slice(0, 12)}.qcow2`);
    plans.push({ named, disk: d, decision: withAudit(named, decideDomainDisk(named, existing, o.fullRead, stamps), o.audit), scratch, stamps });
  }
  const others = (await virsh(['domblklist', domain, '--details'], domain)).split('\n')
    .map((l) => /^\s*\S+\s+disk\s+(\S+)\s/.exec(l)?.[1]).filter((t): t is string => !!t && !o.disks.some((d) => d.target === t));

  // A private directory for the NBD socket, owned by the user QEMU runs as (the owner of the image it has open).
  const dir = await fs.mkdtemp(path.join(os.tmpdir().length <= 60 ? os.tmpdir() : '/tmp', SOCKET_DIR_PREFIX));
  const owner = await fs.stat(plans[0]!.named.path);
  // Not root (a user of libvirt's group): QEMU runs as this user too, or the socket cannot be made anyway.
  await fs.chown(dir, owner.uid, owner.gid).catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') throw err;
  });
  const socket = path.join(dir, 'nbd.sock');
  const checkpoint = bitmapName(repo.id, o.backupId);
  const clients: NbdClient[] = [];
  let started = false;
  let withCheckpoint = false;

  const close = async (committed: boolean): Promise<void> => {
    for (const c of clients.splice(0)) await c.close().catch(() => {});
    if (started) {
      await virsh(['domjobabort', domain], domain).catch((err: unknown) => {
        // The job may already be gone (QEMU exited); anything else is said.
        if (!/no job is active|not active/i.test(errorMessage(err))) warn(`could not end libvirt's backup job (${errorMessage(err)}): the next backup ends it`, { domain });
      });
      started = false;
    }
    for (const p of plans) await fs.rm(p.scratch, { force: true }).catch(() => {});
    await fs.rm(dir, { recursive: true, force: true });
    if (withCheckpoint) await rotate(domain, repo.id, committed ? checkpoint : undefined, committed ? undefined : checkpoint, warn);
  };

  try {
    let guestFrozen = false;
    try {
      await virsh(['domfsfreeze', domain], domain);
      guestFrozen = true;
    } catch (err) {
      warn(`guest filesystems could not be frozen through libvirt: backing up crash-consistent (${errorMessage(err)})`, { domain });
      // The agent may still freeze the guest after virsh was stopped: a guest left frozen stops writing.
      if (err instanceof VirshTimeout) await virsh(['domfsthaw', domain], domain).catch(() => {});
    }
    try {
      withCheckpoint = await begin(domain, dir, socket, plans, others, checkpoint, warn);
      started = true;
    } catch (err) {
      // A backup-begin stopped for its bound may have started the job: close aborts it (or finds none).
      if (err instanceof VirshTimeout) started = true;
      throw err;
    } finally {
      if (guestFrozen) await virsh(['domfsthaw', domain], domain).catch((err: unknown) => warn(`could not thaw the guest's filesystems (${errorMessage(err)})`, { domain }));
    }
    const exported = exportsOf(await virsh(['backup-dumpxml', domain], domain));
    const disks: FrozenDisk[] = [];
    for (const p of plans) {
      const e = exported.get(p.disk.target);
      if (!e) throw new VmvaultError('QEMU', `libvirt's backup job of domain "${domain}" does not export disk ${p.disk.target}`);
      let changes: ChangedBlocks | undefined;
      if (p.decision.since) {
        try {
          if (!e.bitmap) throw new VmvaultError('QEMU', 'libvirt exported no bitmap');
          const client = await NbdClient.connect(socket, { exportName: e.exportName, metaContext: `qemu:dirty-bitmap:${e.bitmap}` });
          clients.push(client);
          await client.dirtyExtents(0, Math.min(p.named.virtualSize, 65536));
          changes = { previous: p.named.previous!.entry.chunks, dirty: (off, len) => client.dirtyExtents(off, len) };
        } catch (err) {
          p.decision = { mode: 'full', reason: `checkpoint ${p.decision.since} could not be read through libvirt's NBD export: ${errorMessage(err)}` };
        }
      }
      disks.push(tracked(p.named, p.decision, changes, {
        ...(p.stamps ? { chainStamps: p.stamps } : {}),
        connect: () => NbdClient.connect(socket, { exportName: e.exportName }), ...(withCheckpoint && p.named.format === 'qcow2' ? { bitmap: checkpoint } : {}),
      }));
    }
    let closing: Promise<void> | undefined;
    return {
      disks, consistency: guestFrozen ? 'application' : 'crash', configFiles: [], guestFrozen,
      details: { running: true, guestFrozen }, close: (committed) => (closing ??= close(committed)),
    };
  } catch (err) {
    await close(false);
    throw err;
  }
}

/** Keeps `keep` (or, with `drop`, everything but it): vmvault checkpoints other than the one counting for the next backup go. */
async function rotate(domain: string, repoId: string, keep: string | undefined, drop: string | undefined, warn: Warn): Promise<void> {
  let names: string[];
  try {
    names = await checkpoints(domain, repoId);
  } catch (err) {
    warn(`could not list the domain's checkpoints (${errorMessage(err)}): the next backup removes those it no longer needs`, { domain });
    return;
  }
  for (const name of names.filter((n) => (keep !== undefined ? n !== keep : n === drop))) {
    try {
      await virsh(['checkpoint-delete', domain, name], domain);
    } catch (err) {
      // A checkpoint whose bitmap is gone (removed while the domain was shut off) can only lose its metadata.
      await virsh(['checkpoint-delete', domain, name, '--metadata'], domain).catch(() =>
        warn(`could not delete checkpoint ${name} (${errorMessage(err)}): the next backup tries again`, { domain }));
    }
  }
}

/**
 * On-demand snapshots of a VM (typically before an update): create, list, revert,
 * delete, and the expiry sweep. A snapshot covers every disk of the VM under one
 * name: qcow2 internal snapshots, taken with qemu-img when the VM is stopped and by
 * the VM's QEMU over QMP when it runs (snapshot-drivers.ts). Labels, expiry and the
 * exported backup are kept in the host's state directory (snapshot-store.ts).
 *
 * A snapshot is not a backup: it lives on the VM's own disks. `exportBackup` (given
 * by the caller, which owns the repository) turns one into a backup as well.
 */
import { errorMessage, NotFoundError, VmvaultError } from '../errors.js';
import type { InternalSnapshot } from '../disk/qemu.js';
import { vmsOnHost } from '../config/load.js';
import type { Config, VmConfig } from '../config/schema.js';
import { NAME_RE, nameRule } from '../policy/schema.js';
import { isZeroDuration, parseDuration, shiftByDuration } from '../policy/retention.js';
import { withSnapshotDriver, type SnapshotDriver, type SnapshotTarget } from './snapshot-drivers.js';
import { readSnapshotMeta, withVmSnapshotLock, writeSnapshotMeta, type SnapshotMeta } from './snapshot-store.js';

export type { SnapshotTarget } from './snapshot-drivers.js';

/**
 * Internal snapshots whose names start with this are a backup's own temporary ones
 * (pipeline/backup.ts SNAPSHOT_PREFIX; a test keeps the two equal): never listed,
 * and refused as names of on-demand snapshots.
 */
export const RESERVED_SNAPSHOT_PREFIX = 'vmvault-';

/** The label an on-demand snapshot (and its exported backup) gets when none is given. */
export const DEFAULT_SNAPSHOT_LABEL = 'pre-update';

export interface SnapshotInfo {
  vm: string;
  name: string;
  label?: string;
  /** ISO-8601: when the snapshot was taken. */
  created: string;
  expiresAt?: string;
  /** The backup `--export` made of it. */
  backup?: string;
  /** True when the VM's RAM was saved too (taken of a running VM). */
  vmState: boolean;
  /** Disks holding it; `missingDisks` lists those that do not (a partial snapshot cannot be reverted). */
  disks: string[];
  missingDisks: string[];
}

export interface SnapshotOptions {
  /** The host's state directory (config.stateDir), where labels and expiry are kept. */
  stateDir: string;
  /** The clock (tests set it). */
  now?: () => Date;
}

export interface CreateSnapshotRequest {
  name: string;
  label?: string;
  /** A duration in the policies' syntax (`7d`, `12h`, `1m` = a month). */
  expireIn?: string;
  /** Called after the snapshot exists, to back the VM up labelled `label`; returns the backup id. */
  exportBackup?: (label: string) => Promise<string>;
}

/** The snapshot fields of an inventory VM. */
export function snapshotTargetOf(vm: VmConfig): SnapshotTarget {
  return {
    vm: vm.name, driver: vm.driver,
    disks: vm.disks.map((d) => ({ path: d.path, name: d.name, ...(d.format ? { format: d.format } : {}), ...(d.allowChain ? { allowChain: true } : {}) })),
    ...(vm.qmpSocket ? { qmpSocket: vm.qmpSocket } : {}),
    ...(vm.guestAgentSocket ? { guestAgentSocket: vm.guestAgentSocket } : {}),
  };
}

/** The inventory VM named `name`; NotFoundError naming the known ones. */
export function findVm(config: Pick<Config, 'vms'>, name: string): VmConfig {
  const vm = config.vms.find((v) => v.name === name);
  if (!vm) {
    const known = config.vms.map((v) => v.name);
    throw new NotFoundError(`unknown VM "${name}": the inventory has ${known.length ? known.map((k) => `"${k}"`).join(', ') : 'no VMs'}`);
  }
  return vm;
}

/** Throws BAD_INPUT unless `name` can name an on-demand snapshot. */
export function assertSnapshotName(name: string): void {
  if (!NAME_RE.test(name)) throw new VmvaultError('BAD_INPUT', `"${name}" is not a valid snapshot name: a snapshot name is ${nameRule}`);
  // qemu-img and QMP accept an id where a name is expected: an all-digit name could hit another snapshot's id.
  if (/^\d+$/.test(name)) throw new VmvaultError('BAD_INPUT', `"${name}" is not a valid snapshot name: it must not be only digits (qemu would take it for a snapshot id)`);
  if (name.toLowerCase().startsWith(RESERVED_SNAPSHOT_PREFIX)) {
    throw new VmvaultError('BAD_INPUT', `"${name}" is not a valid snapshot name: names starting with "${RESERVED_SNAPSHOT_PREFIX}" are reserved for the temporary snapshots of backups`);
  }
}

/**
 * When a snapshot taken at `now` with `--expire-in expireIn` expires (calendar arithmetic
 * in UTC). `field` names the option as the caller wrote it (`--expire-in` on the command
 * line, `expireIn` in an API request), so the error speaks the caller's language.
 */
export function expiryFrom(expireIn: string, now: Date, field = '--expire-in'): Date {
  let d;
  try {
    d = parseDuration(expireIn);
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `${field}: ${errorMessage(err)}`, { cause: err });
  }
  if (isZeroDuration(d)) throw new VmvaultError('BAD_INPUT', `${field} ${expireIn} is zero: give a positive duration such as 7d, 12h or 30min`);
  return shiftByDuration(now, d, 1);
}

function assertLabel(label: string): void {
  if (!NAME_RE.test(label)) throw new VmvaultError('BAD_INPUT', `"${label}" is not a valid label: a label is ${nameRule}`);
}

/** Merges what the disks hold with the stored metadata; reserved (backup) snapshots are left out. */
function describe(target: SnapshotTarget, perDisk: InternalSnapshot[][], meta: Map<string, SnapshotMeta>): SnapshotInfo[] {
  const byName = new Map<string, { disks: number[]; first: InternalSnapshot; vmState: boolean }>();
  perDisk.forEach((snaps, i) => {
    for (const s of snaps) {
      if (s.name.startsWith(RESERVED_SNAPSHOT_PREFIX)) continue;
      const e = byName.get(s.name) ?? { disks: [], first: s, vmState: false };
      if (!e.disks.includes(i)) e.disks.push(i);
      e.vmState ||= s.vmStateSize > 0;
      byName.set(s.name, e);
    }
  });
  const out: SnapshotInfo[] = [];
  for (const [name, e] of byName) {
    const m = meta.get(name);
    out.push({
      vm: target.vm, name,
      ...(m?.label ? { label: m.label } : {}),
      created: m?.created ?? e.first.date.toISOString(),
      ...(m?.expiresAt ? { expiresAt: m.expiresAt } : {}),
      ...(m?.backup ? { backup: m.backup } : {}),
      vmState: e.vmState,
      disks: e.disks.map((i) => target.disks[i]!.name),
      missingDisks: target.disks.filter((_, i) => !e.disks.includes(i)).map((d) => d.name),
    });
  }
  return out.sort((a, b) => a.created.localeCompare(b.created) || a.name.localeCompare(b.name));
}


/** Snapshots of the VM, oldest first. */
export async function listSnapshots(target: SnapshotTarget, opts: SnapshotOptions): Promise<SnapshotInfo[]> {
  const meta = await readSnapshotMeta(opts.stateDir, target.vm);
  return withSnapshotDriver(target, async (d) => describe(target, await d.list(), meta));
}

/** The current snapshots and metadata, with entries of vanished snapshots dropped. */
async function current(target: SnapshotTarget, d: SnapshotDriver, opts: SnapshotOptions) {
  const meta = await readSnapshotMeta(opts.stateDir, target.vm);
  const list = describe(target, await d.list(), meta);
  for (const name of meta.keys()) if (!list.some((s) => s.name === name)) meta.delete(name);
  return { list, meta };
}

function find(target: SnapshotTarget, list: SnapshotInfo[], name: string): SnapshotInfo {
  const s = list.find((x) => x.name === name);
  if (!s) {
    const have = list.map((x) => `"${x.name}"`).join(', ');
    throw new NotFoundError(`VM "${target.vm}" has no snapshot "${name}" (it has ${have || 'none'}): see vmvault snapshot list ${target.vm}`);
  }
  return s;
}

/**
 * Takes snapshot `name` of every disk of the VM. ALREADY_EXISTS when the name is
 * taken. With `exportBackup`, then backs the VM up labelled like the snapshot; if
 * that fails the snapshot is kept and the error says so.
 */
export async function createSnapshot(target: SnapshotTarget, req: CreateSnapshotRequest, opts: SnapshotOptions): Promise<SnapshotInfo> {
  assertSnapshotName(req.name);
  const label = req.label ?? DEFAULT_SNAPSHOT_LABEL;
  assertLabel(label);
  const now = opts.now?.() ?? new Date();
  const expiresAt = req.expireIn !== undefined ? expiryFrom(req.expireIn, now) : undefined;
  const created = await withVmSnapshotLock(opts.stateDir, target.vm, () => withSnapshotDriver(target, async (d) => {
    const { list, meta } = await current(target, d, opts);
    if (list.some((s) => s.name === req.name)) {
      throw new VmvaultError('ALREADY_EXISTS', `VM "${target.vm}" already has a snapshot "${req.name}": choose another name, or delete it first (vmvault snapshot delete ${target.vm} ${req.name})`);
    }
    await d.create(req.name);
    meta.set(req.name, { label, created: now.toISOString(), ...(expiresAt ? { expiresAt: expiresAt.toISOString() } : {}) });
    await writeSnapshotMeta(opts.stateDir, target.vm, meta);
    return find(target, describe(target, await d.list(), meta), req.name);
  }));
  if (!req.exportBackup) return created;
  let backup: string;
  try {
    backup = await req.exportBackup(label);
  } catch (err) {
    const code = err instanceof VmvaultError ? err.code : 'QEMU';
    throw new VmvaultError(code, `snapshot "${req.name}" of VM "${target.vm}" was created and is kept, but its export to the repository failed: ${errorMessage(err)}`, { cause: err });
  }
  await withVmSnapshotLock(opts.stateDir, target.vm, async () => {
    const meta = await readSnapshotMeta(opts.stateDir, target.vm);
    const m = meta.get(req.name);
    if (m) {
      meta.set(req.name, { ...m, backup });
      await writeSnapshotMeta(opts.stateDir, target.vm, meta);
    }
  });
  return { ...created, backup };
}

/**
 * Reverts every disk of the VM to snapshot `name`. A running VM (qemu driver) is
 * reverted by its QEMU, RAM included; a stopped one with qemu-img, and an image in
 * use is refused with IMAGE_LOCKED before any disk changes. The snapshot is kept.
 */
export async function revertSnapshot(target: SnapshotTarget, name: string, opts: SnapshotOptions): Promise<SnapshotInfo> {
  assertSnapshotName(name);
  return withVmSnapshotLock(opts.stateDir, target.vm, () => withSnapshotDriver(target, async (d) => {
    try {
      const { list } = await current(target, d, opts);
      const s = find(target, list, name);
      if (s.missingDisks.length > 0) {
        throw new VmvaultError('INTEGRITY', `snapshot "${name}" of VM "${target.vm}" is missing on disk(s) ${s.missingDisks.join(', ')}: reverting only some disks would mix two points in time, so nothing was changed`);
      }
      await d.revert(name);
      return s;
    } catch (err) {
      // The offline driver inspects every image before changing any: a lock means a running VM, and nothing changed.
      if (d.kind === 'offline' && err instanceof VmvaultError && err.code === 'IMAGE_LOCKED') {
        throw new VmvaultError('IMAGE_LOCKED',
          `cannot revert VM "${target.vm}" to snapshot "${name}": ${err.message.replace(/ Stop the VM .*$/, '')} Nothing was changed. ` +
          'A running VM is never reverted through qemu-img: stop it first, or give it driver: qemu and its qmpSocket so that its QEMU reverts it.',
          { cause: err });
      }
      throw err;
    }
  }));
}

/** Deletes snapshot `name` from every disk holding it, and its metadata. */
export async function deleteSnapshot(target: SnapshotTarget, name: string, opts: SnapshotOptions): Promise<SnapshotInfo> {
  assertSnapshotName(name);
  return withVmSnapshotLock(opts.stateDir, target.vm, () => withSnapshotDriver(target, async (d) => deleteLocked(target, d, name, opts)));
}

async function deleteLocked(target: SnapshotTarget, d: SnapshotDriver, name: string, opts: SnapshotOptions): Promise<SnapshotInfo> {
  const { list, meta } = await current(target, d, opts);
  const s = find(target, list, name);
  await d.remove(name, s.disks.map((n) => target.disks.findIndex((x) => x.name === n)));
  meta.delete(name);
  await writeSnapshotMeta(opts.stateDir, target.vm, meta);
  return s;
}

export interface ExpiryReport {
  deleted: SnapshotInfo[];
  /** Expired snapshots that could not be deleted now (e.g. the image is in use); the next sweep tries again. */
  failed: { vm: string; name: string; error: string }[];
  /** VMs with expired snapshots left for the next sweep because `exclusive` found them busy. */
  busy: string[];
}

export interface ExpiryOptions {
  /**
   * Runs one VM's deletions under a lock shared with other work on that VM (the
   * service passes the queue's VM lock, so a sweep never runs beside a backup of
   * the same VM); resolves undefined, without calling `fn`, when the VM is busy.
   */
  exclusive?: <T>(vm: string, fn: () => Promise<T>) => Promise<T | undefined>;
}

/**
 * The expiry sweep of one host: deletes every snapshot of the host's VMs whose
 * expiry is at or before `now`, and keeps the others. A VM whose metadata names no
 * expired snapshot is not touched at all (its disks are not even opened).
 */
export async function expireSnapshots(
  config: Pick<Config, 'vms' | 'stateDir'>, host: string, now: Date = new Date(), options: ExpiryOptions = {},
): Promise<ExpiryReport> {
  const report: ExpiryReport = { deleted: [], failed: [], busy: [] };
  const exclusive = options.exclusive ?? (<T>(_vm: string, fn: () => Promise<T>) => fn());
  for (const vm of vmsOnHost(config, host)) {
    let due: string[];
    try {
      due = [...(await readSnapshotMeta(config.stateDir, vm.name))].filter(([, m]) => m.expiresAt && Date.parse(m.expiresAt) <= now.getTime()).map(([n]) => n);
    } catch (err) {
      report.failed.push({ vm: vm.name, name: '*', error: errorMessage(err) });
      continue;
    }
    if (due.length === 0) continue;
    const target = snapshotTargetOf(vm);
    const opts = { stateDir: config.stateDir, now: () => now };
    try {
      const ran = await exclusive(vm.name, () => withVmSnapshotLock(config.stateDir, vm.name, () => withSnapshotDriver(target, async (d) => {
        for (const name of due) {
          try {
            // `due` was read before the lock: the snapshot may have been deleted and taken
            // again under the same name, or given a later expiry, since. Only the
            // metadata read under the lock decides.
            const m = (await readSnapshotMeta(config.stateDir, vm.name)).get(name);
            if (!m?.expiresAt || Date.parse(m.expiresAt) > now.getTime()) continue;
            report.deleted.push(await deleteLocked(target, d, name, opts));
          } catch (err) {
            if (err instanceof NotFoundError && /has no snapshot/.test(err.message)) continue; // Gone already: current() dropped its entry.
            report.failed.push({ vm: vm.name, name, error: errorMessage(err) });
          }
        }
        if (report.failed.some((f) => f.vm === vm.name)) return true; // The disks said why already.
        // Entries of snapshots that vanished by other means (deleted by hand) go too.
        const meta = await readSnapshotMeta(config.stateDir, vm.name);
        const list = describe(target, await d.list(), meta);
        const kept = new Map([...meta].filter(([n]) => list.some((s) => s.name === n)));
        if (kept.size !== meta.size) await writeSnapshotMeta(config.stateDir, vm.name, kept);
        return true;
      })));
      if (ran === undefined) report.busy.push(vm.name);
    } catch (err) {
      for (const name of due) report.failed.push({ vm: vm.name, name, error: errorMessage(err) });
    }
  }
  return report;
}

/**
 * Job payloads, validated with zod at both ends: when enqueued (a bad request fails
 * the caller) and when a worker takes the job (anything else in Redis fails the job
 * as unrecoverable). The job's name says which payload it carries.
 */
import * as z from 'zod';
import { IMAGE_FORMATS, isImageFormat, type ImageFormat } from '../disk/image-format.js';
import { VmvaultError } from '../errors.js';
import { DRIVERS, type VmConfig } from '../config/schema.js';
import { parseSubset } from '../pipeline/subset.js';
import type { Policy } from '../policy/schema.js';
import { durationMs, parseDuration } from '../policy/retention.js';

const nonEmpty = z.string().trim().min(1);
const imageFormat = z.string().refine(isImageFormat, `one of ${IMAGE_FORMATS.join(', ')}`).transform((f) => f as ImageFormat);

export const backupPayloadSchema = z.strictObject({
  vm: nonEmpty,
  /** The VM's disk images; a libvirt VM may leave them out (they then come from virsh domblklist). */
  disks: z.array(z.strictObject({
    path: nonEmpty, name: nonEmpty.optional(),
    /** The inventory's format: always passed to qemu with -f. Absent: detected once by vmvault and pinned. */
    format: imageFormat.optional(),
    allowChain: z.boolean().optional(),
  })).default([]),
  /** Configuration files stored with the backup. */
  configs: z.array(nonEmpty).default([]),
  labels: z.array(nonEmpty).default([]),
  policy: nonEmpty.optional(),
  /** The scheduled slot (ISO-8601) this backup is for; informational, the job id carries deduplication. */
  slot: nonEmpty.optional(),
  /** How the point in time is taken: offline image (when absent), running QEMU over QMP, or a libvirt domain. */
  driver: z.enum(DRIVERS).optional(),
  /** qemu driver: the running QEMU's QMP socket. */
  qmpSocket: nonEmpty.optional(),
  /** qemu driver: the guest agent's socket, for a filesystem freeze at the instant. */
  guestAgentSocket: nonEmpty.optional(),
  /** libvirt driver: the domain's name. */
  libvirtDomain: nonEmpty.optional(),
  /** The policy's `fullReadEvery` (a duration): an audited full read of a disk last read in full longer ago. */
  fullReadEvery: nonEmpty.optional(),
}).superRefine((p, ctx) => {
  if (p.driver !== 'libvirt' && p.disks.length === 0) ctx.addIssue({ code: 'custom', path: ['disks'], message: 'at least one disk is needed' });
  if (p.driver === 'qemu' && p.qmpSocket === undefined) ctx.addIssue({ code: 'custom', path: ['qmpSocket'], message: 'the qemu driver needs the QMP socket of the running VM' });
  if (p.driver === 'libvirt' && p.libvirtDomain === undefined) ctx.addIssue({ code: 'custom', path: ['libvirtDomain'], message: 'the libvirt driver needs the domain name' });
});

export const restorePayloadSchema = z.strictObject({
  /** A backup id or a unique prefix of one. */
  backupId: z.string().regex(/^[0-9a-fA-F]{4,64}$/, 'a backup id (hexadecimal, at least 4 digits)'),
  /** Absolute directory on the worker's host that receives the disks and config files. */
  directory: nonEmpty.refine((d) => d.startsWith('/'), 'an absolute path'),
  format: imageFormat.optional(),
  disks: z.array(nonEmpty).optional(),
  /** Disk name → path inside `directory` (relative to it, or absolute). */
  diskPaths: z.record(nonEmpty, nonEmpty).optional(),
  /** Restore as a new VM of this name (pipeline/restore.ts). */
  name: nonEmpty.optional(),
  overwrite: z.boolean().default(false),
});

export const maintenancePayloadSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('prune'), policy: nonEmpty, vms: z.array(nonEmpty).optional(), dryRun: z.boolean().default(false) }),
  z.strictObject({ kind: z.literal('gc'), dryRun: z.boolean().default(false) }),
  z.strictObject({
    kind: z.literal('verify'),
    readData: z.boolean().default(false),
    /** Read only this subset of the chunks: k/n or p% (pipeline/subset.ts). */
    readDataSubset: nonEmpty.refine(isSubset, 'expected k/n (e.g. 1/7) or a percentage (e.g. 10%)').optional(),
    backups: z.array(nonEmpty).optional(),
  }).refine((p) => !(p.readData && p.readDataSubset), { path: ['readDataSubset'], message: 'readData reads every chunk: leave out readDataSubset or readData' }),
  /** Copies the repository's backups to the worker configuration's maintenance.copy.to (no secret travels in the job). */
  z.strictObject({ kind: z.literal('copy') }),
]);

function isSubset(text: string): boolean {
  try {
    parseSubset(text);
    return true;
  } catch {
    return false;
  }
}

export const SNAPSHOT_OPS = ['create', 'list', 'revert', 'delete'] as const;

/**
 * A snapshot operation on one VM of the worker's host. It carries the VM's
 * inventory fields the worker needs (disks, driver, QMP socket), like a backup
 * payload does, so the worker needs no inventory of its own.
 */
export const snapshotPayloadSchema = z.strictObject({
  op: z.enum(SNAPSHOT_OPS),
  vm: nonEmpty,
  driver: z.enum(DRIVERS).default('image'),
  disks: z.array(z.strictObject({
    path: nonEmpty, name: nonEmpty,
    format: imageFormat.optional(),
    allowChain: z.boolean().optional(),
  })).min(1, 'at least one disk is needed'),
  qmpSocket: nonEmpty.optional(),
  guestAgentSocket: nonEmpty.optional(),
  /** Configuration files stored with an exported backup. */
  configs: z.array(nonEmpty).default([]),
  /** The snapshot (all ops but list). */
  name: nonEmpty.optional(),
  label: nonEmpty.optional(),
  /** create: a duration such as 7d or 12h after which the expiry sweep deletes it. */
  expireIn: nonEmpty.optional(),
  /** create: also back the VM up, labelled like the snapshot. */
  export: z.boolean().default(false),
}).superRefine((p, ctx) => {
  if (p.op !== 'list' && p.name === undefined) ctx.addIssue({ code: 'custom', path: ['name'], message: `a snapshot name is needed to ${p.op} a snapshot` });
  if (p.op !== 'create' && (p.label !== undefined || p.expireIn !== undefined || p.export)) {
    ctx.addIssue({ code: 'custom', path: ['op'], message: 'label, expireIn and export apply to create only' });
  }
});

/** An inventory disk as jobs carry it: its format and chain permission travel with it, so the worker opens it as configured. */
function diskPayload(d: VmConfig['disks'][number]) {
  return { path: d.path, name: d.name, ...(d.format ? { format: d.format } : {}), ...(d.allowChain ? { allowChain: true } : {}) };
}

/** The snapshot payload of an inventory VM: the one place that maps the inventory to a snapshot job. */
export function snapshotPayloadFor(
  vm: VmConfig,
  req: { op: SnapshotPayload['op']; name?: string; label?: string; expireIn?: string; export?: boolean },
): SnapshotPayloadInput {
  return {
    op: req.op, vm: vm.name, driver: vm.driver,
    disks: vm.disks.map(diskPayload),
    ...(vm.qmpSocket ? { qmpSocket: vm.qmpSocket } : {}),
    ...(vm.guestAgentSocket ? { guestAgentSocket: vm.guestAgentSocket } : {}),
    configs: vm.configFiles,
    ...(req.name !== undefined ? { name: req.name } : {}),
    ...(req.label !== undefined ? { label: req.label } : {}),
    ...(req.expireIn !== undefined ? { expireIn: req.expireIn } : {}),
    ...(req.export ? { export: true } : {}),
  };
}

/**
 * The backup payload of an inventory VM: its disks, configuration files and driver
 * (with the sockets a running VM is reached through), plus what the caller adds.
 * The one place that maps the inventory to a backup job, for the scheduler and the
 * API alike.
 */
export function backupPayloadFor(vm: VmConfig, extra: { labels?: string[]; policy?: string; slot?: string; fullReadEvery?: string } = {}): BackupPayloadInput {
  return {
    vm: vm.name,
    disks: vm.disks.map(diskPayload),
    configs: vm.configFiles,
    labels: extra.labels ?? [],
    ...(extra.policy ? { policy: extra.policy } : {}),
    ...(extra.fullReadEvery ? { fullReadEvery: extra.fullReadEvery } : {}),
    ...(extra.slot ? { slot: extra.slot } : {}),
    ...(vm.driver !== 'image' ? { driver: vm.driver } : {}),
    ...(vm.driver === 'qemu' && vm.qmpSocket ? { qmpSocket: vm.qmpSocket } : {}),
    ...(vm.driver === 'qemu' && vm.guestAgentSocket ? { guestAgentSocket: vm.guestAgentSocket } : {}),
    // A libvirt domain is named like the VM in the inventory.
    ...(vm.driver === 'libvirt' ? { libvirtDomain: vm.name } : {}),
  };
}

/**
 * Serve one disk of a backup over NBD from the worker's host for `ttlSeconds`, on
 * `address` (an IP literal: loopback or the host's configured exportAddress; the
 * worker checks again) and a port of the system's choosing.
 */
export const exportPayloadSchema = z.strictObject({
  backupId: z.string().regex(/^[0-9a-fA-F]{4,64}$/, 'a backup id (hexadecimal, at least 4 digits)'),
  disk: nonEmpty,
  address: nonEmpty,
  ttlSeconds: z.number().int().min(1).max(24 * 3600),
});

/**
 * A restore drill (vm/drill.ts) on the host whose queue this is: a backup by id, or a
 * VM's newest backup. A failed boot fails the job (after recording boot-failed).
 */
export const drillPayloadSchema = z.strictObject({
  backupId: z.string().regex(/^[0-9a-fA-F]{4,64}$/, 'a backup id (hexadecimal, at least 4 digits)').optional(),
  vm: nonEmpty.optional(),
  policy: nonEmpty.optional(),
  slot: nonEmpty.optional(),
  probe: z.discriminatedUnion('kind', [
    z.strictObject({ kind: z.literal('serial'), text: nonEmpty }),
    z.strictObject({ kind: z.literal('guest-agent') }),
    z.strictObject({ kind: z.literal('tcp'), port: z.number().int().min(1).max(65535) }),
  ]).optional(),
  timeoutSeconds: z.number().int().min(1).max(24 * 3600).default(300),
}).refine((p) => (p.backupId === undefined) !== (p.vm === undefined), { path: ['vm'], message: 'give either backupId or vm (its newest backup)' });

/** The drill payload of a policy's scheduled drill of `vm` (its newest backup). */
export function drillPayloadFor(vm: string, policy: Policy, slot: Date): DrillPayloadInput {
  const d: { every?: string; serial?: string; guestAgent?: boolean; tcp?: number; timeout?: string } = policy.drill ?? {};
  const probe = d.serial !== undefined ? { kind: 'serial' as const, text: d.serial }
    : d.guestAgent ? { kind: 'guest-agent' as const }
      : d.tcp !== undefined ? { kind: 'tcp' as const, port: d.tcp } : undefined;
  return {
    vm, policy: policy.name, slot: slot.toISOString(), ...(probe ? { probe } : {}),
    ...(d.timeout ? { timeoutSeconds: Math.max(1, Math.round(durationMs(parseDuration(d.timeout)) / 1000)) } : {}),
  };
}

/** Job names on a host queue, each with its payload schema. */
export const HOST_JOBS = { backup: backupPayloadSchema, restore: restorePayloadSchema, snapshot: snapshotPayloadSchema, export: exportPayloadSchema, drill: drillPayloadSchema } as const;
export type HostJobName = keyof typeof HOST_JOBS;

export type BackupPayloadInput = z.input<typeof backupPayloadSchema>;
export type BackupPayload = z.output<typeof backupPayloadSchema>;
export type RestorePayloadInput = z.input<typeof restorePayloadSchema>;
export type RestorePayload = z.output<typeof restorePayloadSchema>;
export type SnapshotPayloadInput = z.input<typeof snapshotPayloadSchema>;
export type SnapshotPayload = z.output<typeof snapshotPayloadSchema>;
export type ExportPayloadInput = z.input<typeof exportPayloadSchema>;
export type ExportPayload = z.output<typeof exportPayloadSchema>;
export type DrillPayloadInput = z.input<typeof drillPayloadSchema>;
export type DrillPayload = z.output<typeof drillPayloadSchema>;
export type MaintenancePayloadInput = z.input<typeof maintenancePayloadSchema>;
export type MaintenancePayload = z.output<typeof maintenancePayloadSchema>;

export type HostJob =
  | { name: 'backup'; payload: BackupPayload }
  | { name: 'restore'; payload: RestorePayload }
  | { name: 'snapshot'; payload: SnapshotPayload }
  | { name: 'export'; payload: ExportPayload }
  | { name: 'drill'; payload: DrillPayload };

/** Parses a host job, throwing VmvaultError('BAD_INPUT') naming each bad field. */
export function parseHostJob(name: string, data: unknown): HostJob {
  if (!Object.hasOwn(HOST_JOBS, name)) {
    throw new VmvaultError('BAD_INPUT', `unknown job "${name}" on a host queue (known: ${Object.keys(HOST_JOBS).join(', ')})`);
  }
  const schema = HOST_JOBS[name as HostJobName];
  const r = schema.safeParse(data);
  if (!r.success) throw new VmvaultError('BAD_INPUT', `invalid ${name} job payload: ${describeIssues(r.error)}`);
  return { name, payload: r.data } as HostJob;
}

/** Parses a maintenance job payload, throwing VmvaultError('BAD_INPUT') naming each bad field. */
export function parseMaintenancePayload(data: unknown): MaintenancePayload {
  const r = maintenancePayloadSchema.safeParse(data);
  if (!r.success) throw new VmvaultError('BAD_INPUT', `invalid maintenance job payload: ${describeIssues(r.error)}`);
  return r.data;
}

export function describeIssues(err: z.ZodError): string {
  return err.issues.map((i) => `${i.path.length ? i.path.join('.') : '(payload)'}: ${i.message}`).join('; ');
}

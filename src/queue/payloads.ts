/**
 * Job payloads, validated with zod at both ends: when enqueued (a bad request fails
 * the caller) and when a worker takes the job (anything else in Redis fails the job
 * as unrecoverable). The job's name says which payload it carries.
 */
import { z } from 'zod';
import { IMAGE_FORMATS, isImageFormat, type ImageFormat } from '../disk/image-format.js';
import { VmvaultError } from '../errors.js';
import type { VmConfig } from '../config/schema.js';

const nonEmpty = z.string().trim().min(1);

export const backupPayloadSchema = z.strictObject({
  vm: nonEmpty,
  disks: z.array(z.strictObject({ path: nonEmpty, name: nonEmpty.optional() })).min(1, 'at least one disk is needed'),
  /** Configuration files stored with the backup. */
  configs: z.array(nonEmpty).default([]),
  labels: z.array(nonEmpty).default([]),
  policy: nonEmpty.optional(),
  /** The scheduled slot (ISO-8601) this backup is for; informational, the job id carries deduplication. */
  slot: nonEmpty.optional(),
});

export const restorePayloadSchema = z.strictObject({
  /** A backup id or a unique prefix of one. */
  backupId: z.string().regex(/^[0-9a-fA-F]{4,64}$/, 'a backup id (hexadecimal, at least 4 digits)'),
  /** Absolute directory on the worker's host that receives the disks and config files. */
  directory: nonEmpty.refine((d) => d.startsWith('/'), 'an absolute path'),
  format: z.string().refine(isImageFormat, `one of ${IMAGE_FORMATS.join(', ')}`).transform((f) => f as ImageFormat).optional(),
  disks: z.array(nonEmpty).optional(),
  overwrite: z.boolean().default(false),
});

export const maintenancePayloadSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('prune'), policy: nonEmpty, vms: z.array(nonEmpty).optional(), dryRun: z.boolean().default(false) }),
  z.strictObject({ kind: z.literal('gc'), dryRun: z.boolean().default(false) }),
  z.strictObject({ kind: z.literal('verify'), readData: z.boolean().default(false), backups: z.array(nonEmpty).optional() }),
]);

/**
 * The backup payload of an inventory VM: its disks and configuration files, plus
 * what the caller adds. The one place that maps the inventory to a backup job, for
 * the scheduler and the API alike.
 */
export function backupPayloadFor(vm: VmConfig, extra: { labels?: string[]; policy?: string; slot?: string } = {}): BackupPayloadInput {
  return {
    vm: vm.name,
    disks: vm.disks.map((d) => ({ path: d.path, name: d.name })),
    configs: vm.configFiles,
    labels: extra.labels ?? [],
    ...(extra.policy ? { policy: extra.policy } : {}),
    ...(extra.slot ? { slot: extra.slot } : {}),
  };
}

/** Job names on a host queue, each with its payload schema. */
export const HOST_JOBS = { backup: backupPayloadSchema, restore: restorePayloadSchema } as const;
export type HostJobName = keyof typeof HOST_JOBS;

export type BackupPayloadInput = z.input<typeof backupPayloadSchema>;
export type BackupPayload = z.output<typeof backupPayloadSchema>;
export type RestorePayloadInput = z.input<typeof restorePayloadSchema>;
export type RestorePayload = z.output<typeof restorePayloadSchema>;
export type MaintenancePayloadInput = z.input<typeof maintenancePayloadSchema>;
export type MaintenancePayload = z.output<typeof maintenancePayloadSchema>;

export type HostJob = { name: 'backup'; payload: BackupPayload } | { name: 'restore'; payload: RestorePayload };

/** Parses a host job, throwing VmvaultError('BAD_INPUT') naming each bad field. */
export function parseHostJob(name: string, data: unknown): HostJob {
  if (name !== 'backup' && name !== 'restore') {
    throw new VmvaultError('BAD_INPUT', `unknown job "${name}" on a host queue (known: ${Object.keys(HOST_JOBS).join(', ')})`);
  }
  const schema = HOST_JOBS[name];
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

/**
 * The manifest of one backup: everything needed to restore it. Stored sealed at
 * `backups/<id>`; written last, so a backup exists if and only if its manifest does.
 * Names in it (VM, disks, config files) live only inside the encrypted manifest.
 */
import * as z from 'zod';
import { IntegrityError } from '../errors.js';
import { IMAGE_FORMATS } from '../disk/qemu.js';

/** A file's identity and times, to nanoseconds (change-tracking.ts statStamp). */
const stampSchema = z.object({ dev: z.number(), ino: z.number(), size: z.number(), mtimeNs: z.string(), ctimeNs: z.string() });

const hex64 = z.string().regex(/^[0-9a-f]{64}$/);

export const diskSchema = z.object({
  name: z.string().min(1),
  format: z.enum(IMAGE_FORMATS as unknown as [string, ...string[]]),
  /**
   * Where the format came from: the VM's configuration (`declared`) or vmvault's own
   * probe (`detected`, then pinned: a later backup whose probe disagrees is refused).
   * Absent in older backups.
   */
  formatSource: z.enum(['declared', 'detected']).optional(),
  /** Other files read through the image, flattened into it (an allowed linked-clone chain). */
  chain: z.array(z.string()).optional(),
  /** How this disk was read: everything, or only what changed since the previous backup; and why. Absent in older backups. */
  mode: z.enum(['full', 'incremental']).optional(),
  reason: z.string().optional(),
  /**
   * An audited full read: how many chunks change tracking called unchanged, how many of
   * those were not (a tracking bug: this backup is right, incrementals might not be),
   * and the first offsets that differed.
   */
  audit: z.object({ unchanged: z.number(), differing: z.number(), offsets: z.array(z.number()) }).optional(),
  /** The persistent dirty bitmap this backup left in the image: it counts changes since this backup's instant. */
  bitmap: z.string().optional(),
  /** A raw image's file identity and times at this backup (restic's test for an unchanged file). */
  fileStamp: stampSchema.optional(),
  /**
   * The identity of each file below the image (its backing files and what they name,
   * in `chain` order; not its own data file or extents): an incremental backup of a
   * linked clone needs them unchanged (its bitmap counts writes to the image only).
   * Absent in older backups, and where a driver did not record it.
   */
  chainStamps: z.array(stampSchema).optional(),
  virtualSize: z.number().int().nonnegative(),
  sourcePath: z.string(),
  /** One entry per chunk of the virtual disk: the chunk id, or null for all zeros. */
  chunks: z.array(hex64.nullable()),
});

export const configFileSchema = z.object({
  name: z.string().min(1),
  sourcePath: z.string(),
  data: z.string(), // base64
});

export const statsSchema = z.object({
  bytesRead: z.number(),
  bytesUploaded: z.number(),
  chunksNew: z.number(),
  chunksReused: z.number(),
  chunksZero: z.number(),
  /** Chunks known unchanged since the previous backup (dirty bitmap, or an untouched raw file): not read at all. */
  chunksUnchanged: z.number().optional(),
  seconds: z.number(),
});

export const manifestSchema = z.object({
  version: z.literal(1),
  id: hex64,
  vm: z.string().min(1),
  host: z.string(),
  time: z.string(),
  labels: z.array(z.string()),
  policy: z.string().optional(),
  /**
   * What the point in time guarantees: `offline` (images no VM had open), `crash`
   * (a running VM's disks at one instant, as after a power cut) or `application`
   * (the same with the guest's filesystems frozen by its agent). Absent in older backups.
   */
  consistency: z.enum(['offline', 'crash', 'application']).optional(),
  chunkSize: z.number().int().positive(),
  disks: z.array(diskSchema),
  configs: z.array(configFileSchema),
  stats: statsSchema,
});

export type Manifest = z.infer<typeof manifestSchema>;
export type DiskEntry = z.infer<typeof diskSchema>;
export type BackupStats = z.infer<typeof statsSchema>;

/** What listings print: the manifest without chunk lists and file contents. */
export interface BackupSummary {
  id: string;
  vm: string;
  host: string;
  time: string;
  labels: string[];
  policy?: string;
  consistency?: 'offline' | 'crash' | 'application';
  disks: { name: string; format: string; virtualSize: number; formatSource?: 'declared' | 'detected'; chain?: string[]; mode?: 'full' | 'incremental'; reason?: string;
    audit?: { unchanged: number; differing: number; offsets: number[] } }[];
  configs: string[];
}

export function summarise(m: Manifest): BackupSummary {
  return {
    id: m.id,
    vm: m.vm,
    host: m.host,
    time: m.time,
    labels: m.labels,
    ...(m.policy ? { policy: m.policy } : {}),
    ...(m.consistency ? { consistency: m.consistency } : {}),
    disks: m.disks.map((d) => ({
      name: d.name, format: d.format, virtualSize: d.virtualSize,
      ...(d.formatSource ? { formatSource: d.formatSource } : {}), ...(d.chain ? { chain: d.chain } : {}),
      ...(d.mode ? { mode: d.mode } : {}), ...(d.reason ? { reason: d.reason } : {}), ...(d.audit ? { audit: d.audit } : {}),
    })),
    configs: m.configs.map((c) => c.name),
  };
}

export function backupName(id: string): string {
  return `backups/${id}`;
}

/**
 * A manifest that decrypts and authenticates with this repository's key, so a holder of
 * the key wrote it exactly so (storage damage cannot forge the tag), yet this vmvault
 * cannot read it: most likely a newer vmvault's format. Counted with the damaged ones
 * where all manifests are needed (gc deletes no chunk meanwhile), but never removed as
 * damage (repair).
 */
export class UnreadableManifestError extends IntegrityError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'UnreadableManifestError';
  }
}


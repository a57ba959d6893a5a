/**
 * Request and response schemas of the HTTP API. The same zod schemas validate
 * requests and generate the OpenAPI document (`GET /v1/openapi.json`).
 */
import { z } from '@hono/zod-openapi';
import { IMAGE_FORMATS } from '../disk/image-format.js';
import { NAME_RE } from '../policy/schema.js';
import { JOB_STATES } from './jobs.js';
import { DEFAULT_LINK_SECONDS, MAX_LINK_SECONDS } from './links.js';

export const ErrorSchema = z.object({
  error: z.object({
    code: z.string().openapi({ example: 'NOT_FOUND' }),
    message: z.string(),
    details: z.unknown().optional(),
  }),
}).openapi('Error');

export const PageQuery = z.object({
  limit: z.coerce.number().int().min(1).max(1000).default(100).openapi({ description: 'items per page (1–1000)' }),
  cursor: z.string().regex(/^\d{1,9}$/, 'a cursor returned as nextCursor').optional().openapi({ description: 'nextCursor of the previous page' }),
});

const page = <T extends z.ZodType, X extends z.ZodRawShape = {}>(item: T, name: string, extra?: X) => z.object({
  items: z.array(item),
  nextCursor: z.string().nullable().openapi({ description: 'pass as cursor for the next page; null on the last page' }),
  ...(extra ?? ({} as X)),
}).openapi(name);

export const StatsSchema = z.object({
  bytesRead: z.number(), bytesUploaded: z.number(), chunksNew: z.number(), chunksReused: z.number(), chunksZero: z.number(),
  chunksUnchanged: z.number().optional().openapi({ description: 'chunks known unchanged since the previous backup, not read' }), seconds: z.number(),
});

export const VerificationSchema = z.object({
  lastVerified: z.string().openapi({ format: 'date-time', description: 'when the last verify that checked this backup ran' }),
  readData: z.string().openapi({ description: 'what that verify read: none (chunks present), all, or a subset such as 1/7 or 10%' }),
  status: z.enum(['ok', 'damaged', 'boot-verified', 'boot-failed']).openapi({ description: 'damaged while a chunk it uses is quarantined (a later backup that produces the chunk again heals it); otherwise the newest restore drill\'s result when drilled, else ok' }),
  damagedDisks: z.array(z.string()),
  damagedChunks: z.number(),
  boot: z.object({
    status: z.enum(['boot-verified', 'boot-failed']),
    time: z.string().openapi({ format: 'date-time' }),
    host: z.string(),
    reason: z.string().optional().openapi({ description: 'why the drill failed' }),
    probe: z.string().openapi({ description: 'how success was decided' }),
    seconds: z.number(),
  }).optional().openapi({ description: 'the newest restore drill (vmvault drill)' }),
}).openapi('Verification');

export const BackupSchema = z.object({
  id: z.string().regex(/^[0-9a-f]{64}$/),
  vm: z.string(),
  host: z.string(),
  time: z.string().openapi({ format: 'date-time' }),
  labels: z.array(z.string()),
  policy: z.string().optional(),
  consistency: z.enum(['offline', 'crash', 'application']).optional().openapi({ description: 'offline images, a running VM at one instant (crash), or with its filesystems frozen (application)' }),
  disks: z.array(z.object({
    name: z.string(), format: z.string(), virtualSize: z.number(),
    formatSource: z.enum(['declared', 'detected']).optional().openapi({ description: "the VM's configuration stated the format, or vmvault detected it once and pinned it" }),
    chain: z.array(z.string()).optional().openapi({ description: 'other files read through the image (an allowed linked-clone chain)' }),
    mode: z.enum(['full', 'incremental']).optional().openapi({ description: 'read in full, or only what changed since the previous backup' }),
    reason: z.string().optional().openapi({ description: 'why the disk was read that way' }),
    audit: z.object({ unchanged: z.number(), differing: z.number(), offsets: z.array(z.number()) }).optional()
      .openapi({ description: 'an audited full read: chunks change tracking called unchanged, and how many were not' }),
  })),
  configs: z.array(z.string()),
  stats: StatsSchema,
  verification: VerificationSchema.nullable().openapi({ description: 'null: never verified' }),
}).openapi('Backup');

/** A backup whose manifest cannot be read (src/ops/status.ts, UnreadableStatus). */
export const UnreadableSchema = z.object({
  id: z.string(),
  kind: z.enum(['damaged', 'other-version', 'stray']).openapi({ description: 'damaged (does not authenticate or parse), other-version (written by a vmvault whose format this one cannot read: not damage), or stray (no file at its name)' }),
  problem: z.string(),
  advice: z.string().openapi({ description: 'what to do about it' }),
}).openapi('UnreadableBackup');

export const BackupPage = page(BackupSchema, 'BackupPage', {
  unreadable: z.array(UnreadableSchema).openapi({ description: 'backups whose manifest cannot be read, whatever the filters (their VM and time are in the manifest): never in items' }),
});

export const JobSchema = z.object({
  id: z.string(),
  queue: z.string(),
  name: z.string(),
  state: z.string().openapi({ description: `one of ${JOB_STATES.join(', ')}, or unknown` }),
  data: z.unknown(),
  progress: z.unknown().openapi({ description: 'while running: { phase, disk?, bytesDone, bytesTotal, bytesPerSecond }' }),
  result: z.unknown().openapi({ description: 'when completed: the job\'s result (a restore lists the files written)' }),
  error: z.string().nullable(),
  attemptsMade: z.number(),
  attempts: z.number(),
  createdAt: z.string(),
  startedAt: z.string().nullable(),
  finishedAt: z.string().nullable(),
}).openapi('Job');

export const JobPage = page(JobSchema, 'JobPage');

export const VmSchema = z.object({
  name: z.string(),
  host: z.string(),
  driver: z.string(),
  disks: z.array(z.object({ name: z.string(), path: z.string(), format: z.string().optional() })),
  configFiles: z.array(z.string()),
  tags: z.array(z.string()),
}).openapi('Vm');

export const VmPage = page(VmSchema, 'VmPage');

export const VmDetailSchema = VmSchema.extend({
  state: z.enum(['idle', 'queued', 'running']).openapi({ description: 'whether a job of this VM is running or waiting on its host' }),
  lastBackup: BackupSchema.nullable(),
  backups: z.number().openapi({ description: 'backups of this VM in the repository' }),
  jobs: z.array(JobSchema).openapi({ description: 'unfinished jobs of this VM' }),
}).openapi('VmDetail');

const nameParam = (what: string) => z.string().min(1).max(200).openapi({ description: what });
export const VmParam = z.object({ vm: nameParam('VM name') });
export const BackupParam = z.object({ id: z.string().regex(/^[0-9a-fA-F]{4,64}$/, 'a backup id or a unique prefix of at least 4 hex digits').openapi({ description: 'backup id or unique prefix' }) });
export const DiskParam = BackupParam.extend({ disk: nameParam('disk name') });
export const JobParam = z.object({ id: z.string().min(1).max(512) });
export const LinkParam = z.object({ token: z.string().min(1).max(4096) });

export const BackupQuery = PageQuery.extend({
  vm: z.string().optional(),
  label: z.string().optional(),
  host: z.string().optional(),
  since: z.iso.datetime({ offset: true }).or(z.iso.date()).optional().openapi({ description: 'only backups at or after this time (ISO 8601 date or date-time)' }),
});

export const JobQuery = PageQuery.extend({
  state: z.enum(JOB_STATES).optional(),
  queue: z.string().optional(),
});

const label = z.string().regex(NAME_RE, 'a label: letters, digits, ".", "_" or "-"');

export const BackupRequest = z.strictObject({
  labels: z.array(label).max(32).default([]),
}).openapi('BackupRequest');

export const RestoreRequest = z.strictObject({
  host: z.string().min(1).openapi({ description: 'the host whose worker writes the restore' }),
  directory: z.string().min(1).max(4096).openapi({ description: 'absolute directory on that host, inside its restoreRoots' }),
  format: z.enum(IMAGE_FORMATS as unknown as [string, ...string[]]),
  disks: z.array(z.string().min(1).max(200)).min(1).max(64).optional().openapi({ description: 'restore only these disks (by name)' }),
  diskPaths: z.record(z.string().min(1).max(200), z.string().min(1).max(4096)).optional()
    .openapi({ description: 'where each named disk goes instead of DIRECTORY/NAME.EXT: a path relative to the directory, or an absolute one inside it' }),
  name: z.string().min(1).max(64).optional()
    .openapi({ description: 'restore as a new VM of this name: the libvirt domain XML gets this name, a fresh UUID and fresh MAC addresses' }),
  overwrite: z.boolean().default(false),
}).openapi('RestoreRequest');

export const LinkRequest = z.strictObject({
  expiresIn: z.number().int().min(1).max(MAX_LINK_SECONDS).default(DEFAULT_LINK_SECONDS).openapi({ description: 'seconds the link stays valid' }),
}).openapi('LinkRequest');

export const LinkSchema = z.object({
  url: z.string().openapi({ description: 'GET or HEAD it without a bearer header; supports Range. It holds the capability: treat it as a password until it expires' }),
  expiresAt: z.string(),
  cookieUrl: z.string().openapi({ description: 'the same link without its signature, which then goes in the Cookie header (`cookie`): for clients that can send one, so that the capability is not in the URL' }),
  cookie: z.string().openapi({ description: 'vmvault_link=MAC: the Cookie header for cookieUrl' }),
  command: z.string().openapi({ description: 'a shell command that restores the disk from the link as qcow2 into the working directory with stock qemu-img, the signature sent as a cookie from a file it writes with the shell\'s printf and removes (typed at a prompt, it is on no command line; qemu-img\'s holds only the payload); -m 1: QEMU 7.2\'s curl driver hangs now and then with parallel requests' }),
}).openapi('Link');

export const PruneRequest = z.strictObject({ policy: z.string().min(1), vms: z.array(z.string().min(1)).optional(), dryRun: z.boolean().default(false) }).openapi('PruneRequest');
export const GcRequest = z.strictObject({ dryRun: z.boolean().default(false) }).openapi('GcRequest');
export const CopyRequest = z.strictObject({}).openapi('CopyRequest');
export const VerifyRequest = z.strictObject({
  readData: z.boolean().default(false),
  readDataSubset: z.string().min(1).max(16).optional().openapi({ description: 'read only k/n of the chunks (1/7 … 7/7 cover each once) or p% at random' }),
  backups: z.array(z.string().min(1)).optional(),
}).openapi('VerifyRequest');

export const PolicyProblemSchema = z.object({ file: z.string(), line: z.number(), col: z.number(), path: z.string(), message: z.string() }).openapi('PolicyProblem');
export const PoliciesSchema = z.object({
  items: z.array(z.object({ file: z.string(), policy: z.record(z.string(), z.unknown()) })),
  problems: z.array(PolicyProblemSchema),
}).openapi('Policies');
export const PolicyValidateRequest = z.strictObject({
  yaml: z.string().max(256 * 1024).openapi({ description: 'the text of one policy file' }),
  file: z.string().max(200).default('policy.yaml').openapi({ description: 'the name used in problem messages' }),
}).openapi('PolicyValidateRequest');
export const PolicyValidateResult = z.object({
  valid: z.boolean(),
  policy: z.record(z.string(), z.unknown()).nullable(),
  problems: z.array(PolicyProblemSchema),
}).openapi('PolicyValidateResult');

export const HealthSchema = z.object({
  status: z.enum(['ok', 'degraded']),
  redis: z.enum(['ok', 'unreachable']),
  repository: z.enum(['ok', 'unreachable']),
  reason: z.string().optional().openapi({ description: 'why the service is degraded, e.g. a host with queued jobs and no live worker' }),
}).openapi('Health');

export const JobAccepted = z.object({ job: JobSchema }).openapi('JobAccepted');

/** The header of a request that makes a job (api/jobs.ts requestJobId). */
export const IdempotencyHeader = z.object({
  'idempotency-key': z.string().regex(/^[\x21-\x7e]{1,255}$/, 'the Idempotency-Key header must be 1 to 255 visible ASCII characters (a UUID, say)').optional().openapi({
    description: 'Any unique value (a UUID): a retry of this request with the same key, by the same token, gets the job its first try made ' +
      '(with Idempotent-Replayed: true) instead of a second one, as long as that job is kept (7 days, at most 1000 finished jobs per queue); ' +
      'the same key for another request is refused with 422',
  }),
});

export const SnapshotParam = VmParam.extend({ name: z.string().min(1).max(64).openapi({ description: 'snapshot name' }) });

export const SnapshotRequest = z.strictObject({
  name: z.string().min(1).max(64),
  label: label.optional().openapi({ description: 'default pre-update' }),
  expireIn: z.string().regex(/^\d+[a-zA-Z]+(\d+[a-zA-Z]+)*$/, 'a duration such as 7d, 12h, 30min or 1w').optional().openapi({ description: 'after this the expiry sweep deletes it, e.g. 7d, 12h, 30min, 2w, 3mo (units y, mo, w, d, h, min; a bare m is refused as ambiguous)' }),
  export: z.boolean().default(false).openapi({ description: 'also take a backup into the repository, labelled like the snapshot' }),
}).openapi('SnapshotRequest');

export const SnapshotSchema = z.object({
  vm: z.string(),
  name: z.string(),
  label: z.string().optional(),
  created: z.string(),
  expiresAt: z.string().optional(),
  backup: z.string().optional(),
  vmState: z.boolean(),
  disks: z.array(z.string()),
  missingDisks: z.array(z.string()),
}).openapi('Snapshot');

export const SnapshotList = z.object({ items: z.array(SnapshotSchema), job: z.string() }).openapi('SnapshotList');

export const PolicyParam = z.object({ name: nameParam('policy name (its name: field)') });
export const RetentionPreviewQuery = z.object({ vm: z.string().min(1).max(200).optional().openapi({ description: 'only this VM\'s backups' }) });
export const RetentionPreview = z.object({
  policy: z.string(),
  at: z.string().openapi({ format: 'date-time', description: 'the instant the retention was evaluated at' }),
  items: z.array(z.object({
    id: z.string(), vm: z.string(), time: z.string(), labels: z.array(z.string()),
    ruleLabel: z.string().optional().openapi({ description: 'the byLabel rules used, when the backup carries such a label' }),
    keep: z.boolean(),
    reasons: z.array(z.string()).openapi({
      description: 'why it is kept; empty when it would be forgotten. The retention rules (last, hourly, daily, weekly, monthly, yearly, "oldest daily"…, within, "empty policy"), ' +
        'or: damaged (verify found a chunk it uses missing or damaged: never removed, takes no retention slot), "future time" (dated later than now: its host\'s clock is probably wrong; takes no slot), ' +
        '"unreadable time", "kept by policy NAME" (an on-demand backup another policy selecting its VM keeps), "last of disk NAME" (no other backup of the VM that stays holds that disk undamaged), ' +
        '"invalid policy file" (an on-demand backup, while a policy file cannot be read)',
    }),
  })).openapi({ description: 'the backups the policy governs, per VM newest first' }),
  warnings: z.array(z.string()).openapi({ description: 'what to look at: backups dated in the future or with a time that cannot be read' }),
}).openapi('RetentionPreview');

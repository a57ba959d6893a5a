/**
 * Adding jobs. Payloads are validated here, so a bad request fails its caller, not
 * a worker later. A deterministic job id deduplicates: BullMQ ignores an add whose
 * id it already holds (waiting, running, or kept in history), so two scheduler
 * replicas or a retried enqueue make one job. History is bounded, so deduplication
 * lasts as long as a finished job is kept (JOB_HISTORY: 7 days).
 */
import { Queue, type Job, type JobsOptions } from 'bullmq';
import { queueOptions, type RedisConnection } from './connection.js';
import { VmvaultError } from '../errors.js';
import { assertJobId, hostQueueName, MAINTENANCE_QUEUE } from './names.js';
import {
  backupPayloadSchema, describeIssues, drillPayloadSchema, exportPayloadSchema, maintenancePayloadSchema, restorePayloadSchema, snapshotPayloadSchema,
  type BackupPayloadInput, type DrillPayloadInput, type ExportPayloadInput, type MaintenancePayloadInput, type RestorePayloadInput, type SnapshotPayloadInput,
} from './payloads.js';
import type * as z from 'zod';

/** Completed and failed jobs kept: at most 1000, at most 7 days (BullMQ counts age in seconds). */
export const JOB_HISTORY = { count: 1000, age: 7 * 24 * 3600 } as const;

export const DEFAULT_ATTEMPTS = 5;
export const DEFAULT_BACKOFF_MS = 30_000;

export interface EnqueueOptions {
  /** Deterministic id (no ':'); a second add with the same id is a no-op. */
  jobId?: string;
  /** Runs in total, first one included (default 5). */
  attempts?: number;
  /** First retry delay; doubles at each retry (default 30 s). */
  backoffMs?: number;
  delayMs?: number;
  priority?: number;
}

/** The queue of one host, sharing `connection` (the caller closes both). */
export function hostQueue(connection: RedisConnection, host: string): Queue {
  return quiet(new Queue(hostQueueName(host), queueOptions(connection)));
}

export function maintenanceQueue(connection: RedisConnection): Queue {
  return quiet(new Queue(MAINTENANCE_QUEUE, queueOptions(connection)));
}

/**
 * The host queues and the maintenance queue on one connection, each opened once on
 * first use and closed together (the connection stays its owner's to close).
 */
export class QueueSet {
  private readonly hosts = new Map<string, Queue>();
  readonly maintenance: Queue;

  constructor(private readonly connection: RedisConnection) {
    this.maintenance = maintenanceQueue(connection);
  }

  /** The queue of `host`. */
  readonly of = (host: string): Queue => {
    let q = this.hosts.get(host);
    if (!q) this.hosts.set(host, (q = hostQueue(this.connection, host)));
    return q;
  };

  async close(): Promise<void> {
    await Promise.all([...this.hosts.values(), this.maintenance].map((q) => q.close().catch(() => {})));
  }
}

/**
 * A queue re-emits every error of its shared connection, and BullMQ prints an error
 * nobody listens to as a raw stack trace on stderr, once per reconnection attempt
 * while Redis is down. The connection's owner already reports them (in the service's
 * structured log), so the queue's copies are dropped.
 */
function quiet(queue: Queue): Queue {
  queue.on('error', () => {});
  return queue;
}

export function jobOptions(opts: EnqueueOptions = {}): JobsOptions {
  if (opts.jobId !== undefined) assertJobId(opts.jobId);
  const attempts = opts.attempts ?? DEFAULT_ATTEMPTS;
  if (!Number.isInteger(attempts) || attempts < 1) throw new VmvaultError('BAD_INPUT', `attempts must be a whole number ≥ 1, not ${attempts}`);
  return {
    attempts,
    backoff: { type: 'exponential', delay: opts.backoffMs ?? DEFAULT_BACKOFF_MS },
    removeOnComplete: JOB_HISTORY,
    removeOnFail: JOB_HISTORY,
    ...(opts.jobId !== undefined ? { jobId: opts.jobId } : {}),
    ...(opts.delayMs ? { delay: opts.delayMs } : {}),
    ...(opts.priority ? { priority: opts.priority } : {}),
  };
}

function validate<S extends z.ZodType>(schema: S, what: string, payload: unknown): z.output<S> {
  const r = schema.safeParse(payload);
  if (!r.success) throw new VmvaultError('BAD_INPUT', `invalid ${what} request: ${describeIssues(r.error)}`);
  return r.data;
}

/** Enqueues a backup on a host queue. Resolves to the job (the existing one when the id was already there). */
export function enqueueBackup(queue: Queue, payload: BackupPayloadInput, opts?: EnqueueOptions): Promise<Job> {
  return queue.add('backup', validate(backupPayloadSchema, 'backup', payload), jobOptions(opts));
}

/** Enqueues a restore drill on the host whose queue this is. */
export function enqueueDrill(queue: Queue, payload: DrillPayloadInput, opts?: EnqueueOptions): Promise<Job> {
  return queue.add('drill', validate(drillPayloadSchema, 'drill', payload), jobOptions(opts));
}

/** Enqueues a restore onto the host whose queue this is. */
export function enqueueRestore(queue: Queue, payload: RestorePayloadInput, opts?: EnqueueOptions): Promise<Job> {
  return queue.add('restore', validate(restorePayloadSchema, 'restore', payload), jobOptions(opts));
}

/**
 * Enqueues a snapshot operation (create, list, revert, delete) on the queue of the
 * VM's host. One attempt unless told otherwise: these are quick, and a create or
 * revert run twice is not what the caller asked for; the caller sees the failure.
 */
export function enqueueSnapshot(queue: Queue, payload: SnapshotPayloadInput, opts?: EnqueueOptions): Promise<Job> {
  return queue.add('snapshot', validate(snapshotPayloadSchema, 'snapshot', payload), jobOptions({ attempts: 1, ...opts }));
}

/** Enqueues an NBD export on the queue of the host that serves it; one attempt (a retry would start a second export). */
export function enqueueExport(queue: Queue, payload: ExportPayloadInput, opts?: EnqueueOptions): Promise<Job> {
  return queue.add('export', validate(exportPayloadSchema, 'export', payload), jobOptions({ attempts: 1, ...opts }));
}

/** Enqueues prune, gc or verify on the shared maintenance queue; the job is named after its kind. */
export function enqueueMaintenance(queue: Queue, payload: MaintenancePayloadInput, opts?: EnqueueOptions): Promise<Job> {
  const p = validate(maintenancePayloadSchema, 'maintenance', payload);
  return queue.add(p.kind, p, jobOptions(opts));
}

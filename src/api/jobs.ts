/**
 * Jobs as the API shows them, across every host queue and the maintenance queue.
 * API-made jobs get ids that are unique across queues (`api-<kind>-<random>`, or
 * `api-<kind>-k<digest>` for a request with an Idempotency-Key: requestJobId); scheduled
 * ones carry their deterministic ids. A lookup by id asks each queue.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { Job, JobType, Queue } from 'bullmq';
import { NotFoundError } from '../errors.js';
import { ApiError } from './errors.js';
import { shownExportUri } from '../pipeline/nbd-export.js';

export const JOB_STATES = ['active', 'waiting', 'delayed', 'prioritized', 'waiting-children', 'completed', 'failed'] as const;
export type JobState = (typeof JOB_STATES)[number];

export interface JobView {
  id: string;
  queue: string;
  name: string;
  state: string;
  data: unknown;
  progress: unknown;
  result: unknown;
  error: string | null;
  attemptsMade: number;
  attempts: number;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
}

export function newJobId(kind: string): string {
  return `api-${kind}-${randomBytes(8).toString('hex')}`;
}

/** What an Idempotency-Key may be: 1 to 255 visible ASCII characters (a UUID, say). */
const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/;

/**
 * The id of the job a request makes. Without an Idempotency-Key: a fresh one (newJobId).
 * With one: an id derived from the key, the token's name and the job's kind, so that a
 * client retrying a POST whose answer it lost (a timeout, a dropped connection: the job
 * may or may not have been made) gets the job its first try made, not a second backup,
 * restore or revert. BullMQ adds nothing under an id it still holds; a key is remembered
 * as long as its job is kept (finished jobs: 7 days, at most 1000 per queue). Another
 * token's same key is another job; the key itself is not in the id.
 */
export function requestJobId(kind: string, key: string | undefined, principal: string): string {
  if (key === undefined) return newJobId(kind);
  if (!IDEMPOTENCY_KEY.test(key)) throw new ApiError(400, 'BAD_INPUT', 'the Idempotency-Key header must be 1 to 255 visible ASCII characters (a UUID, say)');
  return `api-${kind}-k${createHash('sha256').update(`${principal}\0${kind}\0${key}`).digest('hex').slice(0, 32)}`;
}

/**
 * After `queue.add` with an id from an Idempotency-Key: the job an earlier request made
 * under it, when there was one (BullMQ then added nothing), else undefined. A key used
 * before for another request (other data) is refused with 422: answering with that job
 * would say something was done that was not asked.
 */
export async function earlierJob(queue: Queue, added: Job): Promise<Job | undefined> {
  const stored = await queue.getJob(added.id!);
  if (!stored) return undefined; // made and already removed: nothing to compare
  if (stored.name !== added.name || JSON.stringify(stored.data) !== JSON.stringify(added.data)) throw keyReused(stored);
  return stored.timestamp === added.timestamp ? undefined : stored;
}

/**
 * Before adding job `id` (from an Idempotency-Key) to `queue`: refuses (422) when another
 * of `queues` holds it, a request for another host with the same key, before anything is
 * added.
 */
export async function refuseKeyElsewhere(id: string, queue: Queue, queues: Queue[]): Promise<void> {
  for (const q of queues) {
    const elsewhere = q.name === queue.name ? undefined : await q.getJob(id);
    if (elsewhere) throw keyReused(elsewhere);
  }
}

const keyReused = (job: Job) => new ApiError(422, 'IDEMPOTENCY_KEY_REUSED',
  `this Idempotency-Key was used for another request (job ${job.id}): send a new key for a new request`, { job: job.id });

const iso = (ms: number | undefined) => (ms ? new Date(ms).toISOString() : null);

/**
 * A job's result as listings show it: an export's URI without its secret (viewers read
 * job listings; the URI reads the disk, and only the operator who asked gets it, in the
 * answer to POST /v1/backups/{id}/exports).
 */
function shownResult(job: Job): unknown {
  const r = job.returnvalue as unknown;
  if (job.name !== 'export' || typeof r !== 'object' || r === null || typeof (r as { uri?: unknown }).uri !== 'string') return r ?? null;
  return { ...r, uri: shownExportUri((r as { uri: string }).uri) };
}

/**
 * A job's view. The job's fields and its state are two reads: a job read while
 * running and found finished a moment later is read again, so a finished job
 * always shows its result.
 */
export async function jobView(job: Job, state?: string, reload?: () => Promise<Job | undefined>, secrets = false): Promise<JobView> {
  state ??= await job.getState();
  if ((state === 'completed' || state === 'failed') && !job.finishedOn && reload) job = (await reload()) ?? job;
  return {
    id: job.id!,
    queue: job.queueName,
    name: job.name,
    state,
    data: job.data,
    progress: typeof job.progress === 'object' || (typeof job.progress === 'number' && job.progress > 0) ? job.progress : null,
    result: secrets ? job.returnvalue ?? null : shownResult(job),
    error: job.failedReason || null,
    attemptsMade: job.attemptsMade,
    attempts: job.opts.attempts ?? 1,
    createdAt: iso(job.timestamp)!,
    startedAt: iso(job.processedOn),
    finishedAt: iso(job.finishedOn),
  };
}

export class JobIndex {
  constructor(private readonly queues: () => Queue[]) {}

  async get(id: string): Promise<JobView> {
    for (const q of this.queues()) {
      const job = await q.getJob(id);
      if (job) return jobView(job, undefined, () => q.getJob(id));
    }
    throw new NotFoundError(`no job "${id}" in any queue (finished jobs are kept 7 days, at most 1000 per queue)`);
  }

  /** Newest first, over every queue; `offset + limit` jobs are read from each queue. */
  async list(opts: { states?: JobState[]; queue?: string; offset: number; limit: number }): Promise<{ items: JobView[]; more: boolean }> {
    const states = (opts.states?.length ? opts.states : JOB_STATES) as JobType[];
    const want = opts.offset + opts.limit + 1;
    const all: { job: Job; queue: Queue }[] = [];
    for (const q of this.queues()) {
      if (opts.queue && q.name !== opts.queue) continue;
      for (const job of await q.getJobs(states, 0, want - 1, false)) if (job) all.push({ job, queue: q });
    }
    all.sort((a, b) => b.job.timestamp - a.job.timestamp || String(b.job.id).localeCompare(String(a.job.id)));
    const page = all.slice(opts.offset, opts.offset + opts.limit);
    return { items: await Promise.all(page.map((j) => jobView(j.job, undefined, () => j.queue.getJob(j.job.id!)))), more: all.length > opts.offset + opts.limit };
  }

  /**
   * The job once it has finished, polled; undefined when it has not within `timeoutMs`.
   * `secrets`: its result whole (an export's URI with its secret), for the route that
   * answers the request that made it.
   */
  async wait(queue: Queue, id: string, timeoutMs: number, secrets = false): Promise<JobView | undefined> {
    const deadline = Date.now() + timeoutMs;
    for (let delay = 20; ; delay = Math.min(delay * 2, 250)) {
      const job = await queue.getJob(id);
      if (!job) return undefined;
      const state = await job.getState();
      if (state === 'completed' || state === 'failed') return jobView(job, state, () => queue.getJob(id), secrets);
      if (Date.now() > deadline) return undefined;
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  /** Jobs not yet finished whose payload names `vm` (backups) on `queue`. */
  async pendingFor(queue: Queue, vm: string): Promise<JobView[]> {
    const jobs = await queue.getJobs(['active', 'waiting', 'delayed', 'prioritized'], 0, 999, true);
    const mine = jobs.filter((j): j is Job => !!j && (j.data as { vm?: unknown })?.vm === vm);
    return Promise.all(mine.map((j) => jobView(j, undefined, () => queue.getJob(j.id!))));
  }
}

/**
 * Jobs as the API shows them, across every host queue and the maintenance queue.
 * API-made jobs get ids that are unique across queues (`api-<kind>-<random>`);
 * scheduled ones carry their deterministic ids. A lookup by id asks each queue.
 */
import { randomBytes } from 'node:crypto';
import type { Job, JobType, Queue } from 'bullmq';
import { NotFoundError } from '../errors.js';

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

const iso = (ms: number | undefined) => (ms ? new Date(ms).toISOString() : null);

export async function jobView(job: Job, state?: string): Promise<JobView> {
  return {
    id: job.id!,
    queue: job.queueName,
    name: job.name,
    state: state ?? await job.getState(),
    data: job.data,
    progress: typeof job.progress === 'object' || (typeof job.progress === 'number' && job.progress > 0) ? job.progress : null,
    result: job.returnvalue ?? null,
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
      if (job) return jobView(job);
    }
    throw new NotFoundError(`no job "${id}" in any queue (finished jobs are kept 7 days, at most 1000 per queue)`);
  }

  /** Newest first, over every queue; `offset + limit` jobs are read from each queue. */
  async list(opts: { states?: JobState[]; queue?: string; offset: number; limit: number }): Promise<{ items: JobView[]; more: boolean }> {
    const states = (opts.states?.length ? opts.states : JOB_STATES) as JobType[];
    const want = opts.offset + opts.limit + 1;
    const all: { job: Job }[] = [];
    for (const q of this.queues()) {
      if (opts.queue && q.name !== opts.queue) continue;
      for (const job of await q.getJobs(states, 0, want - 1, false)) if (job) all.push({ job });
    }
    all.sort((a, b) => b.job.timestamp - a.job.timestamp || String(b.job.id).localeCompare(String(a.job.id)));
    const page = all.slice(opts.offset, opts.offset + opts.limit);
    return { items: await Promise.all(page.map((j) => jobView(j.job))), more: all.length > opts.offset + opts.limit };
  }

  /** Jobs not yet finished whose payload names `vm` (backups) on `queue`. */
  async pendingFor(queue: Queue, vm: string): Promise<JobView[]> {
    const jobs = await queue.getJobs(['active', 'waiting', 'delayed', 'prioritized'], 0, 999, true);
    const mine = jobs.filter((j): j is Job => !!j && (j.data as { vm?: unknown })?.vm === vm);
    return Promise.all(mine.map((j) => jobView(j)));
  }
}

/**
 * The error code of a failed job. BullMQ keeps only a failed job's message and
 * stack; the code (NOT_FOUND, IMAGE_LOCKED, STORAGE…) is what metrics count and
 * alerts and the status report show, so the worker appends it to the job's log
 * (kept and removed with the job) at each failed attempt; the last line is the
 * final one. Any process can read it back from Redis.
 */
import { DelayedError, UnrecoverableError, type Job, type Queue } from 'bullmq';
import { errnoCode, VmvaultError } from '../errors.js';

const MARK = 'vmvault-error-code ';

/** The code recorded for an error; undefined for a job postponed, not failed. */
export function errorCodeOf(err: unknown): string | undefined {
  if (err instanceof DelayedError) return undefined;
  if (err instanceof VmvaultError) return err.code;
  if (err instanceof UnrecoverableError) return 'BAD_INPUT'; // A payload the worker refused before running it.
  return errnoCode(err) ?? 'ERROR';
}

/** Appends the error's code to the job's log (best effort: a failure to do so loses only the code). */
export async function recordFailureCode(job: Job, err: unknown): Promise<void> {
  const code = errorCodeOf(err);
  if (code) await job.log(`${MARK}${code}`).catch(() => {});
}

/** The code of the job's last failed attempt, or 'UNKNOWN' (e.g. a job failed for stalling, with no attempt of its own). */
export async function failureCode(queue: Queue, jobId: string): Promise<string> {
  const { logs } = await queue.getJobLogs(jobId, 0, -1, true);
  for (let i = logs.length - 1; i >= 0; i--) if (logs[i]!.startsWith(MARK)) return logs[i]!.slice(MARK.length);
  return 'UNKNOWN';
}

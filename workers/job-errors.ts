/**
 * How a failed job is retried: the one decision between "retry with backoff" and
 * "fail now with the reason". A permanent failure (missing disk, bad request, wrong
 * key…) becomes BullMQ's UnrecoverableError, so the job fails at once with the
 * message an operator can act on. Everything else is retried up to the job's
 * attempts: an error we cannot classify costs a few retries, while a transient error
 * wrongly taken as permanent would cost a backup.
 */
import { DelayedError, UnrecoverableError } from 'bullmq';
import { VmvaultError, type ErrorCode } from '../src/errors.js';

/**
 * Codes that no retry can fix. IMAGE_LOCKED is here: an `image`-driver VM whose disk
 * a running QEMU holds stays running for hours; retrying for minutes only delays
 * the message that it needs the `qemu` driver (or to be stopped).
 */
export const PERMANENT_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'NOT_FOUND', 'BAD_INPUT', 'IMAGE_LOCKED', 'UNSUPPORTED', 'WRONG_PASSWORD', 'NO_REPOSITORY',
  'BAD_REPOSITORY_URL', 'ALREADY_EXISTS', 'AMBIGUOUS', 'INTEGRITY', 'UNSAFE_IMAGE',
  // A drill that failed has recorded boot-failed: booting again would say the same.
  'DRILL_FAILED',
]);

export function isPermanent(err: unknown): boolean {
  return err instanceof VmvaultError && !err.retriable && PERMANENT_CODES.has(err.code);
}

/** The error a processor throws to BullMQ for `err`. */
export function toJobError(err: unknown): Error {
  if (err instanceof UnrecoverableError || err instanceof DelayedError) return err;
  if (isPermanent(err)) return new UnrecoverableError((err as Error).message);
  return err instanceof Error ? err : new Error(String(err));
}

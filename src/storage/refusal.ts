/**
 * The one place that decides whether a storage error means "this repository refuses
 * writes", and why: read-only (a read-only mount, file permissions, S3 credentials
 * without s3:PutObject) or full (no space, quota). Read paths use it to go on without
 * a lock (repo/locks.ts), garbage collection to free space before it locks (repo/gc.ts).
 *
 * Backends and wrappers keep the original error as `cause` (local.ts, s3.ts, retry.ts),
 * so the decision looks along the cause chain instead of at messages.
 */

export type WriteRefusal = 'read-only' | 'full';

const READ_ONLY_ERRNO = new Set(['EROFS', 'EACCES', 'EPERM']);
const FULL_ERRNO = new Set(['ENOSPC', 'EDQUOT']);
/** S3 error names of a request the credentials may not make; 403 without a name means the same. */
const S3_DENIED = new Set(['AccessDenied', 'Forbidden', 'AllAccessDisabled']);

/** `err` and the errors it wraps (`cause`), outermost first; cycles are cut. */
function* causes(err: unknown): Generator<object> {
  const seen = new Set<unknown>();
  for (let e = err; e !== null && typeof e === 'object' && !seen.has(e); e = (e as { cause?: unknown }).cause) {
    seen.add(e);
    yield e;
  }
}

/** The first errno-style code (`ENOSPC`, `EROFS`…) along the cause chain, if any. */
export function errnoInChain(err: unknown): string | undefined {
  for (const e of causes(err)) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  }
  return undefined;
}

/** Whether `err` (from a put or delete) says the repository refuses writes, and why. */
export function writeRefusal(err: unknown): WriteRefusal | undefined {
  const code = errnoInChain(err);
  if (code && READ_ONLY_ERRNO.has(code)) return 'read-only';
  if (code && FULL_ERRNO.has(code)) return 'full';
  for (const e of causes(err)) {
    const s3 = e as { name?: unknown; $metadata?: { httpStatusCode?: unknown } };
    if (typeof s3.name === 'string' && S3_DENIED.has(s3.name)) return 'read-only';
    if (s3.$metadata?.httpStatusCode === 403) return 'read-only';
  }
  return undefined;
}

/** An Error carrying an errno code, shaped like Node's own. */
export function errnoError(code: string, message: string): Error {
  return Object.assign(new Error(`${code}: ${message}`), { code });
}

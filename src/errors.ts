/**
 * Named errors with a stable `code` and a message an operator can act on.
 * Every layer throws these; the CLI prints `error: <message>` and exits non-zero,
 * the API maps codes to HTTP statuses.
 */
export type ErrorCode =
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'BAD_REPOSITORY_URL'
  | 'NO_REPOSITORY'
  | 'WRONG_PASSWORD'
  | 'BAD_INPUT'
  | 'INTEGRITY'
  | 'IMAGE_LOCKED'
  /** An image's metadata names another host file (backing, data file, extent) or its format changed: refused. */
  | 'UNSAFE_IMAGE'
  | 'UNSUPPORTED'
  | 'STORAGE'
  | 'NBD'
  | 'QEMU'
  | 'AMBIGUOUS'
  /** A restore drill booted the backup and the guest did not come up (recorded as boot-failed). */
  | 'DRILL_FAILED'
  /** vmvault itself failed (a worker thread died): nothing was committed; running the operation again may succeed. */
  | 'INTERNAL'
  | 'LOCKED';

export class VmvaultError extends Error {
  readonly code: ErrorCode;
  /** True when retrying the same operation may succeed (network, throttling, 5xx). */
  readonly retriable: boolean;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; retriable?: boolean }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'VmvaultError';
    this.code = code;
    this.retriable = options?.retriable ?? false;
  }
}

/** An object (storage key, backup, disk, VM…) does not exist. */
export class NotFoundError extends VmvaultError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('NOT_FOUND', message, options);
    this.name = 'NotFoundError';
  }
}

/** Stored data failed authentication or its id did not match its content. */
export class IntegrityError extends VmvaultError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('INTEGRITY', message, options);
    this.name = 'IntegrityError';
  }
}

/**
 * The storage service asks us to send fewer requests (S3 `SlowDown`, HTTP 503 or 429):
 * retriable, and a sign to lower concurrency (storage/throttle.ts), not a failure.
 */
export class ThrottledError extends VmvaultError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('STORAGE', message, { ...options, retriable: true });
    this.name = 'ThrottledError';
  }
}

const THROTTLE_NAMES = ['SlowDown', 'Throttling', 'ThrottlingException', 'RequestLimitExceeded', 'TooManyRequestsException', 'ServiceUnavailable', 'RequestThrottled'];

/** True when `err` is the service asking for fewer requests: see ThrottledError. */
export function isThrottling(err: unknown): boolean {
  if (err instanceof ThrottledError) return true;
  if (err instanceof VmvaultError) return false;
  const e = err as { name?: unknown; $metadata?: { httpStatusCode?: number } } | null;
  if (!e || typeof e !== 'object') return false;
  const status = e.$metadata?.httpStatusCode;
  return status === 503 || status === 429 || (typeof e.name === 'string' && THROTTLE_NAMES.includes(e.name));
}

/** The one place that decides whether an error is worth retrying. */
export function isRetriable(err: unknown): boolean {
  if (err instanceof VmvaultError) return err.retriable;
  const e = err as { code?: unknown; name?: unknown; $metadata?: { httpStatusCode?: number }; $retryable?: unknown } | null;
  if (!e || typeof e !== 'object') return false;
  const status = e.$metadata?.httpStatusCode;
  if (typeof status === 'number' && (status >= 500 || status === 429)) return true;
  if (e.$retryable) return true;
  const code = typeof e.code === 'string' ? e.code : '';
  const name = typeof e.name === 'string' ? e.name : '';
  const transient = ['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_SOCKET'];
  if (transient.includes(code)) return true;
  return isThrottling(err) || ['RequestTimeout', 'RequestTimeTooSkewed', 'InternalError', 'TimeoutError'].includes(name);
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A Node system error's code (`ENOENT`, `EACCES`, …), or undefined for anything else. */
export function errnoCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

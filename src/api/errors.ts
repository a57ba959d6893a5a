/**
 * API errors: every failure is `{"error": {"code", "message", "details"}}` with the
 * status its code implies. Codes are the library's (src/errors.ts) plus the API's own
 * (UNAUTHORIZED, FORBIDDEN, ROUTE_NOT_FOUND, BAD_REQUEST, PAYLOAD_TOO_LARGE,
 * RANGE_NOT_SATISFIABLE, UNAVAILABLE). Messages never carry tokens or passphrases.
 */
import type { Context } from 'hono';
import { HTTPException } from 'hono/http-exception';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { errorMessage, VmvaultError, type ErrorCode } from '../errors.js';
import { API_COMMAND_TIMEOUT_MS } from '../queue/connection.js';

export class ApiError extends Error {
  constructor(readonly status: ContentfulStatusCode, readonly code: string, message: string, readonly details?: unknown) {
    super(message);
    this.name = 'ApiError';
  }
}

const STATUS: Record<ErrorCode, ContentfulStatusCode> = {
  NOT_FOUND: 404,
  ALREADY_EXISTS: 409,
  BAD_REPOSITORY_URL: 400,
  NO_REPOSITORY: 503,
  WRONG_PASSWORD: 503,
  BAD_INPUT: 400,
  INTEGRITY: 500,
  IMAGE_LOCKED: 409,
  UNSAFE_IMAGE: 422,
  UNSUPPORTED: 400,
  STORAGE: 503,
  NBD: 500,
  QEMU: 500,
  DRILL_FAILED: 500,
  INTERNAL: 500,
  AMBIGUOUS: 400,
  LOCKED: 409,
};

/** Any thrown value as an ApiError; an unexpected one becomes a 500 whose message is logged, not shown. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  // Hono's own refusals (e.g. a body that is not JSON) carry their status.
  if (err instanceof HTTPException) return new ApiError(err.status as ContentfulStatusCode, err.status === 400 ? 'BAD_REQUEST' : 'HTTP', err.message);
  if (err instanceof VmvaultError) return new ApiError(STATUS[err.code] ?? 500, err.code, err.message);
  if (isRedisSilent(err)) return new ApiError(503, 'UNAVAILABLE', `the queue (Redis) did not answer within ${API_COMMAND_TIMEOUT_MS / 1000} s: check that redis-server runs and is not stopped or overloaded. A request that enqueues work may still take effect once Redis answers again: look at the job list before sending it again`);
  if (isRedisDown(err)) return new ApiError(503, 'UNAVAILABLE', `the queue (Redis) is unreachable: ${errorMessage(err)}; check that redis-server runs and redis.url in the configuration`);
  return new ApiError(500, 'INTERNAL', 'internal error: see the service log');
}

/**
 * ioredis's own words for a lost connection. A bare ENOENT or ECONNREFUSED is not
 * enough: a missing file (e.g. the policies directory) would be reported as Redis
 * being down, with the file's path shown to the client.
 */
/** ioredis' commandTimeout: the server kept the connection and did not answer. */
function isRedisSilent(err: unknown): boolean {
  return /^Command timed out$/.test(errorMessage(err));
}

function isRedisDown(err: unknown): boolean {
  const m = errorMessage(err);
  return /^connect (ECONNREFUSED|ENOENT|ETIMEDOUT)\b|Connection is closed|max retries per request|Stream isn't writeable/i.test(m);
}

export function errorBody(e: ApiError): { error: { code: string; message: string; details?: unknown } } {
  return { error: { code: e.code, message: e.message, ...(e.details !== undefined ? { details: e.details } : {}) } };
}

export function sendError(c: Context, e: ApiError): Response {
  return c.json(errorBody(e), e.status);
}

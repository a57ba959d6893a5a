/**
 * What every route module shares: the app's environment, the helpers that declare a
 * route with its role and its answers (the OpenAPI document is made from them), and
 * the context the modules' handlers work with (built once by ../app.ts).
 */
import { OpenAPIHono, createRoute, z, type RouteConfig } from '@hono/zod-openapi';
import type { Job, Queue } from 'bullmq';
import type { RedisConnection } from '../../queue/connection.js';
import type { Context, MiddlewareHandler } from 'hono';
import type { Logger } from 'pino';
import type { Config, VmConfig } from '../../config/schema.js';
import type { Catalogue, CatalogueEntry } from '../../repo/catalogue.js';
import type { Repository } from '../../repo/repository.js';
import type { VerificationState } from '../../repo/health.js';
import { allows, type Principal, type Role } from '../auth.js';
import { ApiError } from '../errors.js';
import type { JobIndex, JobView } from '../jobs.js';
import * as S from '../schemas.js';

export type Env = { Variables: { principal?: Principal } };

/** The app a route module registers on. */
export type ApiApp = OpenAPIHono<Env>;


/** What the handlers share, built once per app. */
export interface RouteContext {
  config: Config;
  repo: Repository;
  /** A producer connection (fails fast when Redis is down). */
  redis: RedisConnection;
  log: Logger;
  /** Seconds since the epoch. */
  now: () => number;
  catalogue: Catalogue;
  /** Backups as the API shows them: with their verification state. */
  shown(entries: CatalogueEntry[]): Promise<(CatalogueEntry & { verification: VerificationState | null })[]>;
  /** Every backup's verification state (cached briefly), as `shown` and the status report use it. */
  verification(): Promise<Map<string, VerificationState>>;
  /** Every host the configuration names, sorted. */
  hosts: string[];
  queueOf(host: string): Queue;
  maintenance: Queue;
  jobs: JobIndex;
  /** The VM of the inventory, or NotFoundError naming the known ones. */
  vmOf(name: string): VmConfig;
  /**
   * Enqueues a job with `add(jobId)` under the id the request calls for (jobs.ts
   * requestJobId: from its Idempotency-Key header, if any). A retried request gets the job
   * its first try made, with the header Idempotent-Replayed: true; the same key with
   * another request is refused (422).
   */
  enqueue(c: Context<Env>, queue: Queue, kind: string, add: (jobId: string) => Promise<Job>): Promise<Job>;
  /** The answer to a request that enqueued `job` (a replayed one as it is now). */
  accepted(job: Job): Promise<{ job: JobView }>;
  /** Runs `fn` when the API closes (after the server has stopped). */
  onClose(fn: () => Promise<void>): void;
  /** SLOT_HOLD_MAX_MS of the disk routes (tests shorten it). */
  wholeResponseHoldMs?: number;
}

export const json = <T extends z.ZodType>(schema: T, description: string) => ({ content: { 'application/json': { schema } }, description });
export const errors = {
  400: json(S.ErrorSchema, 'bad request'),
  401: json(S.ErrorSchema, 'no or unknown bearer token'),
  403: json(S.ErrorSchema, 'the token\'s role may not do this'),
  404: json(S.ErrorSchema, 'not found'),
  503: json(S.ErrorSchema, 'Redis or the repository is unreachable'),
};
export const binary = (description: string) => ({ content: { 'application/octet-stream': { schema: z.string().openapi({ format: 'binary' }) } }, description });
export const body = <T extends z.ZodType>(schema: T, required = true) => ({ body: { content: { 'application/json': { schema } }, required } });

/** A route that needs `role` ('none': no token, e.g. health and signed links); the role is stated in its description. */
export function route<const R extends RouteConfig>(r: R & { role: Role | 'none' }): R {
  const { role, ...rest } = r;
  return createRoute({
    ...rest,
    ...(role === 'none' ? { security: [] } : {}),
    description: [rest.description, role === 'none' ? undefined : `Role: ${role}.`].filter(Boolean).join(' '),
    middleware: role === 'none' ? [] : [requireRole(role)],
  } as unknown as R);
}

function requireRole(role: Role): MiddlewareHandler<Env> {
  return async (c, next) => {
    const p = c.get('principal');
    if (!p) throw new ApiError(401, 'UNAUTHORIZED', 'a bearer token is required: send Authorization: Bearer TOKEN');
    if (!allows(p.role, role)) throw new ApiError(403, 'FORBIDDEN', `this needs the ${role} role; token "${p.name}" has the ${p.role} role`);
    await next();
  };
}

export function pageOf<T>(all: T[], q: { limit: number; cursor?: string | undefined }): { items: T[]; nextCursor: string | null } {
  const offset = q.cursor ? Number(q.cursor) : 0;
  const items = all.slice(offset, offset + q.limit);
  return { items, nextCursor: offset + q.limit < all.length ? String(offset + q.limit) : null };
}

export const vmView = (v: VmConfig) => ({
  name: v.name, host: v.host, driver: v.driver, configFiles: v.configFiles, tags: v.tags,
  disks: v.disks.map((d) => ({ name: d.name, path: d.path, ...(d.format ? { format: d.format } : {}) })),
});

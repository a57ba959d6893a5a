/**
 * The HTTP API (Hono, versioned under /v1, JSON everywhere). Routes are declared
 * with their zod schemas (./schemas.ts), which both validate requests and make the
 * OpenAPI document; each resource's routes live in ./routes/. This file is the
 * wiring: the shared context, logging, path checks, authentication, body limits,
 * errors and the OpenAPI document. Every route needs a bearer token except
 * `GET /v1/health`, the signed disk links (`/v1/links/…`, which carry their own
 * signature) and the web dashboard's static page and scripts (`/`, `/ui/…`).
 *
 * The API never touches a hypervisor's disks: backups, restores and maintenance are
 * jobs on the queues (a restore runs on the worker of the host that receives it).
 * It reads the repository itself to list backups and to stream a backed-up disk to
 * a client that has no worker (e.g. `qemu-img convert -f raw http://…`).
 */
import { OpenAPIHono } from '@hono/zod-openapi';
import type { RedisConnection } from '../queue/connection.js';
import type { Job } from 'bullmq';
import { bodyLimit } from 'hono/body-limit';
import type { Logger } from 'pino';
import type { Config } from '../config/schema.js';
import { errorMessage, NotFoundError } from '../errors.js';
import { QueueSet } from '../queue/enqueue.js';
import { Catalogue, type CatalogueEntry } from '../repo/catalogue.js';
import { VerificationCache } from '../repo/health.js';
import type { Repository } from '../repo/repository.js';
import { TokenTable } from './auth.js';
import { ApiError, sendError, toApiError } from './errors.js';
import { JobIndex, earlierJob, jobView, refuseKeyElsewhere, requestJobId } from './jobs.js';
import { backupRoutes, registerBackups } from './routes/backups.js';
import type { Env, RouteContext } from './routes/common.js';
import { isDashboardPath, registerDashboard } from './routes/dashboard.js';
import { diskRoutes, registerDisksLinks } from './routes/disks-links.js';
import { healthRoutes, registerHealth } from './routes/health.js';
import { jobRoutes, registerJobs } from './routes/jobs.js';
import { maintenanceRoutes, registerMaintenance } from './routes/maintenance.js';
import { policyRoutes, registerPolicies } from './routes/policies.js';
import { registerSnapshots, snapshotRoutes } from './routes/snapshots.js';
import { registerVms, vmRoutes } from './routes/vms.js';

import { EXPORT_ROUTES, registerExportRoutes } from './routes/exports.js';
import { registerVmInventory, vmInventoryRoutes } from './routes/vm-inventory.js';
import type { VmInventory } from '../config/inventory.js';
import { registerStatusRoute, statusRoute } from './routes/status.js';
import { registerMetricsRoute } from './routes/metrics.js';

export { checkRestoreDirectory } from './routes/backups.js';
export { headerSafeName, qemuImgCommand } from './routes/disks-links.js';

export interface ApiDeps {
  config: Config;
  repo: Repository;
  /** A producer connection (fails fast when Redis is down); the caller closes it. */
  redis: RedisConnection;
  log: Logger;
  /** Seconds since the epoch (tests move time). */
  now?: () => number;
  /** SLOT_HOLD_MAX_MS (tests shorten it). */
  wholeResponseHoldMs?: number;
  /** The live inventory (config.vms kept up to date); POST/DELETE /v1/vms need it. */
  inventory?: VmInventory;
}

export interface Api {
  app: OpenAPIHono<Env>;
  close(): Promise<void>;
}

/** Largest request body: policies are the biggest thing anyone sends. */
export const MAX_BODY_BYTES = 256 * 1024;

const ROUTES = { ...healthRoutes, ...vmRoutes, ...snapshotRoutes, ...backupRoutes, ...diskRoutes, ...jobRoutes, ...policyRoutes, ...maintenanceRoutes };

/** Every path the API serves, for checks of the OpenAPI document. */
export const API_ROUTES = [...[...Object.values(ROUTES), ...Object.values(vmInventoryRoutes), statusRoute].map((r) => ({ method: r.method, path: r.path })), ...EXPORT_ROUTES, { method: 'get', path: '/v1/openapi.json' }];

/**
 * Every resource's routes, in the order of the OpenAPI document. A new resource is a
 * module in ./routes/ exporting its route declarations (spread into ROUTES above, for
 * API_ROUTES) and `registerX(app, ctx)` (added here); its `XApp` type serves hono/client.
 */
const REGISTER: ((app: OpenAPIHono<Env>, ctx: RouteContext) => unknown)[] = [
  registerHealth, registerVms, registerSnapshots, registerBackups, registerDisksLinks, registerJobs, registerPolicies, registerMaintenance, registerExportRoutes,
];

export function createApi(deps: ApiDeps): Api {
  const { config, repo, log } = deps;
  const ctx = createContext(deps);
  const tokens = new TokenTable(config.api.tokens);

  const app = new OpenAPIHono<Env>({
    strict: true,
    defaultHook: (result, c) => {
      if (result.success) return undefined;
      const issues = result.error.issues.map((i) => ({ path: i.path.join('.'), message: i.message }));
      return sendError(c, new ApiError(400, 'BAD_REQUEST', `invalid request: ${issues.map((i) => `${i.path || '(body)'}: ${i.message}`).join('; ')}`, issues));
    },
  });
  app.openAPIRegistry.registerComponent('securitySchemes', 'bearer', { type: 'http', scheme: 'bearer' });

  app.onError((err, c) => {
    const e = toApiError(err);
    if (e.status >= 500) log.error({ err: errorMessage(err), method: c.req.method, path: redact(c.req.path) }, 'request failed');
    return sendError(c, e);
  });
  app.notFound((c) => sendError(c, new ApiError(404, 'ROUTE_NOT_FOUND', `no route ${c.req.method} ${redact(c.req.path)}: see GET /v1/openapi.json`)));

  // Logging first, so refused requests are logged too; never the Authorization header or a link token.
  app.use('*', async (c, next) => {
    const started = Date.now();
    await next();
    log.info({ method: c.req.method, path: redact(c.req.path), status: c.res.status, ms: Date.now() - started, token: c.get('principal')?.name }, 'request');
  });
  app.use('*', async (c, next) => {
    const raw = rawPath(c.req.url);
    // One spelling per route: no empty, "." or ".." segments and no encoded separators, so no variant slips past a check.
    if (/\/\/|\/\.\.?(\/|$)|%2f|%5c|%2e|\\/i.test(raw)) {
      throw new ApiError(400, 'BAD_REQUEST', 'malformed path: empty, "." or ".." segments and encoded "/", "\\" or "." are not accepted');
    }
    const method = c.req.method;
    // The dashboard's page and scripts hold no data: they are public; its API calls carry the token.
    const open = (method === 'GET' || method === 'HEAD') && (raw === '/v1/health' || /^\/v1\/links\/[^/]+$/.test(raw) || isDashboardPath(raw));
    if (!open) {
      const p = tokens.authenticate(c.req.header('authorization'));
      if (!p) {
        c.header('WWW-Authenticate', 'Bearer realm="vmvault"');
        throw new ApiError(401, 'UNAUTHORIZED', c.req.header('authorization') ? 'the bearer token is not known: check it, or ask for one to be added to api.tokens' : 'a bearer token is required: send Authorization: Bearer TOKEN');
      }
      c.set('principal', p);
    }
    await next();
  });
  app.use('*', bodyLimit({
    maxSize: MAX_BODY_BYTES,
    // The rest of the body is not read: the connection cannot carry another request.
    onError: (c) => {
      c.header('Connection', 'close');
      return sendError(c, new ApiError(413, 'PAYLOAD_TOO_LARGE', `request bodies are limited to ${MAX_BODY_BYTES} bytes`));
    },
  }));

  for (const register of REGISTER) register(app, ctx);
  registerVmInventory(app, deps.inventory);
  registerDashboard(app);
  // Status and metrics read shared state only (src/ops/): the repository, queues, heartbeats.
  const statusSources = { config, redis: deps.redis, backups: () => ctx.catalogue.list(), unreadable: () => ctx.catalogue.unreadable(), verification: ctx.verification, queueOf: ctx.queueOf, maintenance: ctx.maintenance };
  registerStatusRoute(app, statusSources);
  registerMetricsRoute(app, statusSources);

  registerStatusRoute(app, statusSources);
  registerMetricsRoute(app, statusSources);

  app.doc31('/v1/openapi.json', {
    openapi: '3.1.0',
    info: { title: 'vmvault', version: '1', description: 'Backups, restores and jobs of vmvault. Authenticate with Authorization: Bearer TOKEN (roles: viewer < operator < admin).' },
    security: [{ bearer: [] }],
  });

  return { app, close: ctx.close };
}

/** What the route modules share: the catalogue, the queues and the inventory. */
function createContext(deps: ApiDeps): RouteContext & { close(): Promise<void> } {
  const { config, repo } = deps;
  const catalogue = new Catalogue(repo);
  const verification = new VerificationCache(repo);
  const queues = new QueueSet(deps.redis);
  const { of: queueOf, maintenance } = queues;
  const hosts = [...new Set([config.host, ...Object.keys(config.hosts), ...config.vms.map((v) => v.host)])].sort();
  const closers: (() => Promise<void>)[] = [];
  // Jobs a request found made by its earlier try (RouteContext.enqueue): shown in their state of now.
  const replays = new WeakSet<Job>();
  return {
    config, repo, redis: deps.redis, log: deps.log, catalogue, hosts, queueOf, maintenance,
    now: deps.now ?? (() => Date.now() / 1000),
    ...(deps.wholeResponseHoldMs !== undefined ? { wholeResponseHoldMs: deps.wholeResponseHoldMs } : {}),
    jobs: new JobIndex(() => [...hosts.map(queueOf), maintenance]),
    verification: () => verification.get(),
    shown: async (entries: CatalogueEntry[]) => {
      const states = await verification.get();
      return entries.map((b) => ({ ...b, verification: states.get(b.id) ?? null }));
    },
    vmOf: (name) => {
      // config.vms is live: the VM file of the state directory adds to it while the service runs.
      const vm = config.vms.find((v) => v.name === name);
      if (!vm) throw new NotFoundError(`VM "${name}" is not in the inventory; known VMs: ${config.vms.map((v) => v.name).join(', ') || '(none)'}`);
      return vm;
    },
    enqueue: async (c, queue, kind, add) => {
      const key = c.req.header('idempotency-key');
      const id = requestJobId(kind, key, c.get('principal')?.name ?? '');
      if (key !== undefined) await refuseKeyElsewhere(id, queue, [...hosts.map(queueOf), maintenance]);
      const added = await add(id);
      const earlier = key === undefined ? undefined : await earlierJob(queue, added);
      if (!earlier) return added;
      c.header('Idempotent-Replayed', 'true');
      replays.add(earlier);
      return earlier;
    },
    accepted: async (job) => ({ job: await jobView(job, replays.has(job) ? undefined : 'waiting') }),
    onClose: (fn) => { closers.push(fn); },
    close: async () => {
      for (const fn of closers) await fn();
      await queues.close();
    },
  };
}

function rawPath(url: string): string {
  const afterScheme = url.indexOf('://');
  const start = url.indexOf('/', afterScheme < 0 ? 0 : afterScheme + 3);
  if (start < 0) return '/';
  const q = url.indexOf('?', start);
  return url.slice(start, q < 0 ? undefined : q);
}

/**
 * A path fit for logs and messages: signed-link tokens are credentials. Any spelling
 * (`//v1/links/…`, `/V1/links/…`) is redacted, since a refused one still carries the token.
 */
export function redact(path: string): string {
  return path.replace(/(\/links\/)[^/]+/gi, '$1(redacted)');
}

/**
 * The HTTP API (Hono, versioned under /v1, JSON everywhere). Routes are declared
 * with their zod schemas (./schemas.ts), which both validate requests and make the
 * OpenAPI document. Every route needs a bearer token except `GET /v1/health` and
 * the signed disk links (`/v1/links/…`, which carry their own signature).
 *
 * The API never touches a hypervisor's disks: backups, restores and maintenance are
 * jobs on the queues (a restore runs on the worker of the host that receives it).
 * It reads the repository itself to list backups and to stream a backed-up disk to
 * a client that has no worker (e.g. `qemu-img convert -f raw http://…`).
 */
import type { ServerResponse } from 'node:http';
import { posix } from 'node:path';
import { OpenAPIHono, createRoute, z, type RouteConfig } from '@hono/zod-openapi';
import type { Queue } from 'bullmq';
import type { MiddlewareHandler } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import type { Logger } from 'pino';
import type { Config, VmConfig } from '../config/schema.js';
import { errorMessage, NotFoundError, VmvaultError } from '../errors.js';
import { enqueueBackup, enqueueMaintenance, enqueueRestore, enqueueSnapshot, hostQueue, maintenanceQueue } from '../queue/enqueue.js';
import type { RedisConnection } from '../queue/connection.js';
import { backupPayloadFor, snapshotPayloadFor } from '../queue/payloads.js';
import { assertSnapshotName, expiryFrom } from '../vm/snapshots.js';
import { Catalogue, type CatalogueEntry } from '../repo/catalogue.js';
import { VerificationCache } from '../repo/health.js';
import type { Repository } from '../repo/repository.js';
import type { Manifest } from '../repo/manifest.js';
import { DiskReader } from '../pipeline/disk-reader.js';
import { assertSafeName } from '../pipeline/names.js';
import { checkPolicyText, formatProblem, loadPolicies } from '../policy/load.js';
import { allows, TokenTable, type Principal, type Role } from './auth.js';
import { ApiError, errorBody, sendError, toApiError } from './errors.js';
import { Limiter } from './bounded.js';
import { PromiseLru } from '../pipeline/lru.js';
import { JobIndex, jobView, newJobId } from './jobs.js';
import { linkKey, signLink, verifyLink } from './links.js';
import { parseRange } from './range.js';
import * as S from './schemas.js';

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
}

export interface Api {
  app: OpenAPIHono<Env>;
  close(): Promise<void>;
}

type Env = { Variables: { principal?: Principal } };

/** Ranges up to this size are read whole before the response starts. */
const WHOLE_RESPONSE_BYTES = 16 * 1024 * 1024;

/**
 * Whole responses in memory at once, from assembly until the client has read them.
 * More would let a burst of Range requests, from one link holder, exhaust the memory
 * of the process that also runs the scheduler (150 at once took 2 GB); the rest wait.
 * QEMU's curl driver has at most 8 requests in flight.
 */
const WHOLE_RESPONSES_AT_ONCE = 8;

/**
 * How long a whole response may take to leave while other requests wait for a slot.
 * Its buffer lives until the client has read it, so the slot is held as long, and a
 * client too slow for this (16 MiB in 30 s is 0.5 MiB/s) is disconnected once someone
 * else waits: handing its slot on while it kept its buffer let paused clients hold a
 * new 128 MiB every 30 s. QEMU gives up on a request after 5 s by default anyway.
 */
const SLOT_HOLD_MAX_MS = 30_000;

/** After SLOT_HOLD_MAX_MS, how often a slow whole response looks for requests waiting for its slot. */
const SLOT_WAIT_CHECK_MS = 1000;

/** Manifests kept decoded for the disk routes (a 1 TiB disk's weighs about 30 MB in memory). */
const MANIFESTS_KEPT = 4;

/** Snapshot lists asked within this window share one host job. */
const LIST_SHARE_MS = 5000;

/** How long GET …/snapshots waits for the host to answer. */
const LIST_WAIT_MS = 30_000;

/** Largest request body: policies are the biggest thing anyone sends. */
export const MAX_BODY_BYTES = 256 * 1024;

const json = <T extends z.ZodType>(schema: T, description: string) => ({ content: { 'application/json': { schema } }, description });
const errors = {
  400: json(S.ErrorSchema, 'bad request'),
  401: json(S.ErrorSchema, 'no or unknown bearer token'),
  403: json(S.ErrorSchema, 'the token\'s role may not do this'),
  404: json(S.ErrorSchema, 'not found'),
  503: json(S.ErrorSchema, 'Redis or the repository is unreachable'),
};
const binary = (description: string) => ({ content: { 'application/octet-stream': { schema: z.string().openapi({ format: 'binary' }) } }, description });
/** The answers of a raw disk route (HEAD and Range supported). */
const rawDisk = { 200: binary('the whole raw disk'), 206: binary('the requested range'), 416: json(S.ErrorSchema, 'range not satisfiable') };
const body = <T extends z.ZodType>(schema: T, required = true) => ({ body: { content: { 'application/json': { schema } }, required } });

function route<R extends RouteConfig>(r: R & { role: Role | 'none' }): R {
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

const R = {
  health: route({ method: 'get', path: '/v1/health', role: 'none', summary: 'Is the service up', responses: { 200: json(S.HealthSchema, 'status'), 503: json(S.HealthSchema, 'degraded') } }),
  listVms: route({ method: 'get', path: '/v1/vms', role: 'viewer', summary: 'VMs of the inventory', request: { query: S.PageQuery }, responses: { 200: json(S.VmPage, 'VMs'), ...errors } }),
  getVm: route({ method: 'get', path: '/v1/vms/{vm}', role: 'viewer', summary: 'A VM with its last backup and its unfinished jobs', request: { params: S.VmParam }, responses: { 200: json(S.VmDetailSchema, 'the VM'), ...errors } }),
  backupVm: route({ method: 'post', path: '/v1/vms/{vm}/backups', role: 'operator', summary: 'Back up a VM now', request: { params: S.VmParam, ...body(S.BackupRequest, false) }, responses: { 202: json(S.JobAccepted, 'the backup job'), ...errors } }),
  createSnapshot: route({ method: 'post', path: '/v1/vms/{vm}/snapshots', role: 'operator', summary: 'Take a snapshot of a VM on its host (qcow2 internal when stopped, QMP snapshot-save when running)', request: { params: S.VmParam, ...body(S.SnapshotRequest) }, responses: { 202: json(S.JobAccepted, 'the snapshot job; its result is the snapshot'), ...errors } }),
  listSnapshots: route({ method: 'get', path: '/v1/vms/{vm}/snapshots', role: 'viewer', summary: 'Snapshots of a VM, as its host sees them', request: { params: S.VmParam }, responses: { 200: json(S.SnapshotList, 'the snapshots'), 504: json(S.ErrorSchema, 'the host did not answer in time (its worker is down or busy with this VM)'), ...errors } }),
  revertSnapshot: route({ method: 'post', path: '/v1/vms/{vm}/snapshots/{name}/revert', role: 'operator', summary: 'Revert a VM to a snapshot', request: { params: S.SnapshotParam }, responses: { 202: json(S.JobAccepted, 'the revert job'), ...errors } }),
  deleteSnapshot: route({ method: 'delete', path: '/v1/vms/{vm}/snapshots/{name}', role: 'operator', summary: 'Delete a snapshot', request: { params: S.SnapshotParam }, responses: { 202: json(S.JobAccepted, 'the delete job'), ...errors } }),
  listBackups: route({ method: 'get', path: '/v1/backups', role: 'viewer', summary: 'Backups, newest first', request: { query: S.BackupQuery }, responses: { 200: json(S.BackupPage, 'backups'), ...errors } }),
  getBackup: route({ method: 'get', path: '/v1/backups/{id}', role: 'viewer', summary: 'One backup', request: { params: S.BackupParam }, responses: { 200: json(S.BackupSchema, 'the backup'), ...errors } }),
  restore: route({ method: 'post', path: '/v1/backups/{id}/restore', role: 'operator', summary: 'Restore a backup onto a host (its worker writes the files)', request: { params: S.BackupParam, ...body(S.RestoreRequest) }, responses: { 202: json(S.JobAccepted, 'the restore job'), ...errors } }),
  disk: route({
    method: 'get', path: '/v1/backups/{id}/disks/{disk}', role: 'operator', summary: 'The raw image of one disk (HEAD and Range supported)',
    request: { params: S.DiskParam },
    responses: { ...rawDisk, ...errors },
  }),
  diskLink: route({ method: 'post', path: '/v1/backups/{id}/disks/{disk}/links', role: 'operator', summary: 'A short-lived signed URL to the raw image of one disk, usable without a bearer header', request: { params: S.DiskParam, ...body(S.LinkRequest, false) }, responses: { 201: json(S.LinkSchema, 'the link'), ...errors } }),
  link: route({
    method: 'get', path: '/v1/links/{token}', role: 'none', summary: 'A disk through a signed link (HEAD and Range supported)',
    request: { params: S.LinkParam },
    responses: {
      ...rawDisk,
      403: json(S.ErrorSchema, 'expired or altered link'),
      404: json(S.ErrorSchema, 'the backup or disk is gone'),
    },
  }),
  listJobs: route({ method: 'get', path: '/v1/jobs', role: 'viewer', summary: 'Jobs of every queue, newest first', request: { query: S.JobQuery }, responses: { 200: json(S.JobPage, 'jobs'), ...errors } }),
  getJob: route({ method: 'get', path: '/v1/jobs/{id}', role: 'viewer', summary: 'One job with its state, progress and result', request: { params: S.JobParam }, responses: { 200: json(S.JobSchema, 'the job'), ...errors } }),
  listPolicies: route({ method: 'get', path: '/v1/policies', role: 'viewer', summary: 'Policies of the policies directory, with the problems of invalid files', responses: { 200: json(S.PoliciesSchema, 'policies'), ...errors } }),
  validatePolicy: route({ method: 'post', path: '/v1/policies/validate', role: 'admin', summary: 'Validate the text of a policy file', request: body(S.PolicyValidateRequest), responses: { 200: json(S.PolicyValidateResult, 'the verdict, with every problem and its line'), ...errors } }),
  prune: route({ method: 'post', path: '/v1/maintenance/prune', role: 'admin', summary: 'Apply a policy\'s retention', request: body(S.PruneRequest), responses: { 202: json(S.JobAccepted, 'the prune job'), ...errors } }),
  gc: route({ method: 'post', path: '/v1/maintenance/gc', role: 'admin', summary: 'Delete chunks no backup references', request: body(S.GcRequest, false), responses: { 202: json(S.JobAccepted, 'the gc job'), ...errors } }),
  verify: route({ method: 'post', path: '/v1/maintenance/verify', role: 'admin', summary: 'Check backups (with readData: download and re-hash every chunk)', request: body(S.VerifyRequest, false), responses: { 202: json(S.JobAccepted, 'the verify job'), ...errors } }),
};

/** Every path the API serves, for checks of the OpenAPI document. */
export const API_ROUTES = [...Object.values(R).map((r) => ({ method: r.method, path: r.path })), { method: 'get', path: '/v1/openapi.json' }];

function pageOf<T>(all: T[], q: { limit: number; cursor?: string | undefined }): { items: T[]; nextCursor: string | null } {
  const offset = q.cursor ? Number(q.cursor) : 0;
  const items = all.slice(offset, offset + q.limit);
  return { items, nextCursor: offset + q.limit < all.length ? String(offset + q.limit) : null };
}

/** Is `dir` a clean absolute path (no `.`/`..` segments, no `//`, no NUL) inside one of `roots`? */
export function checkRestoreDirectory(dir: string, roots: readonly string[], host: string): void {
  if (!dir.startsWith('/') || dir.includes('\0')) throw new ApiError(400, 'BAD_INPUT', `directory "${dir}" must be an absolute path`);
  const segments = dir.split('/').slice(1);
  if (segments.some((s) => s === '..' || s === '.') || /\/\/|\/$/.test(dir) && dir !== '/') {
    throw new ApiError(400, 'BAD_INPUT', `directory "${dir}" must be a plain absolute path: no "..", "." or "//" segments, no trailing "/"`);
  }
  if (roots.length === 0) throw new ApiError(400, 'BAD_INPUT', `host "${host}" has no restoreRoots in the configuration: add hosts: { ${host}: { restoreRoots: [/var/lib/vmvault/restore] } }`);
  const clean = posix.normalize(dir);
  if (!roots.some((r) => clean === r || clean.startsWith(r.endsWith('/') ? r : `${r}/`))) {
    throw new ApiError(400, 'BAD_INPUT', `directory "${dir}" is outside host "${host}"'s restore roots (${roots.join(', ')})`, { restoreRoots: roots });
  }
}

export function createApi(deps: ApiDeps): Api {
  const { config, repo, log } = deps;
  const now = deps.now ?? (() => Date.now() / 1000);
  const tokens = new TokenTable(config.api.tokens);
  const key = linkKey(repo.keys.macKey);
  const catalogue = new Catalogue(repo);
  const verification = new VerificationCache(repo);
  /** Backups as the API shows them: with their verification state. */
  const shown = async (entries: CatalogueEntry[]) => {
    const states = await verification.get();
    return entries.map((b) => ({ ...b, verification: states.get(b.id) ?? null }));
  };
  const reader = new DiskReader(repo);
  const wholeResponses = new Limiter(WHOLE_RESPONSES_AT_ONCE);
  const manifests = new PromiseLru<Manifest>(MANIFESTS_KEPT);
  const vms = new Map(config.vms.map((v) => [v.name, v]));
  const hosts = [...new Set([config.host, ...Object.keys(config.hosts), ...config.vms.map((v) => v.host)])].sort();
  const queues = new Map<string, Queue>();
  const queueOf = (host: string) => {
    let q = queues.get(host);
    if (!q) queues.set(host, q = hostQueue(deps.redis, host));
    return q;
  };
  const maintenance = maintenanceQueue(deps.redis);
  const jobs = new JobIndex(() => [...hosts.map(queueOf), maintenance]);

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
    const open = (method === 'GET' || method === 'HEAD') && (raw === '/v1/health' || /^\/v1\/links\/[^/]+$/.test(raw));
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

  const vmOf = (name: string): VmConfig => {
    const vm = vms.get(name);
    if (!vm) throw new NotFoundError(`VM "${name}" is not in the inventory; known VMs: ${[...vms.keys()].join(', ') || '(none)'}`);
    return vm;
  };
  const vmView = (v: VmConfig) => ({
    name: v.name, host: v.host, driver: v.driver, configFiles: v.configFiles, tags: v.tags,
    disks: v.disks.map((d) => ({ name: d.name, path: d.path, ...(d.format ? { format: d.format } : {}) })),
  });
  const accepted = async (job: Awaited<ReturnType<typeof enqueueBackup>>) => ({ job: await jobView(job, 'waiting') });

  app.openapi(R.health, async (c) => {
    const [redis, repository] = await Promise.all([
      withTimeout(deps.redis.ping(), 2000).then(() => 'ok' as const, () => 'unreachable' as const),
      withTimeout(repo.storage.stat('config'), 5000).then(() => 'ok' as const, () => 'unreachable' as const),
    ]);
    const ok = redis === 'ok' && repository === 'ok';
    return c.json({ status: ok ? 'ok' as const : 'degraded' as const, redis, repository }, ok ? 200 : 503);
  });

  app.openapi(R.listVms, (c) => c.json(pageOf(config.vms.map(vmView), c.req.valid('query')), 200));

  app.openapi(R.getVm, async (c) => {
    const vm = vmOf(c.req.valid('param').vm);
    const mine = (await catalogue.list()).filter((b) => b.vm === vm.name);
    const pending = await jobs.pendingFor(queueOf(vm.host), vm.name);
    const state = pending.some((j) => j.state === 'active') ? 'running' as const : pending.length ? 'queued' as const : 'idle' as const;
    const [last] = await shown(mine.slice(0, 1));
    return c.json({ ...vmView(vm), state, lastBackup: last ?? null, backups: mine.length, jobs: pending }, 200);
  });

  app.openapi(R.backupVm, async (c) => {
    const vm = vmOf(c.req.valid('param').vm);
    const req = S.BackupRequest.parse(c.req.valid('json') ?? {});
    const job = await enqueueBackup(queueOf(vm.host), backupPayloadFor(vm, { labels: req.labels }), { jobId: newJobId('backup') });
    return c.json(await accepted(job), 202);
  });

  const snapshotGeneration = new Map<string, number>();
  const snapshotJob = async (vm: VmConfig, req: Parameters<typeof snapshotPayloadFor>[1], jobId = newJobId(`snapshot-${req.op}`)) => {
    if (req.name !== undefined) assertSnapshotName(req.name);
    if (req.expireIn !== undefined) expiryFrom(req.expireIn, new Date(), 'expireIn');
    if (req.op !== 'list') snapshotGeneration.set(vm.name, (snapshotGeneration.get(vm.name) ?? 0) + 1);
    return enqueueSnapshot(queueOf(vm.host), snapshotPayloadFor(vm, req), { jobId });
  };
  app.openapi(R.createSnapshot, async (c) => {
    const vm = vmOf(c.req.valid('param').vm);
    const req = c.req.valid('json');
    return c.json(await accepted(await snapshotJob(vm, { op: 'create', ...req })), 202);
  });
  app.openapi(R.listSnapshots, async (c) => {
    const vm = vmOf(c.req.valid('param').vm);
    // Lists asked within the same few seconds share one job, so a viewer cannot flood the host's queue;
    // a change made through this API starts a new generation, so it is never answered by an older list.
    const gen = snapshotGeneration.get(vm.name) ?? 0;
    const job = await snapshotJob(vm, { op: 'list' }, `api-snapshot-list-${vm.name}-${gen}-${Math.floor(Date.now() / LIST_SHARE_MS)}`);
    const done = await jobs.wait(queueOf(vm.host), job.id!, LIST_WAIT_MS);
    if (!done) throw new ApiError(504, 'TIMEOUT', `host "${vm.host}" did not list the snapshots within ${LIST_WAIT_MS / 1000} s: is its worker running? (job ${job.id})`, { job: job.id });
    if (done.state === 'failed') throw new ApiError(502, 'JOB_FAILED', done.error ?? 'the list job failed', { job: job.id });
    const result = done.result as { snapshots: z.output<typeof S.SnapshotSchema>[] };
    return c.json({ items: result.snapshots, job: job.id! }, 200);
  });
  app.openapi(R.revertSnapshot, async (c) => {
    const p = c.req.valid('param');
    return c.json(await accepted(await snapshotJob(vmOf(p.vm), { op: 'revert', name: p.name })), 202);
  });
  app.openapi(R.deleteSnapshot, async (c) => {
    const p = c.req.valid('param');
    return c.json(await accepted(await snapshotJob(vmOf(p.vm), { op: 'delete', name: p.name })), 202);
  });

  app.openapi(R.listBackups, async (c) => {
    const q = c.req.valid('query');
    const since = q.since ? Date.parse(q.since) : undefined;
    const all = (await catalogue.list()).filter((b) =>
      (!q.vm || b.vm === q.vm) && (!q.host || b.host === q.host) && (!q.label || b.labels.includes(q.label)) && (since === undefined || Date.parse(b.time) >= since));
    const page = pageOf(all, q);
    return c.json({ ...page, items: await shown(page.items) }, 200);
  });

  app.openapi(R.getBackup, async (c) => c.json((await shown([await catalogue.get(c.req.valid('param').id)]))[0]!, 200));

  app.openapi(R.restore, async (c) => {
    const b = await catalogue.get(c.req.valid('param').id);
    const req = c.req.valid('json');
    if (!hosts.includes(req.host)) throw new ApiError(400, 'BAD_INPUT', `unknown host "${req.host}"; known hosts: ${hosts.join(', ')}`);
    checkRestoreDirectory(req.directory, config.hosts[req.host]?.restoreRoots ?? [], req.host);
    for (const d of req.disks ?? []) {
      try {
        assertSafeName(d, 'disk name');
      } catch (err) {
        throw new ApiError(400, 'BAD_INPUT', errorMessage(err));
      }
      if (!b.disks.some((x) => x.name === d)) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${d}"; its disks are: ${b.disks.map((x) => x.name).join(', ')}`);
    }
    const job = await enqueueRestore(queueOf(req.host), {
      backupId: b.id, directory: req.directory, format: req.format as never, overwrite: req.overwrite, ...(req.disks ? { disks: req.disks } : {}),
    }, { jobId: newJobId('restore') });
    return c.json(await accepted(job), 202);
  });

  /**
   * Keeps a whole response's slot until the answer has left or the client is gone (its
   * buffer lives that long); past SLOT_HOLD_MAX_MS, a client still reading while others
   * wait is disconnected, which frees the buffer and the slot together.
   */
  let cutting = 0; // responses disconnected whose slots have not yet passed on to a waiter
  const holdUntilSent = (outgoing: ServerResponse, release: () => void): void => {
    let cut = false;
    let timer = setTimeout(function check() {
      if (wholeResponses.waiting > cutting) {
        cut = true;
        cutting++;
        outgoing.destroy();
      } else {
        timer = setTimeout(check, SLOT_WAIT_CHECK_MS).unref();
      }
    }, deps.wholeResponseHoldMs ?? SLOT_HOLD_MAX_MS).unref();
    outgoing.once('close', () => {
      clearTimeout(timer);
      if (cut) cutting--;
      release();
    });
  };

  const serveDisk = async (c: Parameters<Parameters<typeof app.openapi>[1]>[0], backupId: string, diskName: string): Promise<Response> => {
    // The catalogue first: a pruned backup is refused even while its manifest is still kept.
    const b = await catalogue.get(backupId);
    const manifest = await manifests.get(b.id, () => repo.loadManifest(b.id));
    const disk = manifest.disks.find((d) => d.name === diskName);
    if (!disk) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${diskName}"; its disks are: ${manifest.disks.map((d) => d.name).join(', ')}`);
    const size = disk.virtualSize;
    const file = headerSafeName(disk.name);
    const headers: Record<string, string> = {
      'Accept-Ranges': 'bytes', 'Content-Type': 'application/octet-stream', 'Cache-Control': 'no-store',
      ETag: `"${b.id.slice(0, 16)}-${file}"`, 'Content-Disposition': `attachment; filename="${file}.raw"`,
    };
    const range = parseRange(c.req.header('range'), size);
    if (range === 'unsatisfiable') {
      return c.json(errorBody(new ApiError(416, 'RANGE_NOT_SATISFIABLE', `the disk has ${size} bytes`)), 416, { 'Content-Range': `bytes */${size}` });
    }
    const [start, end, status] = range ? [range.start, range.end, 206 as const] : [0, size - 1, 200 as const];
    headers['Content-Length'] = String(size === 0 ? 0 : end - start + 1);
    if (range) headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
    if (c.req.method === 'HEAD' || size === 0) return new Response(null, { status, headers });
    // Block-device clients (QEMU's curl driver) read a few MiB per request: answer those in one piece,
    // headers and body together, and stream only large ranges.
    if (end - start + 1 <= WHOLE_RESPONSE_BYTES) {
      const release = await wholeResponses.acquire();
      let data: Buffer;
      try {
        data = await reader.read(disk, manifest.chunkSize, start, end);
      } catch (err) {
        release();
        throw err;
      }
      const outgoing = (c.env as { outgoing?: ServerResponse } | undefined)?.outgoing;
      if (outgoing && !outgoing.destroyed && !outgoing.writableFinished) holdUntilSent(outgoing, release);
      else release();
      return new Response(data, { status, headers });
    }
    return new Response(reader.stream(disk, manifest.chunkSize, start, end), { status, headers });
  };

  app.openapi(R.disk, async (c) => {
    const p = c.req.valid('param');
    return serveDisk(c, p.id, p.disk) as never;
  });

  app.openapi(R.diskLink, async (c) => {
    const p = c.req.valid('param');
    // Parsed again: without a Content-Type the validator passes {} through, without the defaults.
    const req = S.LinkRequest.parse(c.req.valid('json') ?? {});
    const b = await catalogue.get(p.id);
    if (!b.disks.some((d) => d.name === p.disk)) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${p.disk}"; its disks are: ${b.disks.map((d) => d.name).join(', ')}`);
    const expires = Math.floor(now()) + req.expiresIn;
    const token = signLink(key, { backup: b.id, disk: p.disk, expires });
    // Behind a proxy the request's own origin is the inside one: api.publicUrl says what clients use.
    const origin = config.api.publicUrl ? new URL(config.api.publicUrl).origin : new URL(c.req.url).origin;
    const url = `${origin}/v1/links/${token}`;
    return c.json({ url, expiresAt: new Date(expires * 1000).toISOString(), command: qemuImgCommand(url, p.disk) }, 201);
  });

  app.openapi(R.link, async (c) => {
    const claims = verifyLink(key, c.req.valid('param').token, now());
    return serveDisk(c, claims.backup, claims.disk) as never;
  });

  app.openapi(R.listJobs, async (c) => {
    const q = c.req.valid('query');
    const offset = q.cursor ? Number(q.cursor) : 0;
    const r = await jobs.list({ offset, limit: q.limit, ...(q.state ? { states: [q.state] } : {}), ...(q.queue ? { queue: q.queue } : {}) });
    return c.json({ items: r.items, nextCursor: r.more ? String(offset + q.limit) : null }, 200);
  });

  app.openapi(R.getJob, async (c) => c.json(await jobs.get(c.req.valid('param').id), 200));

  app.openapi(R.listPolicies, async (c) => {
    const { policies, problems } = await loadPolicies(config.policiesDir);
    return c.json({ items: policies.map((p) => ({ file: p.file, policy: p.policy as unknown as Record<string, unknown> })), problems }, 200);
  });

  app.openapi(R.validatePolicy, async (c) => {
    const req = c.req.valid('json');
    const r = checkPolicyText(req.yaml, req.file);
    if (!r.ok && r.refused) throw new ApiError(400, 'BAD_INPUT', r.problems.map(formatProblem).join('\n'), { problems: r.problems });
    return c.json(r.ok
      ? { valid: true, policy: r.value as unknown as Record<string, unknown>, problems: [] }
      : { valid: false, policy: null, problems: r.problems }, 200);
  });

  const maintenanceJob = async (payload: Parameters<typeof enqueueMaintenance>[1], kind: string) =>
    accepted(await enqueueMaintenance(maintenance, payload, { jobId: newJobId(kind) }));
  app.openapi(R.prune, async (c) => c.json(await maintenanceJob({ kind: 'prune', ...c.req.valid('json') }, 'prune'), 202));
  app.openapi(R.gc, async (c) => c.json(await maintenanceJob({ kind: 'gc', ...((c.req.valid('json') as object | undefined) ?? {}) }, 'gc'), 202));
  app.openapi(R.verify, async (c) => c.json(await maintenanceJob({ kind: 'verify', ...((c.req.valid('json') as object | undefined) ?? {}) }, 'verify'), 202));

  app.doc31('/v1/openapi.json', {
    openapi: '3.1.0',
    info: { title: 'vmvault', version: '1', description: 'Backups, restores and jobs of vmvault. Authenticate with Authorization: Bearer TOKEN (roles: viewer < operator < admin).' },
    security: [{ bearer: [] }],
  });

  return {
    app,
    close: async () => {
      await reader.close();
      await Promise.all([...queues.values(), maintenance].map((q) => q.close().catch(() => {})));
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

/** A disk name as it may appear in a header: anything but safe characters becomes "_". */
/**
 * The command that restores a disk from a signed link with stock qemu-img (as the
 * README shows it). `-m 1`: QEMU 7.2's curl driver (Debian 12) hangs about one run in
 * twenty with qemu-img convert's default parallel requests, and never with one.
 * The link's characters need no quoting; the file name is kept to safe ones.
 */
export function qemuImgCommand(url: string, disk: string): string {
  return `qemu-img convert -p -m 1 -f raw -O qcow2 '${url}' ${headerSafeName(disk)}.qcow2`;
}

export function headerSafeName(name: string): string {
  return name.replace(/[^A-Za-z0-9._+-]/g, '_');
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => { t = setTimeout(() => reject(new VmvaultError('STORAGE', 'timed out')), ms); })]).finally(() => clearTimeout(t));
}


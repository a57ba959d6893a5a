/**
 * `POST /v1/backups/{id}/exports` (operator): serve one disk of a backup read-only over
 * NBD from a host, for a limited time. The API only enqueues the job; the host's
 * worker starts the export and answers where to connect (`nbd://ADDRESS:PORT/DISK.SECRET`:
 * the export name carries a random secret, the only way in) and until when. The export listens on loopback, or on the one address the host's
 * configuration allows (`hosts.<host>.exportAddress`): the worker checks that again.
 */
import { z } from '@hono/zod-openapi';
import { errorMessage } from '../../errors.js';
import { durationMs, parseDuration } from '../../policy/retention.js';
import { enqueueExport } from '../../queue/enqueue.js';
import { ApiError } from '../errors.js';
import { BackupParam, ErrorSchema, IdempotencyHeader } from '../schemas.js';
import { body, errors, json, route, type ApiApp, type RouteContext } from './common.js';

/** What the export route needs of the app's context. */
export type ExportRouteDeps = Pick<RouteContext, 'config' | 'catalogue' | 'hosts' | 'queueOf' | 'jobs' | 'enqueue'>;

/** How long POST …/exports waits for the host to start the export. */
const START_WAIT_MS = 30_000;
const DEFAULT_TTL = '1h';
const MAX_TTL_MS = 24 * 3600 * 1000;

export const ExportRequest = z.strictObject({
  disk: z.string().min(1).max(200).openapi({ description: 'the disk to serve' }),
  host: z.string().min(1).max(64).optional().openapi({ description: 'the host that serves it (default: the service\'s own host)' }),
  address: z.string().min(1).max(64).optional().openapi({ description: 'where it listens: 127.0.0.1 (default), ::1, or the host\'s configured exportAddress' }),
  ttl: z.string().min(1).max(32).optional().openapi({ description: `how long it is served, a duration such as 30min or 2h (default ${DEFAULT_TTL}, at most 24h)` }),
}).openapi('ExportRequest');

export const ExportSchema = z.object({
  job: z.string(),
  backup: z.string(),
  disk: z.string(),
  host: z.string(),
  uri: z.string().openapi({ description: 'nbd://ADDRESS:PORT/DISK.SECRET, for qemu-img, qemu or nbdinfo: the name, with its random secret, is the only way in; treat the URI as a password until the export expires' }),
  size: z.number().int(),
  expiresAt: z.string().openapi({ description: 'when the export stops (ISO-8601)' }),
}).openapi('Export');

const exportRoute = route({
  method: 'post', path: '/v1/backups/{id}/exports', role: 'operator',
  summary: 'Serve one disk of a backup read-only over NBD from a host, for a while',
  description: 'The host\'s worker starts the export and answers where to connect and until when.',
  request: { params: BackupParam, ...body(ExportRequest), headers: IdempotencyHeader },
  responses: {
    201: json(ExportSchema, 'the export, serving'), ...errors,
    502: json(ErrorSchema, 'the host could not start the export'), 504: json(ErrorSchema, 'the host did not answer in time'),
  },
});

export const EXPORT_ROUTES = [{ method: exportRoute.method, path: exportRoute.path }];

function ttlMs(text: string): number {
  let ms: number;
  try {
    ms = durationMs(parseDuration(text));
  } catch (err) {
    throw new ApiError(400, 'BAD_INPUT', `ttl: ${errorMessage(err)}`);
  }
  if (ms < 1000 || ms > MAX_TTL_MS) throw new ApiError(400, 'BAD_INPUT', `ttl ${text} is out of range: an export lasts at least a second and at most 24h`);
  return ms;
}

export function registerExportRoutes(app: ApiApp, deps: ExportRouteDeps): void {
  app.openapi(exportRoute, async (c) => {
    const b = await deps.catalogue.get(c.req.valid('param').id);
    const req = c.req.valid('json');
    const host = req.host ?? deps.config.host;
    if (!deps.hosts.includes(host)) throw new ApiError(400, 'BAD_INPUT', `unknown host "${host}"; known hosts: ${deps.hosts.join(', ')}`);
    if (!b.disks.some((d) => d.name === req.disk)) throw new ApiError(404, 'NOT_FOUND', `backup ${b.id.slice(0, 12)} has no disk "${req.disk}"; its disks are: ${b.disks.map((d) => d.name).join(', ')}`);
    const address = req.address ?? '127.0.0.1';
    const configured = deps.config.hosts[host]?.exportAddress;
    if (!(address === '127.0.0.1' || address === '::1' || address === configured)) {
      throw new ApiError(400, 'BAD_INPUT', `address "${address}" is not allowed: exports listen on 127.0.0.1, ::1${configured ? ` or ${configured}` : ''} (set hosts.${host}.exportAddress to allow one more)`);
    }
    const ttlSeconds = Math.round(ttlMs(req.ttl ?? DEFAULT_TTL) / 1000);
    const queue = deps.queueOf(host);
    const job = await deps.enqueue(c, queue, 'export', (jobId) => enqueueExport(queue, { backupId: b.id, disk: req.disk, address, ttlSeconds }, { jobId }));
    const done = await deps.jobs.wait(queue, job.id!, START_WAIT_MS, true);
    if (!done) throw new ApiError(504, 'TIMEOUT', `host "${host}" did not start the export within ${START_WAIT_MS / 1000} s: is its worker running? (job ${job.id})`, { job: job.id });
    if (done.state === 'failed') throw new ApiError(502, 'JOB_FAILED', done.error ?? 'the export job failed', { job: job.id });
    const r = done.result as { backup: string; disk: string; uri: string; size: number; expiresAt: string };
    return c.json({ job: job.id!, backup: r.backup, disk: r.disk, host, uri: r.uri, size: r.size, expiresAt: r.expiresAt }, 201);
  });
}

/** Repository-wide maintenance (prune, gc, verify, copy): jobs on the shared maintenance queue. */
import { enqueueMaintenance } from '../../queue/enqueue.js';
import type { Context } from 'hono';
import * as S from '../schemas.js';
import { body, errors, json, route, type ApiApp, type Env, type RouteContext } from './common.js';

export const maintenanceRoutes = {
  prune: route({ method: 'post', path: '/v1/maintenance/prune', role: 'admin', summary: 'Apply a policy\'s retention', request: { ...body(S.PruneRequest), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the prune job'), ...errors } }),
  gc: route({ method: 'post', path: '/v1/maintenance/gc', role: 'admin', summary: 'Delete chunks no backup references', request: { ...body(S.GcRequest, false), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the gc job'), ...errors } }),
  copy: route({ method: 'post', path: '/v1/maintenance/copy', role: 'admin', summary: 'Copy the backups to the off-site repository of maintenance.copy.to', request: { ...body(S.CopyRequest, false), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the copy job'), ...errors } }),
  verify: route({ method: 'post', path: '/v1/maintenance/verify', role: 'admin', summary: 'Check backups (with readData: download and re-hash every chunk)', request: { ...body(S.VerifyRequest, false), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the verify job'), ...errors } }),
};

/** These routes' types, for the typed client (`hc<MaintenanceApp>` from hono/client). */
export type MaintenanceApp = ReturnType<typeof registerMaintenance>;

export function registerMaintenance(app: ApiApp, ctx: RouteContext) {
  const maintenanceJob = async (c: Context<Env>, payload: Parameters<typeof enqueueMaintenance>[1]) =>
    ctx.accepted(await ctx.enqueue(c, ctx.maintenance, payload.kind, (jobId) => enqueueMaintenance(ctx.maintenance, payload, { jobId })));
  return app
    .openapi(maintenanceRoutes.prune, async (c) => c.json(await maintenanceJob(c, { kind: 'prune', ...c.req.valid('json') }), 202))
    .openapi(maintenanceRoutes.gc, async (c) => c.json(await maintenanceJob(c, { kind: 'gc', ...((c.req.valid('json') as object | undefined) ?? {}) }), 202))
    .openapi(maintenanceRoutes.copy, async (c) => c.json(await maintenanceJob(c, { kind: 'copy' }), 202))
    .openapi(maintenanceRoutes.verify, async (c) => c.json(await maintenanceJob(c, { kind: 'verify', ...((c.req.valid('json') as object | undefined) ?? {}) }), 202));
}

/** The VMs of the inventory, and on-demand backups of one. */
import { enqueueBackup } from '../../queue/enqueue.js';
import { backupPayloadFor } from '../../queue/payloads.js';
import * as S from '../schemas.js';
import { body, errors, json, pageOf, route, vmView, type ApiApp, type RouteContext } from './common.js';

export const vmRoutes = {
  listVms: route({ method: 'get', path: '/v1/vms', role: 'viewer', summary: 'VMs of the inventory', request: { query: S.PageQuery }, responses: { 200: json(S.VmPage, 'VMs'), ...errors } }),
  getVm: route({ method: 'get', path: '/v1/vms/{vm}', role: 'viewer', summary: 'A VM with its last backup and its unfinished jobs', request: { params: S.VmParam }, responses: { 200: json(S.VmDetailSchema, 'the VM'), ...errors } }),
  backupVm: route({ method: 'post', path: '/v1/vms/{vm}/backups', role: 'operator', summary: 'Back up a VM now', request: { params: S.VmParam, ...body(S.BackupRequest, false), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the backup job'), ...errors } }),
};

/** These routes' types, for the typed client (`hc<VmsApp>` from hono/client). */
export type VmsApp = ReturnType<typeof registerVms>;

export function registerVms(app: ApiApp, ctx: RouteContext) {
  const { config, catalogue, jobs } = ctx;
  return app
    .openapi(vmRoutes.listVms, (c) => c.json(pageOf(config.vms.map(vmView), c.req.valid('query')), 200))
    .openapi(vmRoutes.getVm, async (c) => {
      const vm = ctx.vmOf(c.req.valid('param').vm);
      const mine = (await catalogue.list()).filter((b) => b.vm === vm.name);
      const pending = await jobs.pendingFor(ctx.queueOf(vm.host), vm.name);
      const state = pending.some((j) => j.state === 'active') ? 'running' as const : pending.length ? 'queued' as const : 'idle' as const;
      const [last] = await ctx.shown(mine.slice(0, 1));
      return c.json({ ...vmView(vm), state, lastBackup: last ?? null, backups: mine.length, jobs: pending }, 200);
    })
    .openapi(vmRoutes.backupVm, async (c) => {
      const vm = ctx.vmOf(c.req.valid('param').vm);
      const req = S.BackupRequest.parse(c.req.valid('json') ?? {});
      const queue = ctx.queueOf(vm.host);
      const job = await ctx.enqueue(c, queue, 'backup', (jobId) => enqueueBackup(queue, backupPayloadFor(vm, { labels: req.labels }), { jobId }));
      return c.json(await ctx.accepted(job), 202);
    });
}

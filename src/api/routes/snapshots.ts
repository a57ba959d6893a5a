/**
 * Snapshots of a VM on its host: every operation is a job on the host's queue (the
 * API never touches a hypervisor's disks); a list waits for its job's answer.
 */
import type { z } from '@hono/zod-openapi';
import type { VmConfig } from '../../config/schema.js';
import { enqueueSnapshot } from '../../queue/enqueue.js';
import { snapshotPayloadFor } from '../../queue/payloads.js';
import { assertSnapshotName, expiryFrom } from '../../vm/snapshots.js';
import { ApiError } from '../errors.js';
import type { Context } from 'hono';
import * as S from '../schemas.js';
import { body, errors, json, route, type ApiApp, type Env, type RouteContext } from './common.js';

/** Snapshot lists asked within this window share one host job. */
const LIST_SHARE_MS = 5000;

/** How long GET …/snapshots waits for the host to answer. */
const LIST_WAIT_MS = 30_000;

export const snapshotRoutes = {
  createSnapshot: route({ method: 'post', path: '/v1/vms/{vm}/snapshots', role: 'operator', summary: 'Take a snapshot of a VM on its host (qcow2 internal when stopped, QMP snapshot-save when running)', request: { params: S.VmParam, ...body(S.SnapshotRequest), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the snapshot job; its result is the snapshot'), ...errors } }),
  listSnapshots: route({ method: 'get', path: '/v1/vms/{vm}/snapshots', role: 'viewer', summary: 'Snapshots of a VM, as its host sees them', request: { params: S.VmParam }, responses: { 200: json(S.SnapshotList, 'the snapshots'), 504: json(S.ErrorSchema, 'the host did not answer in time (its worker is down or busy with this VM)'), ...errors } }),
  revertSnapshot: route({ method: 'post', path: '/v1/vms/{vm}/snapshots/{name}/revert', role: 'operator', summary: 'Revert a VM to a snapshot', request: { params: S.SnapshotParam, headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the revert job'), ...errors } }),
  deleteSnapshot: route({ method: 'delete', path: '/v1/vms/{vm}/snapshots/{name}', role: 'operator', summary: 'Delete a snapshot', request: { params: S.SnapshotParam, headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the delete job'), ...errors } }),
};

/** These routes' types, for the typed client (`hc<SnapshotsApp>` from hono/client). */
export type SnapshotsApp = ReturnType<typeof registerSnapshots>;

export function registerSnapshots(app: ApiApp, ctx: RouteContext) {
  const snapshotGeneration = new Map<string, number>();
  /** A snapshot job of `vm` under the id the request calls for (`c`: RouteContext.enqueue), or `jobId`. */
  const snapshotJob = async (vm: VmConfig, req: Parameters<typeof snapshotPayloadFor>[1], by: Context<Env> | { jobId: string }) => {
    if (req.name !== undefined) assertSnapshotName(req.name);
    if (req.expireIn !== undefined) expiryFrom(req.expireIn, new Date(), 'expireIn');
    if (req.op !== 'list') snapshotGeneration.set(vm.name, (snapshotGeneration.get(vm.name) ?? 0) + 1);
    const queue = ctx.queueOf(vm.host);
    const add = (jobId: string) => enqueueSnapshot(queue, snapshotPayloadFor(vm, req), { jobId });
    return 'jobId' in by ? add(by.jobId) : ctx.enqueue(by, queue, `snapshot-${req.op}`, add);
  };
  return app
    .openapi(snapshotRoutes.createSnapshot, async (c) => {
      const vm = ctx.vmOf(c.req.valid('param').vm);
      const req = c.req.valid('json');
      return c.json(await ctx.accepted(await snapshotJob(vm, { op: 'create', ...req }, c)), 202);
    })
    .openapi(snapshotRoutes.listSnapshots, async (c) => {
      const vm = ctx.vmOf(c.req.valid('param').vm);
      // Lists asked within the same few seconds share one job, so a viewer cannot flood the host's queue;
      // a change made through this API starts a new generation, so it is never answered by an older list.
      const gen = snapshotGeneration.get(vm.name) ?? 0;
      const job = await snapshotJob(vm, { op: 'list' }, { jobId: `api-snapshot-list-${vm.name}-${gen}-${Math.floor(Date.now() / LIST_SHARE_MS)}` });
      const done = await ctx.jobs.wait(ctx.queueOf(vm.host), job.id!, LIST_WAIT_MS);
      if (!done) throw new ApiError(504, 'TIMEOUT', `host "${vm.host}" did not list the snapshots within ${LIST_WAIT_MS / 1000} s: is its worker running? (job ${job.id})`, { job: job.id });
      if (done.state === 'failed') throw new ApiError(502, 'JOB_FAILED', done.error ?? 'the list job failed', { job: job.id });
      const result = done.result as { snapshots: z.output<typeof S.SnapshotSchema>[] };
      return c.json({ items: result.snapshots, job: job.id! }, 200);
    })
    .openapi(snapshotRoutes.revertSnapshot, async (c) => {
      const p = c.req.valid('param');
      return c.json(await ctx.accepted(await snapshotJob(ctx.vmOf(p.vm), { op: 'revert', name: p.name }, c)), 202);
    })
    .openapi(snapshotRoutes.deleteSnapshot, async (c) => {
      const p = c.req.valid('param');
      return c.json(await ctx.accepted(await snapshotJob(ctx.vmOf(p.vm), { op: 'delete', name: p.name }, c)), 202);
    });
}

/** Jobs of every queue, with their state, progress, result and error. */
import * as S from '../schemas.js';
import { errors, json, route, type ApiApp, type RouteContext } from './common.js';

export const jobRoutes = {
  listJobs: route({ method: 'get', path: '/v1/jobs', role: 'viewer', summary: 'Jobs of every queue, newest first', request: { query: S.JobQuery }, responses: { 200: json(S.JobPage, 'jobs'), ...errors } }),
  getJob: route({ method: 'get', path: '/v1/jobs/{id}', role: 'viewer', summary: 'One job with its state, progress and result', request: { params: S.JobParam }, responses: { 200: json(S.JobSchema, 'the job'), ...errors } }),
};

/** These routes' types, for the typed client (`hc<JobsApp>` from hono/client). */
export type JobsApp = ReturnType<typeof registerJobs>;

export function registerJobs(app: ApiApp, ctx: RouteContext) {
  return app
    .openapi(jobRoutes.listJobs, async (c) => {
      const q = c.req.valid('query');
      const offset = q.cursor ? Number(q.cursor) : 0;
      const r = await ctx.jobs.list({ offset, limit: q.limit, ...(q.state ? { states: [q.state] } : {}), ...(q.queue ? { queue: q.queue } : {}) });
      return c.json({ items: r.items, nextCursor: r.more ? String(offset + q.limit) : null }, 200);
    })
    .openapi(jobRoutes.getJob, async (c) => c.json(await ctx.jobs.get(c.req.valid('param').id), 200));
}

/** GET /v1/health: no token; 503 when Redis or the repository does not answer. */
import { VmvaultError } from '../../errors.js';
import { unservedQueues } from '../../ops/status.js';
import * as S from '../schemas.js';
import { json, route, type ApiApp, type RouteContext } from './common.js';

export const healthRoutes = {
  health: route({ method: 'get', path: '/v1/health', role: 'none', summary: 'Is the service up', responses: { 200: json(S.HealthSchema, 'status'), 503: json(S.HealthSchema, 'degraded') } }),
};

/** These routes' types, for the typed client (`hc<HealthApp>` from hono/client). */
export type HealthApp = ReturnType<typeof registerHealth>;

export function registerHealth(app: ApiApp, ctx: RouteContext) {
  return app.openapi(healthRoutes.health, async (c) => {
    const [redis, repository] = await Promise.all([
      withTimeout(ctx.redis.ping(), 2000).then(() => 'ok' as const, () => 'unreachable' as const),
      withTimeout(ctx.repo.storage.stat('config'), 5000).then(() => 'ok' as const, () => 'unreachable' as const),
    ]);
    // A host with jobs and no live worker (heartbeats): they would wait for ever.
    const problems = redis === 'ok' ? await withTimeout(unservedQueues(ctx), 2000).catch(() => []) : [];
    const ok = redis === 'ok' && repository === 'ok' && problems.length === 0;
    const reason = [...(redis === 'ok' ? [] : ['Redis is unreachable']), ...(repository === 'ok' ? [] : ['the repository is unreachable']), ...problems].join('; ');
    return c.json({ status: ok ? 'ok' as const : 'degraded' as const, redis, repository, ...(reason ? { reason } : {}) }, ok ? 200 : 503);
  });
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([p, new Promise<never>((_, reject) => { t = setTimeout(() => reject(new VmvaultError('STORAGE', 'timed out')), ms); })]).finally(() => clearTimeout(t));
}

/**
 * What route modules share: the app's context type (the authenticated principal) and
 * the role check. The app's own middleware authenticates every request but the open
 * ones and sets `principal`; a route only says which role it needs.
 */
import type { MiddlewareHandler } from 'hono';
import { allows, type Principal, type Role } from '../auth.js';
import { ApiError } from '../errors.js';

export type ApiEnv = { Variables: { principal?: Principal } };

export function needsRole(role: Role): MiddlewareHandler<ApiEnv> {
  return async (c, next) => {
    const p = c.get('principal');
    if (!p) throw new ApiError(401, 'UNAUTHORIZED', 'a bearer token is required: send Authorization: Bearer TOKEN');
    if (!allows(p.role, role)) throw new ApiError(403, 'FORBIDDEN', `this needs the ${role} role; token "${p.name}" has the ${p.role} role`);
    await next();
  };
}

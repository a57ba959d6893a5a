/** Policies of the policies directory, and validation of a policy file's text. */
import { checkPolicyText, formatProblem, loadPolicies } from '../../policy/load.js';
import { ApiError } from '../errors.js';
import * as S from '../schemas.js';
import { body, errors, json, route, type ApiApp, type RouteContext } from './common.js';

export const policyRoutes = {
  listPolicies: route({ method: 'get', path: '/v1/policies', role: 'viewer', summary: 'Policies of the policies directory, with the problems of invalid files', responses: { 200: json(S.PoliciesSchema, 'policies'), ...errors } }),
  validatePolicy: route({ method: 'post', path: '/v1/policies/validate', role: 'admin', summary: 'Validate the text of a policy file', request: body(S.PolicyValidateRequest), responses: { 200: json(S.PolicyValidateResult, 'the verdict, with every problem and its line'), ...errors } }),
};

/** These routes' types, for the typed client (`hc<PoliciesApp>` from hono/client). */
export type PoliciesApp = ReturnType<typeof registerPolicies>;

export function registerPolicies(app: ApiApp, ctx: RouteContext) {
  return app
    .openapi(policyRoutes.listPolicies, async (c) => {
      const { policies, problems } = await loadPolicies(ctx.config.policiesDir);
      return c.json({ items: policies.map((p) => ({ file: p.file, policy: p.policy as unknown as Record<string, unknown> })), problems }, 200);
    })
    .openapi(policyRoutes.validatePolicy, async (c) => {
      const req = c.req.valid('json');
      const r = checkPolicyText(req.yaml, req.file);
      if (!r.ok && r.refused) throw new ApiError(400, 'BAD_INPUT', r.problems.map(formatProblem).join('\n'), { problems: r.problems });
      return c.json(r.ok
        ? { valid: true, policy: r.value as unknown as Record<string, unknown>, problems: [] }
        : { valid: false, policy: null, problems: r.problems }, 200);
    });
}

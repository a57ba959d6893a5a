/**
 * Policies of the policies directory, validation of a policy file's text, and the
 * retention a policy would apply now to the repository's backups (prune's own plan,
 * as a dry run that needs no job: the catalogue has every backup's summary).
 */
import { NotFoundError } from '../../errors.js';
import { planPrune, pruneWarnings } from '../../pipeline/prune.js';
import { checkPolicyText, formatProblem, loadPolicies } from '../../policy/load.js';
import { selectionOf } from '../../policy/select.js';
import { ApiError } from '../errors.js';
import * as S from '../schemas.js';
import { body, errors, json, route, type ApiApp, type RouteContext } from './common.js';

export const policyRoutes = {
  listPolicies: route({ method: 'get', path: '/v1/policies', role: 'viewer', summary: 'Policies of the policies directory, with the problems of invalid files', responses: { 200: json(S.PoliciesSchema, 'policies'), ...errors } }),
  previewRetention: route({ method: 'get', path: '/v1/policies/{name}/preview', role: 'viewer', summary: 'Which backups the policy\'s retention would keep and forget now (what a prune would do), with the rules that keep each', request: { params: S.PolicyParam, query: S.RetentionPreviewQuery }, responses: { 200: json(S.RetentionPreview, 'the plan'), ...errors } }),
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
    .openapi(policyRoutes.previewRetention, async (c) => {
      const { name } = c.req.valid('param');
      const { vm } = c.req.valid('query');
      const { policies, problems } = await loadPolicies(ctx.config.policiesDir);
      const found = policies.find((p) => p.policy.name === name);
      if (!found) throw new NotFoundError(`no valid policy "${name}" in the policies directory; valid policies: ${policies.map((p) => p.policy.name).join(', ') || '(none)'} (GET /v1/policies lists the problems of the others)`);
      if (vm !== undefined) ctx.vmOf(vm);
      const at = new Date(ctx.now() * 1000);
      // What the maintenance worker's prune is given: the inventory (config.vms is live), the other policies, verify's findings.
      const backups = await ctx.catalogue.list();
      const plan = planPrune(backups, found.policy, {
        now: at, ...(vm !== undefined ? { onlyVms: [vm] } : {}),
        selection: selectionOf(() => ctx.config.vms), policies: policies.map((p) => p.policy),
        invalidPolicyFiles: [...new Set(problems.map((p) => p.file))], verification: await ctx.verification(),
      });
      return c.json({ policy: name, at: at.toISOString(), items: plan, warnings: pruneWarnings(plan, backups, found.policy) }, 200);
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

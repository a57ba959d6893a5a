/**
 * Adding and removing VMs while the service runs (role admin): `POST /v1/vms` and
 * `DELETE /v1/vms/{vm}` write the state directory's VM file (`STATE_DIR/vms.yaml`,
 * atomically), which the service reloads; VMs of the configuration file are listed
 * by `GET /v1/vms` too but can only be changed there. A VM is checked exactly as in
 * the configuration (same schema, hosts, disks, unique names).
 */
import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import type { MiddlewareHandler } from 'hono';
import type { VmInventory } from '../../config/inventory.js';
import { ConfigFileError } from '../../config/load.js';
import type { VmEntry } from '../../config/vm-file.js';
import type { VmConfig } from '../../config/schema.js';
import { allows, type Principal } from '../auth.js';
import { ApiError } from '../errors.js';
import * as S from '../schemas.js';

type Env = { Variables: { principal?: Principal } };

const json = <T extends z.ZodType>(schema: T, description: string) => ({ content: { 'application/json': { schema } }, description });
const errors = {
  400: json(S.ErrorSchema, 'bad request: the problems, each with its key path'),
  401: json(S.ErrorSchema, 'no or unknown bearer token'),
  403: json(S.ErrorSchema, 'the token\'s role may not do this'),
  404: json(S.ErrorSchema, 'not found'),
  503: json(S.ErrorSchema, 'this service keeps no VM file'),
};

const DiskEntry = z.object({
  path: z.string().openapi({ description: 'absolute path of the image on the VM\'s host' }),
  name: z.string().optional(),
  format: z.enum(['qcow2', 'raw', 'vmdk', 'vdi']).optional(),
  allowChain: z.boolean().optional(),
}).loose();

/** A VM as in the configuration's `vms:` (checked by the same schema when it is written). */
export const VmEntrySchema = z.object({
  name: z.string(),
  host: z.string().optional().openapi({ description: 'default: the service\'s own host' }),
  driver: z.enum(['image', 'qemu', 'libvirt']).optional(),
  disks: z.array(DiskEntry).optional(),
  configFiles: z.array(z.string()).optional(),
  tags: z.array(z.string()).optional(),
  qmpSocket: z.string().optional(),
  guestAgentSocket: z.string().optional(),
}).loose().openapi('VmEntry');

const requireAdmin: MiddlewareHandler<Env> = async (c, next) => {
  const p = c.get('principal');
  if (!p) throw new ApiError(401, 'UNAUTHORIZED', 'a bearer token is required: send Authorization: Bearer TOKEN');
  if (!allows(p.role, 'admin')) throw new ApiError(403, 'FORBIDDEN', `this needs the admin role; token "${p.name}" has the ${p.role} role`);
  await next();
};

export const vmInventoryRoutes = {
  addVm: createRoute({
    method: 'post', path: '/v1/vms', summary: 'Add a VM to the state directory\'s VM file (reloaded by the service)', description: 'Role: admin.',
    middleware: [requireAdmin] as const,
    request: { body: { content: { 'application/json': { schema: VmEntrySchema } }, required: true } },
    responses: { 201: json(S.VmSchema, 'the VM as the service sees it'), 409: json(S.ErrorSchema, 'a VM of that name exists'), ...errors },
  }),
  removeVm: createRoute({
    method: 'delete', path: '/v1/vms/{vm}', summary: 'Remove a VM from the state directory\'s VM file (its backups stay)', description: 'Role: admin.',
    middleware: [requireAdmin] as const,
    request: { params: S.VmParam },
    responses: { 204: { description: 'removed' }, ...errors },
  }),
};

const view = (v: VmConfig) => ({
  name: v.name, host: v.host, driver: v.driver, configFiles: v.configFiles, tags: v.tags,
  disks: v.disks.map((d) => ({ name: d.name, path: d.path, ...(d.format ? { format: d.format } : {}) })),
});

/** The problems of the would-be file as `{path, message}` about the request's own VM. */
function refusal(err: ConfigFileError, index: number): ApiError {
  const prefix = `vms[${index}]`;
  const problems = err.problems.map((p) => ({
    path: p.path === prefix ? '(body)' : p.path.startsWith(`${prefix}.`) ? p.path.slice(prefix.length + 1) : p.path,
    message: p.message,
  }));
  return new ApiError(400, 'BAD_INPUT', `invalid VM: ${problems.map((p) => `${p.path}: ${p.message}`).join('; ')}`, problems);
}

/** Registers POST /v1/vms and DELETE /v1/vms/{vm}; without an inventory they answer 503. */
export function registerVmInventory(app: OpenAPIHono<Env>, inventory: VmInventory | undefined) {
  const need = (): VmInventory => {
    if (!inventory) throw new ApiError(503, 'UNAVAILABLE', 'this API keeps no VM file: add VMs to the configuration file instead');
    return inventory;
  };
  return app
    .openapi(vmInventoryRoutes.addVm, async (c) => {
      const inv = need();
      const entry = c.req.valid('json') as VmEntry;
      if (inv.isConfigured(entry.name) || inv.fromFile().some((v) => v.name === entry.name)) {
        throw new ApiError(409, 'ALREADY_EXISTS', `VM "${entry.name}" already exists: remove it first (DELETE /v1/vms/${entry.name}) or choose another name`);
      }
      try {
        return c.json(view(await inv.add(entry)), 201);
      } catch (err) {
        if (err instanceof ConfigFileError) throw refusal(err, inv.fromFile().length);
        throw err;
      }
    })
    .openapi(vmInventoryRoutes.removeVm, async (c) => {
      await need().remove(c.req.valid('param').vm);
      return c.body(null, 204);
    });
}

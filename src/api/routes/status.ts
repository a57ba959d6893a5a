/**
 * `GET /v1/status` (viewer): policies with their next run, VMs with their last backup,
 * last failure and whether they are overdue, hosts with their live workers and queue
 * depths, and the backups whose manifest cannot be read. The report itself is
 * src/ops/status.ts (the CLI's `vmvault status` prints the same); this module only
 * declares the route and its schema.
 */
import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { collectStatus, type StatusSources } from '../../ops/status.js';
import { ErrorSchema, UnreadableSchema, VerificationSchema } from '../schemas.js';
import { needsRole, type ApiEnv } from './access.js';

const time = z.string().openapi({ format: 'date-time' });
const depth = z.object({ waiting: z.number(), active: z.number(), delayed: z.number(), failed: z.number() });

export const StatusSchema = z.object({
  generatedAt: time,
  policies: z.array(z.object({ name: z.string(), schedule: z.string(), nextRun: time.nullable() })),
  vms: z.array(z.object({
    name: z.string(), host: z.string(),
    policy: z.string().nullable().openapi({ description: 'the first enabled policy that selects the VM' }),
    nextRun: time.nullable(),
    lastBackup: z.object({
      id: z.string(), time, sizeBytes: z.number().openapi({ description: 'the disks\' virtual sizes added up' }), uploadedBytes: z.number(),
      mode: z.enum(['full', 'incremental']).nullable(), verification: VerificationSchema.nullable(),
    }).nullable(),
    lastSuccessAt: time.nullable(),
    lastFailure: z.object({ at: time, code: z.string(), message: z.string() }).nullable()
      .openapi({ description: 'the newest failed backup job of the VM still in the job history (7 days)' }),
    overdue: z.boolean().openapi({ description: 'no successful backup within one period of a selecting policy\'s last slot' }),
  })),
  hosts: z.array(z.object({
    host: z.string(), online: z.boolean(),
    workers: z.array(z.object({ id: z.string(), pid: z.number(), version: z.string(), lastSeen: time })),
    queue: depth,
  })),
  unreadableBackups: z.array(UnreadableSchema).openapi({ description: 'backups whose manifest cannot be read: in no VM\'s figures, and gc deletes no chunk while one is there' }),
}).openapi('Status');

export const statusRoute = createRoute({
  method: 'get', path: '/v1/status', summary: 'Next runs, last result per VM, workers online and queue depths per host',
  description: 'Role: viewer.', middleware: [needsRole('viewer')],
  responses: {
    200: { content: { 'application/json': { schema: StatusSchema } }, description: 'the status' },
    401: { content: { 'application/json': { schema: ErrorSchema } }, description: 'no or unknown bearer token' },
    503: { content: { 'application/json': { schema: ErrorSchema } }, description: 'Redis or the repository is unreachable' },
  },
});

export function registerStatusRoute(app: OpenAPIHono<ApiEnv>, sources: StatusSources): void {
  app.openapi(statusRoute, async (c) => c.json(await collectStatus(sources), 200));
}

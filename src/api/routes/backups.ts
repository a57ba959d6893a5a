/** Backups of the repository (through the catalogue), and restores of one onto a host. */
import { posix } from 'node:path';
import { errorMessage, NotFoundError } from '../../errors.js';
import { assertSafeName } from '../../pipeline/names.js';
import { VM_NAME_RE } from '../../pipeline/libvirt-xml.js';
import { enqueueRestore } from '../../queue/enqueue.js';
import { unreadableStatus } from '../../ops/status.js';
import { ApiError } from '../errors.js';
import * as S from '../schemas.js';
import { body, errors, json, pageOf, route, type ApiApp, type RouteContext } from './common.js';

export const backupRoutes = {
  listBackups: route({ method: 'get', path: '/v1/backups', role: 'viewer', summary: 'Backups, newest first', request: { query: S.BackupQuery }, responses: { 200: json(S.BackupPage, 'backups'), ...errors } }),
  getBackup: route({ method: 'get', path: '/v1/backups/{id}', role: 'viewer', summary: 'One backup', request: { params: S.BackupParam }, responses: { 200: json(S.BackupSchema, 'the backup'), ...errors } }),
  restore: route({ method: 'post', path: '/v1/backups/{id}/restore', role: 'operator', summary: 'Restore a backup onto a host (its worker writes the files)', request: { params: S.BackupParam, ...body(S.RestoreRequest), headers: S.IdempotencyHeader }, responses: { 202: json(S.JobAccepted, 'the restore job'), ...errors } }),
};

/** These routes' types, for the typed client (`hc<BackupsApp>` from hono/client). */
export type BackupsApp = ReturnType<typeof registerBackups>;

export function registerBackups(app: ApiApp, ctx: RouteContext) {
  const { catalogue, config, hosts } = ctx;
  return app
    .openapi(backupRoutes.listBackups, async (c) => {
      const q = c.req.valid('query');
      const since = q.since ? Date.parse(q.since) : undefined;
      const all = (await catalogue.list()).filter((b) =>
        (!q.vm || b.vm === q.vm) && (!q.host || b.host === q.host) && (!q.label || b.labels.includes(q.label)) && (since === undefined || Date.parse(b.time) >= since));
      const page = pageOf(all, q);
      const unreadable = (await catalogue.unreadable()).map(unreadableStatus);
      return c.json({ ...page, items: await ctx.shown(page.items), unreadable }, 200);
    })
    .openapi(backupRoutes.getBackup, async (c) => c.json((await ctx.shown([await catalogue.get(c.req.valid('param').id)]))[0]!, 200))
    .openapi(backupRoutes.restore, async (c) => {
      const b = await catalogue.get(c.req.valid('param').id);
      const req = c.req.valid('json');
      if (!hosts.includes(req.host)) throw new ApiError(400, 'BAD_INPUT', `unknown host "${req.host}"; known hosts: ${hosts.join(', ')}`);
      checkRestoreDirectory(req.directory, config.hosts[req.host]?.restoreRoots ?? [], req.host);
      for (const d of req.disks ?? []) {
        try {
          assertSafeName(d, 'disk name');
        } catch (err) {
          throw new ApiError(400, 'BAD_INPUT', errorMessage(err));
        }
        if (!b.disks.some((x) => x.name === d)) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${d}"; its disks are: ${b.disks.map((x) => x.name).join(', ')}`);
      }
      for (const [d, path] of Object.entries(req.diskPaths ?? {})) {
        if (!b.disks.some((x) => x.name === d)) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${d}"; its disks are: ${b.disks.map((x) => x.name).join(', ')}`);
        checkDiskPath(req.directory, d, path);
      }
      if (req.name !== undefined && !VM_NAME_RE.test(req.name)) throw new ApiError(400, 'BAD_INPUT', `"${req.name}" is not a VM name: use letters, digits, ".", "_", "+" or "-", starting with a letter or digit`);
      const queue = ctx.queueOf(req.host);
      const job = await ctx.enqueue(c, queue, 'restore', (jobId) => enqueueRestore(queue, {
        backupId: b.id, directory: req.directory, format: req.format as never, overwrite: req.overwrite, ...(req.disks ? { disks: req.disks } : {}),
        ...(req.diskPaths ? { diskPaths: req.diskPaths } : {}), ...(req.name !== undefined ? { name: req.name } : {}),
      }, { jobId }));
      return c.json(await ctx.accepted(job), 202);
    });
}

/**
 * A disk's path in a restore request: relative to `dir` or absolute, with no "." or ".."
 * segments, and inside `dir` (the worker checks it again with symlinks resolved).
 */
export function checkDiskPath(dir: string, disk: string, path: string): void {
  if (path.includes('\0') || path.split('/').some((s) => s === '..' || s === '.')) {
    throw new ApiError(400, 'BAD_INPUT', `the path "${path}" of disk "${disk}" must be plain: no "." or ".." segments`);
  }
  const full = posix.normalize(path.startsWith('/') ? path : `${dir}/${path}`);
  if (!full.startsWith(`${posix.normalize(dir).replace(/\/$/, '')}/`) || full.endsWith('/')) {
    throw new ApiError(400, 'BAD_INPUT', `disk "${disk}" cannot go to "${path}": it is outside the restore directory "${dir}"; give a file path inside it (relative paths are taken from it)`);
  }
}

/** Is `dir` a clean absolute path (no `.`/`..` segments, no `//`, no NUL) inside one of `roots`? */
export function checkRestoreDirectory(dir: string, roots: readonly string[], host: string): void {
  if (!dir.startsWith('/') || dir.includes('\0')) throw new ApiError(400, 'BAD_INPUT', `directory "${dir}" must be an absolute path`);
  const segments = dir.split('/').slice(1);
  if (segments.some((s) => s === '..' || s === '.') || /\/\/|\/$/.test(dir) && dir !== '/') {
    throw new ApiError(400, 'BAD_INPUT', `directory "${dir}" must be a plain absolute path: no "..", "." or "//" segments, no trailing "/"`);
  }
  if (roots.length === 0) throw new ApiError(400, 'BAD_INPUT', `host "${host}" has no restoreRoots in the configuration: add hosts: { ${host}: { restoreRoots: [/var/lib/vmvault/restore] } }`);
  const clean = posix.normalize(dir);
  if (!roots.some((r) => clean === r || clean.startsWith(r.endsWith('/') ? r : `${r}/`))) {
    throw new ApiError(400, 'BAD_INPUT', `directory "${dir}" is outside host "${host}"'s restore roots (${roots.join(', ')})`, { restoreRoots: roots });
  }
}

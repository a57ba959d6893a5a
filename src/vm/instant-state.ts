/**
 * What an instant restore records in its directory (`instant-restore.json`), so that
 * `vmvault restore --resume DIR` can finish it after vmvault or the export died: the
 * backup, the QMP socket vmvault drives QEMU through, and per disk its export socket,
 * overlay, final image, QEMU node names and copy job. Written atomically (temporary
 * file, rename) at every change of phase. The file exists exactly while the restore
 * is unfinished: while it does, the final images are incomplete.
 */
import { rename, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import * as z from 'zod';
import { NotFoundError, VmvaultError, errnoCode } from '../errors.js';

export const STATE_FILE = 'instant-restore.json';

const nodesSchema = z.object({ nbd: z.string(), src: z.string(), ovf: z.string(), ovl: z.string(), tgf: z.string(), tgt: z.string() });

export const instantStateSchema = z.object({
  version: z.literal(1),
  backupId: z.string(),
  vm: z.string(),
  /** The QMP socket vmvault uses (with --start, its own second monitor; with --qmp, the one given). */
  qmpSocket: z.string(),
  /** With --start: the monitor left for the operator, and QEMU's pid file. */
  userQmpSocket: z.string().optional(),
  pidFile: z.string().optional(),
  /** Copy rate limit in bytes per second (0: none). */
  rate: z.number().int().nonnegative(),
  disks: z.array(z.object({
    name: z.string(),
    size: z.number().int().nonnegative(),
    socket: z.string(),
    overlay: z.string(),
    target: z.string(),
    format: z.enum(['qcow2', 'raw']),
    nodes: nodesSchema,
    job: z.string(),
    device: z.string(),
    /** The device runs on the final image; the overlay and the export are no longer needed. */
    pivoted: z.boolean(),
  })),
});

export type InstantState = z.infer<typeof instantStateSchema>;
export type InstantDisk = InstantState['disks'][number];
export type NodeNames = z.infer<typeof nodesSchema>;

export async function writeState(dir: string, state: InstantState): Promise<void> {
  const file = join(dir, STATE_FILE);
  const tmp = `${file}.tmp`;
  await writeFile(tmp, JSON.stringify(state, null, 2) + '\n', { mode: 0o600 });
  await rename(tmp, file);
}

export async function readState(dir: string): Promise<InstantState> {
  let text: string;
  try {
    text = await readFile(join(dir, STATE_FILE), 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new NotFoundError(`${dir} holds no unfinished instant restore (no ${STATE_FILE}): nothing to resume`);
    throw err;
  }
  const r = instantStateSchema.safeParse(JSON.parse(text));
  if (!r.success) throw new VmvaultError('BAD_INPUT', `${join(dir, STATE_FILE)} is not an instant restore's state file: ${r.error.issues[0]?.message ?? 'invalid'}`);
  return r.data;
}

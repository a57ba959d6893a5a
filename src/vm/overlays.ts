/**
 * External qcow2 overlays on a running VM's disks: the instant of a live backup.
 *
 * - One QMP `transaction` of `blockdev-snapshot-sync` for every disk: QEMU switches
 *   all of them to new overlays between two guest requests, so the base images hold
 *   one instant across disks, and from then on nothing writes to them.
 * - An active `block-commit` merges each overlay back: QEMU copies the overlay into
 *   the base and mirrors new writes until READY, `block-job-complete` pivots the
 *   device onto the base, BLOCK_JOB_COMPLETED says how it ended. Only then is the
 *   overlay file deleted: until the pivot it holds the guest's latest writes.
 * - A run killed anywhere in between leaves an overlay active (or a commit job
 *   running, or an orphan file); `recoverOverlays` finishes that work first.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { VmvaultError, errorMessage } from '../errors.js';
import { attachedDisks, filesInUse, isOverlayFile, nodeOfFile, overlayPath, overlayPrefix, type AttachedDisk } from './qemu-blocks.js';
import type { QmpClient } from './qmp.js';
import { runTool } from '../disk/qemu-run.js';
import { toolTimeoutMs } from '../disk/tool-timeouts.js';
import type { Warn } from './guest-agent.js';

export interface Overlay {
  /** The inventory disk path (the base image). */
  path: string;
  device: string;
  file: string;
  node: string;
  /** The base's node, the commit's target. */
  baseNode: string;
}

/** Block jobs this tool starts have ids with this prefix. */
export const COMMIT_JOB_PREFIX = 'vmvault-commit-';
const DEFAULT_COMMIT_TIMEOUT_MS = 60 * 60_000;

/** QEMU refused the overlays' transaction cleanly: nothing changed on the VM. */
export class OverlaysRefused extends VmvaultError {
  constructor(message: string, opts: { cause: unknown }) {
    super('QEMU', message, opts);
  }
}

/** One action of a QMP `transaction`. */
export interface TransactionAction { type: string; data: Record<string, unknown> }

/** A short random id for one run's overlays and jobs. */
export function runId(): string {
  return randomBytes(4).toString('hex');
}

/**
 * Puts every disk on a new overlay in one transaction, with `first` (e.g. the new
 * dirty bitmaps) in the same transaction, before the overlays. All or nothing: when
 * QEMU refuses (OverlaysRefused), no device has changed, and the overlay files it
 * may have created are removed.
 */
export async function createOverlays(qmp: QmpClient, disks: AttachedDisk[], id: string, dir?: string, first: TransactionAction[] = []): Promise<Overlay[]> {
  const overlays = disks.map((d, i): Overlay => ({
    path: d.path, device: d.device, file: overlayPath(d.path, id, dir), node: `vmvault-ov-${id}-${i}`, baseNode: d.topNode,
  }));
  await createPrivateFiles(overlays);
  const actions = [...first, ...overlays.map((o) => ({
    type: 'blockdev-snapshot-sync',
    data: { 'node-name': o.baseNode, 'snapshot-file': o.file, 'snapshot-node-name': o.node, format: 'qcow2', mode: 'absolute-paths' },
  }))];
  try {
    await qmp.execute('transaction', { actions });
  } catch (err) {
    // No reply in time, or a dropped connection, does not mean QEMU refused: the
    // transaction may have been applied, and then the VM writes to these files.
    // QEMU is asked which of them it uses before any is deleted.
    let inUse: Set<string>;
    try {
      inUse = await filesInUse(qmp);
    } catch (again) {
      throw new VmvaultError('QEMU',
        `could not put the VM's disks on overlays (${errorMessage(err)}), and QEMU could not be asked whether it did (${errorMessage(again)}). ` +
        `The VM may be running on ${overlays.map((o) => o.file).join(', ')}: do not delete them; the next backup of this VM merges them back.`, { cause: err });
    }
    const active: Overlay[] = [];
    for (const o of overlays) if (inUse.has(await fs.realpath(o.file).catch(() => path.resolve(o.file)))) active.push(o);
    // The transaction applied after all (it is all or nothing): the instant is taken.
    if (active.length === overlays.length) return overlays;
    await Promise.all(overlays.filter((o) => !active.includes(o)).map((o) => fs.rm(o.file, { force: true })));
    if (active.length > 0) {
      throw new VmvaultError('QEMU',
        `could not put the VM's disks on overlays (${errorMessage(err)}), yet QEMU uses ${active.map((o) => o.file).join(', ')}: ` +
        'do not delete them; the next backup of this VM merges them back.', { cause: err });
    }
    throw new OverlaysRefused(`could not put the VM's disks on overlays (${errorMessage(err)}); the VM runs on as before`, { cause: err });
  }
  return overlays;
}

/**
 * Makes each overlay's file, empty, mode 0600, owned like its base image, before QEMU
 * formats it. QEMU would create it under its own umask (0644 as a rule), readable by
 * every local user while it holds the guest's writes; a file that exists keeps its mode
 * and owner when QEMU formats it. The owner is the base's (QEMU's user, which must
 * write the base) when this process may give it away (root); otherwise it is this
 * process's, as QEMU's own file would be when QEMU runs as the same user. A file of
 * the same name (a random id: never, but not overwritten either) is an error, and
 * whatever was made here is removed.
 */
async function createPrivateFiles(overlays: Overlay[]): Promise<void> {
  const made: string[] = [];
  try {
    for (const o of overlays) {
      const fh = await fs.open(o.file, 'wx', 0o600);
      made.push(o.file);
      try {
        const base = await fs.stat(o.path).catch(() => undefined);
        if (base && process.getuid?.() === 0 && (base.uid !== 0 || base.gid !== 0)) await fh.chown(base.uid, base.gid);
        await fh.chmod(0o600); // the mode asked of open() is masked by the umask; this one is not
      } finally {
        await fh.close();
      }
    }
  } catch (err) {
    await Promise.all(made.map((f) => fs.rm(f, { force: true })));
    throw new VmvaultError('QEMU', `could not create the overlay files beside the VM's disks (${errorMessage(err)}): check that the disks' directory is writable and has room; the VM runs on as before`, { cause: err });
  }
}

/**
 * Merges an overlay back into its base and deletes it. On failure the VM stays on
 * the overlay (which holds its newest data) and the error says so; the next run's
 * recovery tries again.
 */
export async function commitOverlay(qmp: QmpClient, o: Overlay, warn: Warn, timeoutMs = DEFAULT_COMMIT_TIMEOUT_MS): Promise<void> {
  const job = `${COMMIT_JOB_PREFIX}${o.node}`;
  const mark = qmp.eventMark();
  try {
    await qmp.execute('block-commit', { 'job-id': job, device: o.node, 'base-node': o.baseNode });
  } catch (err) {
    throw stuck(o, err);
  }
  await finishCommitJob(qmp, job, o, timeoutMs, mark);
  await deleteOverlay(qmp, o, warn);
}

/** Waits for READY, completes, waits for the end; throws when the job failed or was cancelled. */
async function finishCommitJob(qmp: QmpClient, job: string, o: Overlay, timeoutMs: number, mark: number, ready = false): Promise<void> {
  const ours = (d: any) => d?.device === job;
  try {
    if (!ready) {
      const ev = await qmp.waitAnyEvent(['BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], ours, timeoutMs, { after: mark });
      if (ev.event === 'BLOCK_JOB_COMPLETED') throw new VmvaultError('QEMU', ev.data?.error ?? 'the commit job ended before it was ready');
      if (ev.event === 'BLOCK_JOB_CANCELLED') throw new VmvaultError('QEMU', 'the commit job was cancelled');
    }
    const done = qmp.eventMark();
    await qmp.execute('block-job-complete', { device: job });
    const ev = await qmp.waitAnyEvent(['BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'], ours, timeoutMs, { after: ready ? -1 : done });
    if (ev.event === 'BLOCK_JOB_CANCELLED') throw new VmvaultError('QEMU', 'the commit job was cancelled');
    if (ev.data?.error) throw new VmvaultError('QEMU', ev.data.error);
  } catch (err) {
    throw stuck(o, err);
  }
}

function stuck(o: Overlay, err: unknown): VmvaultError {
  return new VmvaultError('QEMU',
    `could not merge overlay ${o.file} back into ${o.path} (device ${o.device}): ${errorMessage(err)}. ` +
    'The VM keeps running on the overlay, which holds its newest writes: do not delete it. ' +
    'The next backup of this VM tries the merge again.', { cause: err });
}

/** Deletes the overlay file once the device no longer uses it. */
async function deleteOverlay(qmp: QmpClient, o: Overlay, warn: Warn): Promise<void> {
  const inUse = await filesInUse(qmp);
  const real = await fs.realpath(o.file).catch(() => path.resolve(o.file));
  if (inUse.has(real)) throw stuck(o, new Error('QEMU still uses the overlay after the commit completed'));
  await fs.rm(o.file, { force: true }).catch((err: unknown) => warn(`could not delete overlay ${o.file}: ${errorMessage(err)}`));
}

/**
 * Finishes what a crashed run left behind on these disks: commit jobs still running
 * (completed), overlays still active (committed) and overlay files no device uses
 * (deleted). Returns how many overlays were merged back.
 */
export async function recoverOverlays(qmp: QmpClient, paths: string[], warn: Warn, dir?: string): Promise<number> {
  let merged = 0;
  const disks = await attachedDisks(qmp, paths);
  const jobs = await qmp.execute<{ device: string; type: string; ready: boolean; status: string }[]>('query-block-jobs');
  for (const d of disks.filter((x) => x.leftover)) {
    const o = await leftoverOverlay(qmp, d);
    const running = jobs.find((j) => j.device === `${COMMIT_JOB_PREFIX}${o.node}`);
    warn(`recovering from an earlier run that stopped before merging overlay ${o.file} into ${o.path}`, { device: o.device, job: running?.device });
    if (running) {
      await finishCommitJob(qmp, running.device, o, DEFAULT_COMMIT_TIMEOUT_MS, -1, running.ready || running.status === 'ready');
      await deleteOverlay(qmp, o, warn);
    } else {
      await commitOverlay(qmp, o, warn);
    }
    merged++;
  }
  await removeOrphans(qmp, paths, warn, dir);
  return merged;
}

/**
 * Whether an overlay file holds any data of its own (its backing chain is not opened:
 * only this layer's allocation counts). When it cannot be read, it counts as holding data.
 */
async function holdsData(file: string): Promise<boolean> {
  const spec = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, backing: null })}`;
  const r = await runTool('qemu-img', ['map', '--output=json', spec], { timeoutMs: toolTimeoutMs('map') }).catch(() => undefined);
  if (!r || r.exitCode !== 0) return true;
  try {
    return (JSON.parse(r.stdout) as { data: boolean; depth: number }[]).some((e) => e.data && e.depth === 0);
  } catch {
    return true;
  }
}

async function leftoverOverlay(qmp: QmpClient, d: AttachedDisk): Promise<Overlay> {
  const baseNode = await nodeOfFile(qmp, d.path, d.format);
  if (!baseNode) {
    throw new VmvaultError('QEMU', `overlay ${d.leftover!.file} is still active on ${d.path} (device ${d.device}), but QEMU has no single node for ${d.path}: ` +
      `merge it by hand (block-commit with base-node) before backing up`);
  }
  return { path: d.path, device: d.device, file: d.leftover!.file, node: d.leftover!.node, baseNode };
}

/** Overlay files of these disks that no device uses: a run that crashed after its commit, or a refused transaction. */
async function removeOrphans(qmp: QmpClient, paths: string[], warn: Warn, dir?: string): Promise<void> {
  const inUse = await filesInUse(qmp);
  for (const p of paths) {
    const where = dir ?? path.dirname(path.resolve(p));
    const prefix = overlayPrefix(p, dir);
    const names = await fs.readdir(where).catch(() => [] as string[]);
    for (const n of names) {
      const file = path.join(where, n);
      if (!n.startsWith(prefix) || !isOverlayFile(n)) continue;
      const real = await fs.realpath(file).catch(() => file);
      if (inUse.has(real)) continue;
      // An empty file: made by this tool before QEMU formatted it (createPrivateFiles), and
      // the run ended before QEMU did. It holds nothing, and qemu-img cannot read it.
      if ((await fs.stat(file).catch(() => undefined))?.size === 0) {
        warn(`deleting overlay file ${file} left empty by an earlier run`);
        await fs.rm(file, { force: true });
        continue;
      }
      // An overlay with data holds guest writes. A run killed between its merge and the deletion
      // leaves one whose writes are in the base already; but if the VM was started again on its
      // base image, it is their only copy. Which one cannot be told safely here: set it aside.
      if (await holdsData(file)) {
        const kept = `${file}.unmerged`;
        await fs.rename(file, kept);
        warn(`overlay ${file} left by an earlier run holds guest writes that may never have been merged into ${p}; it is kept as ${kept}. ` +
          `If the VM ran on it when it was last stopped, those writes are only there: merge them (qemu-img commit) with the VM stopped; otherwise delete it`);
        continue;
      }
      warn(`deleting overlay ${file} left by an earlier run (no device uses it, no data in it)`);
      await fs.rm(file, { force: true });
    }
  }
}

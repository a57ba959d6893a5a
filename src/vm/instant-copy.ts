/**
 * The QEMU side of an instant restore: the block graph of each disk, the copy to the
 * final image while the VM runs, and the pivot.
 *
 *   nbd (the export, read-only) ← raw ← qcow2 overlay (the VM writes here) ← device
 *   blockdev-mirror overlay → final image, then block-job-complete: the device now
 *   runs on the final image; the overlay and NBD nodes are deleted.
 *
 * Every node is given with its driver (`raw` over `nbd`, the overlay's backing by node
 * name), so nothing is taken from an image header: the overlay is vmvault's own file,
 * and the backing named in it is for a human reading `qemu-img info`, never followed.
 * Devices use werror=stop,rerror=stop and the mirror on-source-error=stop: when the
 * export goes away, the VM and the copy pause on the I/O error instead of ever
 * reading something else, and `resume` continues them.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { VmvaultError, errorMessage } from '../errors.js';
import type { ProgressFn } from '../pipeline/progress.js';
import type { InstantDisk, NodeNames } from './instant-state.js';
import type { QmpClient } from './qmp.js';

/** QEMU node names are limited to 31 characters: they are made from the disk's index, not its name. */
export function nodeNames(index: number): { nodes: NodeNames; job: string; device: string } {
  const p = `vv${index}`;
  return { nodes: { nbd: `${p}-nbd`, src: `${p}-src`, ovf: `${p}-ovf`, ovl: `${p}-ovl`, tgf: `${p}-tgf`, tgt: `${p}-tgt` }, job: `${p}-copy`, device: `${p}-dev` };
}

/** The blockdev-add options of a disk's source side: NBD export, raw on it, the overlay backed by it. */
export function sourceNodes(d: InstantDisk): Record<string, unknown>[] {
  return [
    { driver: 'nbd', 'node-name': d.nodes.nbd, server: { type: 'unix', path: d.socket }, export: d.name, 'read-only': true },
    { driver: 'raw', 'node-name': d.nodes.src, file: d.nodes.nbd, 'read-only': true },
    { driver: 'file', 'node-name': d.nodes.ovf, filename: d.overlay },
    { driver: 'qcow2', 'node-name': d.nodes.ovl, file: d.nodes.ovf, backing: d.nodes.src },
  ];
}

export function targetNodes(d: InstantDisk): Record<string, unknown>[] {
  return [
    { driver: 'file', 'node-name': d.nodes.tgf, filename: d.target },
    d.format === 'qcow2'
      ? { driver: 'qcow2', 'node-name': d.nodes.tgt, file: d.nodes.tgf, backing: null }
      : { driver: 'raw', 'node-name': d.nodes.tgt, file: d.nodes.tgf },
  ];
}

/** The guest device of a disk: virtio-blk, pausing the VM on any read or write error. */
export function deviceOptions(d: InstantDisk, bootIndex?: number): Record<string, unknown> {
  return { driver: 'virtio-blk-pci', drive: d.nodes.ovl, id: d.device, werror: 'stop', rerror: 'stop', ...(bootIndex !== undefined ? { bootindex: bootIndex } : {}) };
}

interface BlockJob { device: string; len: number; offset: number; status: string; ready: boolean; paused: boolean; 'io-status'?: string }
interface Job { id: string; status: string; error?: string }

async function namedNodes(qmp: QmpClient): Promise<Set<string>> {
  const nodes = await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true });
  return new Set(nodes.map((n) => n['node-name']));
}

/** Adds the nodes that are missing (a resume finds some already there). */
export async function addNodes(qmp: QmpClient, options: Record<string, unknown>[]): Promise<void> {
  const have = await namedNodes(qmp);
  for (const o of options) if (!have.has(o['node-name'] as string)) await qmp.execute('blockdev-add', o);
}

export async function startMirror(qmp: QmpClient, d: InstantDisk, rate: number): Promise<void> {
  await addNodes(qmp, targetNodes(d));
  await qmp.execute('blockdev-mirror', {
    'job-id': d.job, device: d.nodes.ovl, target: d.nodes.tgt, sync: 'full', ...(rate > 0 ? { speed: rate } : {}),
    'on-source-error': 'stop', 'on-target-error': 'stop', 'auto-dismiss': false,
  });
}

/** The VM is paused on an I/O error. */
async function ioError(qmp: QmpClient): Promise<boolean> {
  return (await qmp.execute<{ status: string }>('query-status')).status === 'io-error';
}

/**
 * After the export is back: resume copy jobs and the VM that paused on I/O errors.
 * QEMU's NBD client reconnects on the first request after a failed one and only
 * succeeds on a later one, so this retries for a while before giving up.
 */
export async function revive(qmp: QmpClient, disks: InstantDisk[]): Promise<void> {
  const jobs = new Set(disks.filter((d) => !d.pivoted).map((d) => d.job));
  for (let attempt = 0; attempt < 40; attempt++) {
    const stuck = (await qmp.execute<BlockJob[]>('query-block-jobs')).filter((j) => jobs.has(j.device) && j.paused);
    const paused = await ioError(qmp);
    if (stuck.length === 0 && !paused) return;
    for (const j of stuck) await qmp.execute('block-job-resume', { device: j.device }).catch(() => undefined);
    if (paused) await qmp.execute('cont').catch(() => undefined);
    await sleep(250);
  }
  throw new VmvaultError('QEMU', 'the VM or its copy jobs stay paused on I/O errors although the export is back: see QEMU\'s query-block-jobs and query-status');
}

/**
 * Waits until every copy job has caught up (ready), reporting progress; then
 * completes each (the device pivots onto the final image), checks it did, and
 * deletes the overlay's and the export's nodes. `onPivot` records each disk as done.
 */
export async function copyAndPivot(qmp: QmpClient, disks: InstantDisk[], resumeHint: string, onProgress?: ProgressFn, onPivot?: (d: InstantDisk) => Promise<void>): Promise<void> {
  const todo = disks.filter((d) => !d.pivoted);
  const started = Date.now();
  let firstDone: number | undefined;
  for (;;) {
    const jobs = await qmp.execute<BlockJob[]>('query-block-jobs');
    let done = 0, total = 0, ready = 0;
    for (const d of todo) {
      const j = jobs.find((x) => x.device === d.job);
      if (!j) throw new VmvaultError('QEMU', `the copy job of disk ${d.name} (${d.job}) has gone from QEMU before it was complete: ${resumeHint}`);
      if (j.paused && j['io-status'] === 'failed') {
        throw new VmvaultError('QEMU', `copying disk ${d.name} stopped on a read error (was the export stopped, or is a chunk damaged?); the VM pauses on I/O errors until this is finished: ${resumeHint}`);
      }
      done += j.offset;
      total += j.len;
      if (j.ready) ready++;
    }
    firstDone ??= done;
    const seconds = Math.max(0.001, (Date.now() - started) / 1000);
    onProgress?.({ phase: 'restore', bytesDone: done, bytesTotal: total, bytesPerSecond: (done - firstDone) / seconds });
    if (ready === todo.length) break;
    await sleep(250);
  }
  for (const d of todo) {
    await qmp.execute('block-job-complete', { device: d.job });
    let job: Job | undefined;
    for (let i = 0; i < 400; i++) {
      job = (await qmp.execute<Job[]>('query-jobs')).find((j) => j.id === d.job);
      if (!job || job.status === 'concluded') break;
      await sleep(50);
    }
    if (job?.status !== 'concluded' && job) throw new VmvaultError('QEMU', `the copy job of disk ${d.name} did not finish after block-job-complete (status ${job.status}): ${resumeHint}`);
    if (job) await qmp.execute('job-dismiss', { id: d.job });
    if (job?.error) throw new VmvaultError('QEMU', `the pivot of disk ${d.name} failed: ${job.error}: ${resumeHint}`);
    await dropSource(qmp, d);
    await onPivot?.(d);
  }
}

/** After the pivot: the device must run on the final image; then the overlay and NBD nodes go. */
export async function dropSource(qmp: QmpClient, d: InstantDisk): Promise<void> {
  const blocks = await qmp.execute<{ qdev?: string; device?: string; inserted?: { 'node-name'?: string } }[]>('query-block');
  const dev = blocks.find((b) => b.qdev === d.device || b.qdev?.endsWith(`/${d.device}/virtio-backend`) || b.device === d.device);
  const node = dev?.inserted?.['node-name'];
  if (node !== undefined && node !== d.nodes.tgt) throw new VmvaultError('QEMU', `after the pivot, device ${d.device} runs on node ${node}, not on the final image's ${d.nodes.tgt}`);
  const have = await namedNodes(qmp);
  for (const n of [d.nodes.ovl, d.nodes.ovf, d.nodes.src, d.nodes.nbd]) {
    if (!have.has(n)) continue;
    await qmp.execute('blockdev-del', { 'node-name': n }).catch((err: unknown) => {
      throw new VmvaultError('QEMU', `could not remove node ${n} of disk ${d.name} after the pivot: ${errorMessage(err)}`);
    });
  }
}

/** Is the disk's device already on its final image (a pivot done before a crash)? */
export async function pivotedAlready(qmp: QmpClient, d: InstantDisk): Promise<boolean> {
  const have = await namedNodes(qmp);
  return have.has(d.nodes.tgt) && !have.has(d.nodes.ovl);
}

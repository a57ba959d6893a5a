/**
 * The `qemu` driver: the point in time of a running VM, reached through its QMP
 * socket, without stopping it (DESIGN.md, data path step 1).
 *
 *   recover leftovers → map disks to devices → [guest freeze] → one transaction of
 *   overlays and new dirty bitmaps → [thaw] → decide each disk, export the previous
 *   bitmaps → (the pipeline reads the frozen base images, or what changed) → close:
 *   remove the exports, commit every overlay back, keep one bitmap per disk
 *
 * The base images are read by the ordinary pipeline (qemu-nbd --read-only, no
 * force-share): once a disk is under an overlay QEMU holds its base read-only and
 * shares reads, so the export takes its lock normally. `close` commits whatever the
 * backup did; a run that is killed leaves the overlay in place, and the next run
 * merges it before anything else (src/vm/overlays.ts). Change tracking: see
 * src/vm/live-bitmaps.ts.
 *
 * One QMP client at a time: while a backup runs, the VM's monitor is ours. A second
 * backup of the same VM fails to connect instead of interleaving with the first.
 */
import { errorMessage, VmvaultError } from '../errors.js';
import { checkFormat, type ImageFormat } from '../disk/image-format.js';
import { inspectDisks } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import { withGuestFreeze, type Warn } from './guest-agent.js';
import { commitOverlay, createOverlays, OverlaysRefused, recoverOverlays, runId, type Overlay } from './overlays.js';
import { LiveTracking, recoverExports } from './live-bitmaps.js';
import { auditPolicy, combineFailures, stderrWarn, type PointInTime, type PointInTimeTarget } from './point-in-time.js';
import { attachedDisks, type AttachedDisk } from './qemu-blocks.js';
import { QmpClient } from './qmp.js';

function knownFormat(format: string, file: string): ImageFormat {
  checkFormat(format, file);
  return format;
}

/**
 * Freezes a running VM's disks at one instant. Errors: NotFoundError for a missing
 * QMP socket or a disk the VM does not have; QEMU for what QEMU refused (with its
 * words); `close` fails when a commit could not finish (the VM then runs on the
 * overlay, and the message says so). The VM keeps running in every case.
 */
export async function openRunningVm(repo: Repository, target: PointInTimeTarget, backupId: string): Promise<PointInTime> {
  const warn = target.warn ?? stderrWarn;
  if (!target.qmpSocket) throw new VmvaultError('BAD_INPUT', `VM "${target.vm}": the qemu driver needs the QMP socket of the running VM`);
  const socket = target.qmpSocket;
  const paths = target.disks.map((d) => d.path);
  let qmp = await QmpClient.connect(socket);
  let overlays: Overlay[] = [];
  let tracking: LiveTracking | undefined;

  const close = async (committed: boolean): Promise<void> => {
    // The exports go first: an exported bitmap is busy, and its node must not be exported while it is merged into.
    await tracking?.release();
    let commitErrors: unknown[] = [];
    for (const o of overlays) {
      try {
        await commitOverlay(qmp, o, warn, target.commitTimeoutMs);
      } catch (err) {
        commitErrors.push(err);
      }
    }
    if (commitErrors.length > 0) {
      // The VM must not stay on an overlay until the next backup: try once more now, on a fresh
      // connection (the old one may be what failed), the way the next run's recovery would.
      for (const e of commitErrors) warn(`merging an overlay back failed (${errorMessage(e)}): trying again`);
      await qmp.close().catch(() => {});
      try {
        qmp = await QmpClient.connect(socket);
        await recoverOverlays(qmp, paths, warn, target.overlayDir);
        commitErrors = [];
      } catch (err) {
        commitErrors = [new VmvaultError('QEMU', `the VM still runs on its vmvault overlays, which could not be merged back (${errorMessage(err)}): ` +
          'the next backup of this VM merges them; do not delete the overlay files', { cause: err })];
      }
    }
    // Bitmaps can be removed only from a writable base: with an overlay left, the next run does it.
    if (commitErrors.length === 0) await tracking?.rotate(qmp, committed);
    await qmp.close();
    if (commitErrors.length > 0) throw commitErrors[0];
  };

  try {
    // A killed run's exports go before its overlays are merged: its bitmaps are busy while exported.
    const recovered = await recoverExports(qmp, warn) + await recoverOverlays(qmp, paths, warn, target.overlayDir);
    const attached = await attachedDisks(qmp, paths);
    const live = tracking = await LiveTracking.open(qmp, attached, repo.id, backupId, warn);
    const { frozen } = await withGuestFreeze(target.guestAgentSocket, async () => {
      overlays = await overlaysWithBitmaps(qmp, attached, live, warn, target.overlayDir);
    }, warn, target.guestAgent);
    await target.onPointInTime?.(overlays);
    // The running QEMU's own node driver is the VM's configuration of each disk's format.
    // The base images are inspected now that QEMU holds them read-only under the overlays.
    const inspected = await inspectDisks(repo, target.vm, target.disks.map((d, i) => ({ ...d, format: knownFormat(attached[i]!.format, d.path) })));
    const disks = await live.freeze(inspected, target.fullRead ?? false, auditPolicy(target));
    let closing: Promise<void> | undefined;
    return {
      disks, consistency: frozen ? 'application' : 'crash', configFiles: [], details: { guestFrozen: frozen, recovered },
      close: (committed) => (closing ??= close(committed)),
    };
  } catch (err) {
    try {
      await close(false);
    } catch (closeErr) {
      throw combineFailures(err, closeErr);
    }
    throw err;
  }
}

/**
 * The overlays and the new bitmaps in one transaction. When QEMU refuses it, the
 * overlays are tried alone (an image that cannot hold a bitmap, e.g. qcow2 version
 * 2, must not stop the backup): those disks then leave no bitmap for the next one.
 */
async function overlaysWithBitmaps(qmp: QmpClient, attached: AttachedDisk[], live: LiveTracking, warn: Warn, dir?: string): Promise<Overlay[]> {
  const bitmaps = live.actions();
  try {
    const overlays = await createOverlays(qmp, attached, runId(), dir, bitmaps);
    live.taken(true);
    return overlays;
  } catch (err) {
    if (!(err instanceof OverlaysRefused) || bitmaps.length === 0) throw err;
    warn(`QEMU refused the overlays with new dirty bitmaps (${errorMessage(err.cause)}): trying without; the next backup reads those disks in full`);
    live.taken(false);
    return createOverlays(qmp, attached, runId(), dir);
  }
}

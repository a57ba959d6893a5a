/**
 * The `qemu` driver: the point in time of a running VM, reached through its QMP
 * socket, without stopping it (DESIGN.md, data path step 1).
 *
 *   recover leftovers → map disks to devices → [guest freeze] → one transaction of
 *   overlays → [thaw] → (the pipeline reads the frozen base images) → close: commit
 *   every overlay back
 *
 * The base images are read by the ordinary pipeline (qemu-nbd --read-only, no
 * force-share): once a disk is under an overlay QEMU holds its base read-only and
 * shares reads, so the export takes its lock normally. `close` commits whatever the
 * backup did; a run that is killed leaves the overlay in place, and the next run
 * merges it before anything else (src/vm/overlays.ts).
 *
 * One QMP client at a time: while a backup runs, the VM's monitor is ours. A second
 * backup of the same VM fails to connect instead of interleaving with the first.
 */
import { errorMessage, VmvaultError } from '../errors.js';
import { checkFormat, type ImageFormat } from '../disk/image-format.js';
import { inspectDisks } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import { withGuestFreeze } from './guest-agent.js';
import { commitOverlay, createOverlays, recoverOverlays, runId, type Overlay } from './overlays.js';
import { readInFull } from './change-tracking.js';
import { combineFailures, stderrWarn, type PointInTime, type PointInTimeTarget } from './point-in-time.js';
import { attachedDisks } from './qemu-blocks.js';
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
export async function openRunningVm(repo: Repository, target: PointInTimeTarget): Promise<PointInTime> {
  const warn = target.warn ?? stderrWarn;
  if (!target.qmpSocket) throw new VmvaultError('BAD_INPUT', `VM "${target.vm}": the qemu driver needs the QMP socket of the running VM`);
  const socket = target.qmpSocket;
  const paths = target.disks.map((d) => d.path);
  let qmp = await QmpClient.connect(socket);
  let overlays: Overlay[] = [];

  const close = async (): Promise<void> => {
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
    await qmp.close();
    if (commitErrors.length > 0) throw commitErrors[0];
  };

  try {
    const recovered = await recoverOverlays(qmp, paths, warn, target.overlayDir);
    const attached = await attachedDisks(qmp, paths);
    const { frozen } = await withGuestFreeze(target.guestAgentSocket, async () => {
      overlays = await createOverlays(qmp, attached, runId(), target.overlayDir);
    }, warn, target.guestAgent);
    await target.onPointInTime?.(overlays);
    // The running QEMU's own node driver is the VM's configuration of each disk's format.
    // The base images are inspected now that QEMU holds them read-only under the overlays.
    const inspected = await inspectDisks(repo, target.vm, target.disks.map((d, i) => ({ ...d, format: knownFormat(attached[i]!.format, d.path) })));
    const disks = inspected.map((d) => readInFull(d));
    let closing: Promise<void> | undefined;
    return {
      disks, consistency: frozen ? 'application' : 'crash', configFiles: [], details: { guestFrozen: frozen, recovered },
      close: () => (closing ??= close()),
    };
  } catch (err) {
    try {
      await close();
    } catch (closeErr) {
      throw combineFailures(err, closeErr);
    }
    throw err;
  }
}

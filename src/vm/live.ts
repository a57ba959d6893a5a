/**
 * The `qemu` driver: backup of a running VM, reached through its QMP socket, without
 * stopping it (DESIGN.md, data path step 1).
 *
 *   recover leftovers → map disks to devices → [guest freeze] → one transaction of
 *   overlays → [thaw] → back up the frozen base images → commit every overlay back
 *
 * The base images are read by the ordinary pipeline (qemu-nbd --read-only, no
 * force-share): once a disk is under an overlay QEMU holds its base read-only and
 * shares reads, so the export takes its lock normally. The commit runs in `finally`,
 * whatever the backup did; a run that is killed leaves the overlay in place, and the
 * next run merges it before anything else (src/vm/overlays.ts).
 *
 * One QMP client at a time: while a backup runs, the VM's monitor is ours. A second
 * backup of the same VM fails to connect instead of interleaving with the first.
 */
import { errorMessage, VmvaultError } from '../errors.js';
import { checkFormat, type ImageFormat } from '../disk/image-format.js';
import { backup, type BackupRequest, type BackupResult } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import { withGuestFreeze, type GuestAgentOptions, type Warn } from './guest-agent.js';
import { commitOverlay, createOverlays, recoverOverlays, runId, type Overlay } from './overlays.js';
import { attachedDisks } from './qemu-blocks.js';
import { QmpClient } from './qmp.js';

export interface LiveBackupRequest extends Omit<BackupRequest, 'frozen'> {
  /** The running QEMU's QMP socket. */
  qmpSocket: string;
  /** The guest agent's socket: filesystems are frozen around the instant when it answers. */
  guestAgentSocket?: string;
  guestAgent?: GuestAgentOptions;
  /** Directory for the overlays (default: next to each image; it must be writable and on a filesystem with room for the writes during the backup). */
  overlayDir?: string;
  /** Warnings: crash-consistent fallback, recovered leftovers. Default: stderr. */
  warn?: Warn;
  /** Called once the overlays exist and before the base images are read. */
  onPointInTime?: (overlays: readonly Overlay[]) => void | Promise<void>;
  /** Longest wait for one overlay's commit (default 1 h). */
  commitTimeoutMs?: number;
}

export interface LiveBackupResult extends BackupResult {
  /** True when the guest agent froze the guest's filesystems at the instant (application-consistent), false when crash-consistent. */
  guestFrozen: boolean;
  /** Overlays of crashed earlier runs merged back before this backup. */
  recovered: number;
}

function knownFormat(format: string, file: string): ImageFormat {
  checkFormat(format, file);
  return format;
}

const stderrWarn: Warn = (message, fields) => process.stderr.write(`warning: ${message}${fields ? ` ${JSON.stringify(fields)}` : ''}\n`);

/**
 * Backs up a running VM's disks from one instant. Errors: NotFoundError for a
 * missing QMP socket or a disk the VM does not have; QEMU for what QEMU refused
 * (with its words), including a commit that could not finish (the VM then runs on
 * the overlay, and the message says so). The VM keeps running in every case.
 */
export async function backupRunningVm(repo: Repository, req: LiveBackupRequest): Promise<LiveBackupResult> {
  const warn = req.warn ?? stderrWarn;
  let qmp = await QmpClient.connect(req.qmpSocket);
  try {
    const paths = req.disks.map((d) => d.path);
    const recovered = await recoverOverlays(qmp, paths, warn, req.overlayDir);
    const disks = await attachedDisks(qmp, paths);
    const id = runId();
    let overlays: Overlay[] = [];
    const { frozen } = await withGuestFreeze(req.guestAgentSocket, async () => {
      overlays = await createOverlays(qmp, disks, id, req.overlayDir);
    }, warn, req.guestAgent);
    let result: BackupResult | undefined;
    let failure: unknown;
    try {
      await req.onPointInTime?.(overlays);
      const { qmpSocket: _q, guestAgentSocket: _g, guestAgent: _a, overlayDir: _d, warn: _w, onPointInTime: _p, commitTimeoutMs: _c, ...plain } = req;
      // The running QEMU's own node driver is the VM's configuration of each disk's format.
      const withFormats = plain.disks.map((d, i) => ({ ...d, format: knownFormat(disks[i]!.format, d.path) }));
      result = await backup(repo, { ...plain, disks: withFormats, frozen: true, consistency: frozen ? 'application' : 'crash' });
    } catch (err) {
      failure = err;
    }
    let commitErrors: unknown[] = [];
    for (const o of overlays) {
      try {
        await commitOverlay(qmp, o, warn, req.commitTimeoutMs);
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
        qmp = await QmpClient.connect(req.qmpSocket);
        await recoverOverlays(qmp, req.disks.map((d) => d.path), warn, req.overlayDir);
        commitErrors = [];
      } catch (err) {
        commitErrors = [new VmvaultError('QEMU', `the VM still runs on its vmvault overlays, which could not be merged back (${errorMessage(err)}): ` +
          'the next backup of this VM merges them; do not delete the overlay files', { cause: err })];
      }
    }
    if (failure !== undefined) {
      if (commitErrors.length === 0) throw failure;
      // Both went wrong: the error must say the VM is left on an overlay, not only why the backup failed.
      const code = failure instanceof VmvaultError ? failure.code : 'QEMU';
      throw new VmvaultError(code, `${errorMessage(failure)}; and ${errorMessage(commitErrors[0])}`, {
        cause: failure, retriable: failure instanceof VmvaultError && failure.retriable,
      });
    }
    if (commitErrors.length > 0) {
      // The backup itself is committed and valid; what is wrong is the VM's state.
      warn(`backup ${result!.manifest.id} was saved, but merging the overlays back failed`);
      throw commitErrors[0];
    }
    return { ...result!, guestFrozen: frozen, recovered };
  } finally {
    await qmp.close();
  }
}

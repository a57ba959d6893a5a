/**
 * `snapshot create --export`: the backup taken right after an on-demand snapshot,
 * labelled like it. A running VM (qemu driver, a QEMU answering on its QMP socket)
 * is backed up through its QEMU (src/vm/live.ts), a stopped one from its image
 * files; either way the disks hold what the snapshot holds, because the snapshot
 * was taken just before and its per-VM lock serialises snapshot work on the VM.
 */
import { backup } from '../pipeline/backup.js';
import type { Repository } from '../repo/repository.js';
import type { Warn } from './guest-agent.js';
import { backupRunningVm } from './live.js';
import { connectIfRunning, type SnapshotTarget } from './snapshot-drivers.js';

export interface ExportRequest {
  label: string;
  /** Host name recorded in the backup. */
  host: string;
  /** Configuration files stored with the backup (the VM's `configFiles`). */
  configs?: string[];
  warn?: Warn;
}

/** Backs the VM up labelled `label`; resolves to the backup id. */
export async function exportSnapshotBackup(repo: Repository, target: SnapshotTarget, req: ExportRequest): Promise<string> {
  const base = {
    vm: target.vm, disks: target.disks,
    configs: req.configs ?? [], labels: [req.label], host: req.host,
  };
  // A QEMU answering on the socket: the VM runs, and only its QEMU may read its disks consistently.
  const probe = target.driver === 'qemu' && target.qmpSocket ? await connectIfRunning(target.qmpSocket) : undefined;
  if (probe) {
    await probe.close(); // A QMP monitor serves one client at a time: the live backup opens its own.
    const r = await backupRunningVm(repo, {
      ...base, qmpSocket: target.qmpSocket!,
      ...(target.guestAgentSocket ? { guestAgentSocket: target.guestAgentSocket } : {}), ...(req.warn ? { warn: req.warn } : {}),
    });
    return r.manifest.id;
  }
  return (await backup(repo, base)).manifest.id;
}

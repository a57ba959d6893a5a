/**
 * `snapshot create --export`: the backup taken right after an on-demand snapshot,
 * labelled like it, through the VM's own point-in-time driver: a running VM (qemu
 * driver, a QEMU answering on its QMP socket) through its QEMU, a libvirt domain
 * through libvirt, a stopped one from its image files; either way the disks hold what the snapshot holds, because the snapshot
 * was taken just before and its per-VM lock serialises snapshot work on the VM.
 */
import type { Repository } from '../repo/repository.js';
import { backupVm } from './drivers.js';
import type { Warn } from './guest-agent.js';
import { connectIfRunning, type SnapshotTarget } from './snapshot-drivers.js';

export interface ExportRequest {
  label: string;
  /** Host name recorded in the backup. */
  host: string;
  /** Configuration files stored with the backup (the VM's `configFiles`). */
  configs?: string[];
  warn?: Warn;
}

/** Backs the VM up labelled `label` with its own driver; resolves to the backup id. */
export async function exportSnapshotBackup(repo: Repository, target: SnapshotTarget, req: ExportRequest): Promise<string> {
  // A QEMU answering on the socket: the VM runs, and only its QEMU may read its disks consistently.
  const probe = target.driver === 'qemu' && target.qmpSocket ? await connectIfRunning(target.qmpSocket) : undefined;
  await probe?.close(); // A QMP monitor serves one client at a time: the live backup opens its own.
  const driver = target.driver === 'qemu' && !probe ? 'image' : target.driver;
  const r = await backupVm(repo, {
    vm: target.vm, driver, disks: target.disks, configs: req.configs ?? [], labels: [req.label], host: req.host,
    ...(target.qmpSocket ? { qmpSocket: target.qmpSocket } : {}), ...(target.guestAgentSocket ? { guestAgentSocket: target.guestAgentSocket } : {}),
    ...(req.warn ? { warn: req.warn } : {}),
  });
  return r.manifest.id;
}

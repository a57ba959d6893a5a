/**
 * A `snapshot` job of the host agent: create, list, revert or delete an on-demand
 * snapshot of one VM of this host (src/vm/snapshots.ts), the API's way to reach a
 * VM's disks. The host agent runs it under the VM's lock, like a backup.
 */
import type { SnapshotPayload } from '../src/queue/payloads.js';
import type { Repository } from '../src/repo/repository.js';
import type { Warn } from '../src/vm/guest-agent.js';
import {
  createSnapshot, deleteSnapshot, listSnapshots, revertSnapshot, type SnapshotInfo, type SnapshotTarget,
} from '../src/vm/snapshots.js';
import { exportSnapshotBackup } from '../src/vm/snapshot-export.js';

/** `list`: every snapshot of the VM; the others: the snapshot created, reverted to or deleted. */
export type SnapshotJobResult =
  | { op: 'list'; vm: string; snapshots: SnapshotInfo[]; startedAt: number; finishedAt: number }
  | { op: 'create' | 'revert' | 'delete'; vm: string; snapshot: SnapshotInfo; startedAt: number; finishedAt: number };

export interface SnapshotJobContext {
  host: string;
  /** The host's state directory (labels and expiry). */
  stateDir: string;
  /** Where `export` backs the VM up (wrapped by the job guard). */
  repo: Repository;
  /** Warnings of an export of a running VM (crash-consistent fallback, recovered overlays). */
  warn?: Warn;
}

export async function runSnapshotJob(ctx: SnapshotJobContext, p: SnapshotPayload): Promise<SnapshotJobResult> {
  const startedAt = Date.now();
  const target: SnapshotTarget = {
    vm: p.vm, driver: p.driver, disks: p.disks,
    ...(p.qmpSocket ? { qmpSocket: p.qmpSocket } : {}), ...(p.guestAgentSocket ? { guestAgentSocket: p.guestAgentSocket } : {}),
  };
  const opts = { stateDir: ctx.stateDir };
  const done = { vm: p.vm, startedAt };
  switch (p.op) {
    case 'list':
      return { ...done, op: 'list', snapshots: await listSnapshots(target, opts), finishedAt: Date.now() };
    case 'create': {
      const exportBackup = p.export
        ? (label: string) => exportSnapshotBackup(ctx.repo, target, { label, host: ctx.host, configs: p.configs, ...(ctx.warn ? { warn: ctx.warn } : {}) })
        : undefined;
      const snapshot = await createSnapshot(target, {
        name: p.name!, ...(p.label ? { label: p.label } : {}), ...(p.expireIn ? { expireIn: p.expireIn } : {}), ...(exportBackup ? { exportBackup } : {}),
      }, opts);
      return { ...done, op: 'create', snapshot, finishedAt: Date.now() };
    }
    case 'revert':
      return { ...done, op: 'revert', snapshot: await revertSnapshot(target, p.name!, opts), finishedAt: Date.now() };
    case 'delete':
      return { ...done, op: 'delete', snapshot: await deleteSnapshot(target, p.name!, opts), finishedAt: Date.now() };
  }
}

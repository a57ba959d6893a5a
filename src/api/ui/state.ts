/** What the dashboard shows, as the API answered it. */
import type { z } from '@hono/zod-openapi';
import type * as S from '../schemas.js';
import type { StatusView } from './api.js';

export type Vm = z.output<typeof S.VmSchema>;
export type Backup = z.output<typeof S.BackupSchema>;
export type Unreadable = z.output<typeof S.UnreadableSchema>;
export type Job = z.output<typeof S.JobSchema>;
export type Snapshot = z.output<typeof S.SnapshotSchema>;
export type PolicyItem = z.output<typeof S.PoliciesSchema>['items'][number];
export type PolicyProblem = z.output<typeof S.PolicyProblemSchema>;
export type Preview = z.output<typeof S.RetentionPreview>;

/** A job's progress while it runs (src/pipeline/progress.ts). */
export interface Progress { phase: string; disk?: string; bytesDone: number; bytesTotal: number; bytesPerSecond: number }

export interface State {
  vms: Vm[];
  backups: Backup[];
  /** Backups whose manifest cannot be read (GET /v1/backups). */
  unreadable: Unreadable[];
  jobs: Job[];
  policies: PolicyItem[];
  problems: PolicyProblem[];
  /** undefined: not asked yet or failed; null: this server has no GET /v1/status. */
  status: StatusView | null | undefined;
  /** The VM whose backups and snapshots are shown. */
  selected: string | undefined;
  snapshots: { vm: string; items: Snapshot[] } | undefined;
}

export const state: State = { vms: [], backups: [], unreadable: [], jobs: [], policies: [], problems: [], status: undefined, selected: undefined, snapshots: undefined };

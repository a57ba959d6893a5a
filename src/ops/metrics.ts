/**
 * Prometheus metrics (prom-client), computed at each scrape from what every process
 * shares: the repository's manifests and verification records (through the status
 * report), BullMQ's queues and job history, the worker heartbeats. The process that
 * serves `/metrics` (serve) is usually not the one that runs the jobs (worker), so no
 * series comes from in-process counters: a restart loses nothing, and two API
 * replicas report the same values.
 *
 * Job failures are counted from the failed jobs BullMQ keeps (7 days, at most 1000 per
 * queue): a gauge, not a counter; alert on its increase (`delta`) or its value. The
 * repository's size is what the newest gc (not a dry run) in the job history found.
 */
import type { Job, Queue } from 'bullmq';
import { Gauge, Registry } from 'prom-client';
import type { BackupStats } from '../repo/manifest.js';
import { failureCode } from '../queue/job-failures.js';
import { collectStatus, queueDepth, type StatusSources } from './status.js';

/** Failure codes already read, by queue and job id (a failed job's code never changes). */
const CODES_KEPT = 20_000;

/** Fraction of a backup's non-zero chunks that were not uploaded (deduplicated or known unchanged). */
export function dedupRatio(s: BackupStats): number {
  const notUploaded = s.chunksReused + (s.chunksUnchanged ?? 0);
  const total = notUploaded + s.chunksNew;
  return total === 0 ? 1 : notUploaded / total;
}

interface GcResult { dryRun?: boolean; bytesStored?: number; chunksTotal?: number; chunksDeleted?: number }

export class Metrics {
  private readonly codes = new Map<string, string>();

  constructor(private readonly src: StatusSources) {}

  /** The exposition text and its content type. */
  async render(): Promise<{ contentType: string; text: string }> {
    const reg = new Registry();
    const gauge = (name: string, help: string, labelNames: string[] = []) => new Gauge({ name, help, labelNames, registers: [reg] });
    const status = await collectStatus(this.src);
    const backups = await this.src.backups();
    const states = await this.src.verification();

    const lastSuccess = gauge('vmvault_vm_last_success_timestamp_seconds', 'Time of the newest backup of the VM (every backup in the repository is a successful one)', ['vm', 'host']);
    const count = gauge('vmvault_vm_backups', 'Backups of the VM in the repository', ['vm', 'host']);
    const overdue = gauge('vmvault_vm_overdue', '1 when a policy selecting the VM passed a slot more than one period after its newest backup', ['vm', 'host']);
    const damaged = gauge('vmvault_vm_backups_damaged', 'Backups of the VM that verify found damaged (a chunk they use is missing or corrupt)', ['vm', 'host']);
    const duration = gauge('vmvault_backup_duration_seconds', 'Duration of the newest backup of the VM', ['vm']);
    const read = gauge('vmvault_backup_read_bytes', 'Bytes read from the disks by the newest backup of the VM', ['vm']);
    const uploaded = gauge('vmvault_backup_uploaded_bytes', 'Bytes uploaded (sealed, compressed) by the newest backup of the VM', ['vm']);
    const size = gauge('vmvault_backup_size_bytes', 'Virtual size of the disks of the newest backup of the VM', ['vm']);
    const dedup = gauge('vmvault_backup_dedup_ratio', 'Fraction of the newest backup\'s non-zero chunks that were not uploaded (already stored or unchanged)', ['vm']);
    for (const v of status.vms) {
      const mine = backups.filter((b) => b.vm === v.name);
      count.set({ vm: v.name, host: v.host }, mine.length);
      overdue.set({ vm: v.name, host: v.host }, v.overdue ? 1 : 0);
      damaged.set({ vm: v.name, host: v.host }, mine.filter((b) => states.get(b.id)?.status === 'damaged').length);
      const last = mine[0];
      if (!last) continue;
      lastSuccess.set({ vm: v.name, host: v.host }, Date.parse(last.time) / 1000);
      duration.set({ vm: v.name }, last.stats.seconds);
      read.set({ vm: v.name }, last.stats.bytesRead);
      uploaded.set({ vm: v.name }, last.stats.bytesUploaded);
      size.set({ vm: v.name }, last.disks.reduce((n, d) => n + d.virtualSize, 0));
      dedup.set({ vm: v.name }, dedupRatio(last.stats));
    }

    const online = gauge('vmvault_workers_online', 'Workers of the host with a live heartbeat', ['host']);
    const hostVms = gauge('vmvault_host_vms', 'VMs of the inventory on the host', ['host']);
    const depth = gauge('vmvault_queue_jobs', 'Jobs in a queue by state (failed: kept in the history, 7 days)', ['queue', 'state']);
    const queues: Queue[] = [];
    for (const h of status.hosts) {
      online.set({ host: h.host }, h.workers.length);
      hostVms.set({ host: h.host }, status.vms.filter((v) => v.host === h.host).length);
      for (const [state, n] of Object.entries(h.queue)) depth.set({ queue: this.src.queueOf(h.host).name, state }, n);
      queues.push(this.src.queueOf(h.host));
    }
    for (const [state, n] of Object.entries(await queueDepth(this.src.maintenance))) depth.set({ queue: this.src.maintenance.name, state }, n);
    queues.push(this.src.maintenance);

    const failed = gauge('vmvault_jobs_failed', 'Jobs failed for good (every attempt spent) still in the history (7 days), by kind and error code', ['queue', 'kind', 'code']);
    for (const q of queues) {
      const byKey = new Map<string, { kind: string; code: string; n: number }>();
      for (const job of (await q.getJobs(['failed'], 0, 999, false)).filter((j): j is Job => !!j)) {
        const code = await this.codeOf(q, job.id!);
        const k = `${job.name}\0${code}`;
        const e = byKey.get(k) ?? { kind: job.name, code, n: 0 };
        e.n++;
        byKey.set(k, e);
      }
      for (const e of byKey.values()) failed.set({ queue: q.name, kind: e.kind, code: e.code }, e.n);
    }

    const unreadable = gauge('vmvault_backups_unreadable', 'Backups whose manifest cannot be read, by kind (damaged, other-version, stray): in no other series, and gc deletes no chunk while one is there', ['kind']);
    for (const kind of ['damaged', 'other-version', 'stray'] as const) unreadable.set({ kind }, status.unreadableBackups.filter((u) => u.kind === kind).length);

    const gc = await this.lastGc();
    if (gc) {
      gauge('vmvault_repository_size_bytes', 'What the repository\'s chunks weigh in storage, as the newest gc found it').set(gc.result.bytesStored!);
      gauge('vmvault_repository_chunks', 'Chunks in the repository, as the newest gc left them').set((gc.result.chunksTotal ?? 0) - (gc.result.chunksDeleted ?? 0));
      gauge('vmvault_gc_last_timestamp_seconds', 'When the newest gc finished').set(gc.at / 1000);
    }
    return { contentType: reg.contentType, text: await reg.metrics() };
  }

  private async codeOf(q: Queue, id: string): Promise<string> {
    const key = `${q.name}\0${id}`;
    let code = this.codes.get(key);
    if (code === undefined) {
      code = await failureCode(q, id);
      if (this.codes.size >= CODES_KEPT) this.codes.delete(this.codes.keys().next().value!);
      this.codes.set(key, code);
    }
    return code;
  }

  private async lastGc(): Promise<{ at: number; result: GcResult } | undefined> {
    const done = (await this.src.maintenance.getJobs(['completed'], 0, 999, false))
      .filter((j): j is Job => !!j && j.name === 'gc' && !(j.returnvalue as GcResult | null)?.dryRun && typeof (j.returnvalue as GcResult | null)?.bytesStored === 'number')
      .sort((a, b) => (b.finishedOn ?? 0) - (a.finishedOn ?? 0));
    const j = done[0];
    return j ? { at: j.finishedOn ?? j.timestamp, result: j.returnvalue as GcResult } : undefined;
  }
}

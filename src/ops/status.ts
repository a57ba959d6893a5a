/**
 * What the service is doing, for `GET /v1/status`, `vmvault status`, the metrics and
 * the alerts: each policy's next run, each VM's last backup and last failure and
 * whether it is overdue, each host's live workers (heartbeats) and queue depths, and
 * the backups whose manifest cannot be read.
 *
 * Everything is read from what every process shares, so any process can answer:
 * the repository (backups, verification records), the policy files, BullMQ's queues
 * and the heartbeat keys in Redis. Nothing comes from the memory of a scheduler or
 * worker that may run elsewhere.
 */
import type { Job, Queue } from 'bullmq';
import type { RedisConnection } from '../queue/connection.js';
import { selectVms } from '../config/load.js';
import type { Config } from '../config/schema.js';
import { loadPolicies } from '../policy/load.js';
import type { Policy } from '../policy/schema.js';
import { policyFirstSeenIfRecorded } from '../queue/first-seen.js';
import { liveWorkers, type WorkerBeat } from '../queue/heartbeat.js';
import { failureCode } from '../queue/job-failures.js';
import type { CatalogueEntry, UnreadableBackup } from '../repo/catalogue.js';
import type { VerificationState } from '../repo/health.js';
import { isOverdue, nextSlot } from '../scheduler/slots.js';

export interface StatusSources {
  config: Pick<Config, 'vms' | 'host' | 'hosts' | 'policiesDir'>;
  redis: RedisConnection;
  /** Every backup, newest first (a Catalogue's list()). */
  backups(): Promise<CatalogueEntry[]>;
  /** Backups whose manifest cannot be read (a Catalogue's unreadable()). */
  unreadable(): Promise<UnreadableBackup[]>;
  verification(): Promise<Map<string, VerificationState>>;
  queueOf(host: string): Queue;
  maintenance: Queue;
  now?: () => Date;
}

export interface QueueDepth { waiting: number; active: number; delayed: number; failed: number }

export interface LastBackup {
  id: string;
  time: string;
  /** The disks' virtual sizes added up. */
  sizeBytes: number;
  uploadedBytes: number;
  /** full when any disk was read whole, incremental when every disk was read by its changes; null for older backups. */
  mode: 'full' | 'incremental' | null;
  verification: VerificationState | null;
}

export interface VmStatus {
  name: string;
  host: string;
  /** The first enabled policy that selects it (null: only on-demand backups). */
  policy: string | null;
  nextRun: string | null;
  lastBackup: LastBackup | null;
  lastSuccessAt: string | null;
  /** The newest failed backup job of the VM still in the queue's history (7 days). */
  lastFailure: { at: string; code: string; message: string } | null;
  /** No successful backup within one period of a selecting policy's last slot. */
  overdue: boolean;
}

export interface HostStatus {
  host: string;
  online: boolean;
  workers: { id: string; pid: number; version: string; lastSeen: string }[];
  queue: QueueDepth;
}

/** A backup whose manifest cannot be read: in no VM's figures, and gc deletes no chunk while it stays. */
export interface UnreadableStatus {
  id: string;
  /** damaged, other-version (not damage: a vmvault that reads it does) or stray (no file at its name): UnreadableBackup. */
  kind: UnreadableBackup['kind'];
  problem: string;
  /** What to do about it. */
  advice: string;
}

export interface Status {
  generatedAt: string;
  policies: { name: string; schedule: string; nextRun: string | null }[];
  vms: VmStatus[];
  hosts: HostStatus[];
  unreadableBackups: UnreadableStatus[];
}

/** A backup whose manifest cannot be read, as the status report, the backup listing and the alerts give it. */
export function unreadableStatus(u: UnreadableBackup): UnreadableStatus {
  return { id: u.id, kind: u.kind, problem: u.problem, advice: unreadableAdvice(u) };
}

/** What an operator does about a backup whose manifest cannot be read. */
function unreadableAdvice(u: Pick<UnreadableBackup, 'name' | 'kind'>): string {
  const gc = 'gc deletes no chunk while it is there, since any may be its';
  if (u.kind === 'other-version') return `open the repository with the vmvault version that wrote it (or a newer one); this one keeps it, and ${gc}`;
  const lost = u.kind === 'stray' ? 'move what lies there out of the repository' : '"vmvault repair --remove" deletes it';
  return `put a good copy of ${u.name} back into the repository if there is one (the backup is listed again at the next refresh); ` +
    `if that backup is lost, ${lost}. Until then ${gc}`;
}

/** Hosts the configuration knows (its own, hosts:, the VMs') plus any with a live worker. */
export function knownHosts(config: StatusSources['config'], beats: readonly WorkerBeat[] = []): string[] {
  return [...new Set([config.host, ...Object.keys(config.hosts), ...config.vms.map((v) => v.host), ...beats.map((b) => b.host)])].sort();
}

export async function queueDepth(queue: Queue): Promise<QueueDepth> {
  const c = await queue.getJobCounts('waiting', 'prioritized', 'active', 'delayed', 'failed');
  return { waiting: (c.waiting ?? 0) + (c.prioritized ?? 0), active: c.active ?? 0, delayed: c.delayed ?? 0, failed: c.failed ?? 0 };
}

/** Jobs that need a worker: waiting, running or due for a retry. */
export const pending = (q: QueueDepth) => q.waiting + q.active + q.delayed;

export function lastBackupOf(b: CatalogueEntry, states: Map<string, VerificationState>): LastBackup {
  const modes = b.disks.map((d) => d.mode);
  const mode = modes.includes('full') ? 'full' : modes.length > 0 && modes.every((m) => m === 'incremental') ? 'incremental' : null;
  return {
    id: b.id, time: b.time, sizeBytes: b.disks.reduce((n, d) => n + d.virtualSize, 0), uploadedBytes: b.stats.bytesUploaded,
    mode, verification: states.get(b.id) ?? null,
  };
}

/** The newest failed backup job per VM on a host queue. */
async function failuresByVm(queue: Queue): Promise<Map<string, VmStatus['lastFailure'] & object>> {
  const out = new Map<string, { at: string; code: string; message: string }>();
  const failed = (await queue.getJobs(['failed'], 0, 999, false)).filter((j): j is Job => !!j && j.name === 'backup');
  failed.sort((a, b) => (b.finishedOn ?? 0) - (a.finishedOn ?? 0));
  for (const job of failed) {
    const vm = (job.data as { vm?: unknown }).vm;
    if (typeof vm !== 'string' || out.has(vm)) continue;
    out.set(vm, { at: new Date(job.finishedOn ?? job.timestamp).toISOString(), code: await failureCode(queue, job.id!), message: job.failedReason ?? '' });
  }
  return out;
}

interface ActivePolicy { policy: Policy; since: Date | undefined; nextRun: Date | null }

export async function collectStatus(src: StatusSources): Promise<Status> {
  const now = (src.now ?? (() => new Date()))();
  const { policies } = await loadPolicies(src.config.policiesDir);
  const active: ActivePolicy[] = await Promise.all(policies.filter((l) => l.policy.enabled).map(async ({ policy }) => ({
    policy, since: await policyFirstSeenIfRecorded(src.redis, policy.name), nextRun: nextSlot(policy.schedule, now, policy.timezone),
  })));
  const [backups, unreadable, states, beats] = await Promise.all([src.backups(), src.unreadable(), src.verification(), liveWorkers(src.redis)]);
  const hosts = knownHosts(src.config, beats);
  const failures = new Map<string, Awaited<ReturnType<typeof failuresByVm>>>();
  const depths = new Map<string, QueueDepth>();
  for (const h of hosts) {
    failures.set(h, await failuresByVm(src.queueOf(h)));
    depths.set(h, await queueDepth(src.queueOf(h)));
  }
  const selecting = new Map<string, ActivePolicy[]>();
  for (const a of active) {
    for (const vm of selectVms(src.config, a.policy.select).vms) selecting.set(vm.name, [...(selecting.get(vm.name) ?? []), a]);
  }
  const vms = src.config.vms.map((vm): VmStatus => {
    const last = backups.find((b) => b.vm === vm.name);
    const mine = selecting.get(vm.name) ?? [];
    const next = mine.map((a) => a.nextRun).filter((d): d is Date => d !== null).sort((a, b) => a.getTime() - b.getTime())[0];
    const lastSuccess = last ? new Date(last.time) : undefined;
    return {
      name: vm.name, host: vm.host, policy: mine[0]?.policy.name ?? null, nextRun: next?.toISOString() ?? null,
      lastBackup: last ? lastBackupOf(last, states) : null, lastSuccessAt: last?.time ?? null,
      lastFailure: failures.get(vm.host)?.get(vm.name) ?? null,
      overdue: mine.some((a) => isOverdue(a.policy.schedule, now, lastSuccess, a.policy.timezone, a.since)),
    };
  });
  return {
    generatedAt: now.toISOString(),
    policies: active.map((a) => ({ name: a.policy.name, schedule: a.policy.schedule, nextRun: a.nextRun?.toISOString() ?? null })),
    vms,
    hosts: hosts.map((host) => {
      const workers = beats.filter((b) => b.host === host).map((b) => ({ id: b.id, pid: b.pid, version: b.version, lastSeen: b.lastSeen }));
      return { host, online: workers.length > 0, workers, queue: depths.get(host)! };
    }),
    unreadableBackups: unreadable.map(unreadableStatus),
  };
}

/**
 * Why the service cannot make progress, for `/v1/health`: a host with jobs waiting
 * and no live worker (they would wait for ever), or maintenance jobs with no worker
 * anywhere (every host agent serves that queue). Empty when all is well.
 */
export async function unservedQueues(src: Pick<StatusSources, 'config' | 'redis' | 'queueOf' | 'maintenance'>): Promise<string[]> {
  const beats = await liveWorkers(src.redis);
  const online = new Set(beats.map((b) => b.host));
  const problems: string[] = [];
  for (const host of knownHosts(src.config, beats)) {
    if (online.has(host)) continue;
    const n = pending(await queueDepth(src.queueOf(host)));
    if (n > 0) problems.push(`host "${host}" has ${n} queued job(s) and no live worker: start "vmvault worker --host ${host}" there`);
  }
  if (beats.length === 0) {
    const n = pending(await queueDepth(src.maintenance));
    if (n > 0) problems.push(`the maintenance queue has ${n} queued job(s) and no worker is running on any host`);
  }
  return problems;
}

/**
 * The scheduler: one node-cron task per enabled policy; each firing enqueues one
 * backup job per selected VM, on the queue of that VM's host, under a job id
 * derived from policy, VM and slot (slots.ts), so replicas and restarts never
 * make a second backup for the same slot. It never does the work itself.
 *
 * A policy with `drill:` gets a second task at the drill's cadence (DRILL_CRON) that
 * enqueues one restore drill of each selected VM's newest backup on that VM's host
 * queue, under a job id from policy, VM and slot as well.
 *
 * A malformed policy file, an unknown VM or a bad cron expression is reported
 * (file:line:col) and skipped; the other policies keep running. Policies reload
 * when their files change. The maintenance schedule (verify, gc) is fixed at start
 * (maintenance.ts).
 */
import { watch, type FSWatcher } from 'node:fs';
import cron, { type ScheduledTask } from 'node-cron';
import { loadPolicies, formatProblem } from '../policy/load.js';
import { DRILL_CRON, type Policy } from '../policy/schema.js';
import { missedSlot, scheduledJobId } from './slots.js';
import { scheduleMaintenance, type MaintenanceJobRequest, type MaintenanceSchedule } from './maintenance.js';

export interface ScheduledVm { name: string; host: string }

export interface SchedulerLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

export interface BackupJobRequest { jobId: string; host: string; vm: string; policy: Policy; slot: Date }

export interface DrillJobRequest { jobId: string; host: string; vm: string; policy: Policy; slot: Date }

export interface SchedulerDeps {
  policiesDir: string;
  /** The VMs a policy selects, and the names or tags it mentions that match none. */
  select(policy: Policy): { vms: ScheduledVm[]; unknown: string[] };
  enqueueBackup(job: BackupJobRequest): Promise<void>;
  /** Newest backup of `vm` under `policy`, for catching up a missed slot at start. */
  lastBackup?(policy: string, vm: string): Promise<Date | undefined>;
  /** Catch up missed slots at start (default true when lastBackup is given). */
  catchUp?: boolean;
  /**
   * When a policy was first seen by any scheduler (recorded on the first call, kept
   * across restarts): catch-up skips slots from before it. Without it every policy
   * counts as first seen at the epoch.
   */
  firstSeen?(policy: string): Promise<Date>;
  /** When verify and gc run (config `maintenance:`); each run enqueues one maintenance job. */
  maintenance?: MaintenanceSchedule;
  enqueueMaintenance?(job: MaintenanceJobRequest): Promise<void>;
  /** Enqueue a restore drill of a VM's newest backup (policies with `drill:`); without it drills are not scheduled. */
  enqueueDrill?(job: DrillJobRequest): Promise<void>;
  log: SchedulerLog;
}

export class Scheduler {
  private tasks = new Map<string, { task: ScheduledTask; file: string; policy: Policy; drill?: ScheduledTask }>();
  private maintenanceTasks: ScheduledTask[] = [];
  private watcher: FSWatcher | undefined;
  private reloadTimer: NodeJS.Timeout | undefined;

  constructor(private readonly deps: SchedulerDeps) {}

  async start(): Promise<void> {
    await this.reload();
    if (this.deps.catchUp ?? !!this.deps.lastBackup) await this.catchUp();
    const { maintenance, enqueueMaintenance } = this.deps;
    if (maintenance && enqueueMaintenance) {
      this.maintenanceTasks = scheduleMaintenance(maintenance, (job) => void enqueueMaintenance(job)
        .then(() => this.deps.log.info({ job: job.jobId, payload: job.payload }, `scheduled ${job.payload.kind} enqueued`))
        .catch((err) => this.deps.log.error({ err, job: job.jobId }, `could not enqueue a scheduled ${job.payload.kind}`)));
    }
    this.watcher = watch(this.deps.policiesDir, () => {
      clearTimeout(this.reloadTimer);
      this.reloadTimer = setTimeout(() => void this.reload().catch((err) => this.deps.log.error({ err }, 'policy reload failed')), 200);
    });
  }

  async stop(): Promise<void> {
    this.watcher?.close();
    clearTimeout(this.reloadTimer);
    await Promise.all([...this.tasks.values()].flatMap(({ task, drill }) => [task.destroy(), drill?.destroy()]));
    this.tasks.clear();
    await Promise.all(this.maintenanceTasks.map((t) => t.destroy()));
    this.maintenanceTasks = [];
  }

  /** Policies scheduled now, with their next run. */
  scheduled(): { name: string; file: string; schedule: string; nextRun: Date | null }[] {
    return [...this.tasks.values()].map(({ task, file, policy }) => ({ name: policy.name, file, schedule: policy.schedule, nextRun: task.getNextRun() }));
  }

  /** Re-reads every policy file; replaces the tasks of the ones that changed. */
  async reload(): Promise<void> {
    const { policies, problems } = await loadPolicies(this.deps.policiesDir);
    for (const p of problems) this.deps.log.error({ file: p.file, line: p.line, col: p.col, key: p.path }, `policy skipped: ${formatProblem(p)}`);
    const wanted = new Map(policies.filter((l) => l.policy.enabled).map((l) => [l.policy.name, l]));
    for (const [name, t] of this.tasks) {
      const next = wanted.get(name);
      if (!next || JSON.stringify(next.policy) !== JSON.stringify(t.policy)) {
        await t.task.destroy();
        await t.drill?.destroy();
        this.tasks.delete(name);
      }
    }
    for (const [name, { file, policy }] of wanted) {
      if (this.tasks.has(name)) continue;
      const task = cron.schedule(policy.schedule, (ctx) => this.fire(policy, ctx.date), {
        name: `policy-${name}`,
        ...(policy.timezone ? { timezone: policy.timezone } : {}),
      });
      const drill = policy.drill && this.deps.enqueueDrill
        ? cron.schedule(DRILL_CRON[policy.drill.every], (ctx) => this.fireDrill(policy, ctx.date), {
          name: `policy-${name}-drill`, ...(policy.timezone ? { timezone: policy.timezone } : {}),
        })
        : undefined;
      this.tasks.set(name, { task, file, policy, ...(drill ? { drill } : {}) });
      this.deps.log.info({ policy: name, file, nextRun: task.getNextRun() }, 'policy scheduled');
      // Record the first sighting now, so a later start knows which slots were this policy's.
      await this.deps.firstSeen?.(name).catch((err: unknown) => this.deps.log.warn({ err, policy: name }, 'could not record when the policy was first seen'));
    }
  }

  /** Enqueues one backup per selected VM for `slot`. Safe to call twice for a slot. */
  async fire(policy: Policy, slot: Date): Promise<void> {
    const { vms, unknown } = this.deps.select(policy);
    for (const u of unknown) this.deps.log.warn({ policy: policy.name, name: u }, `policy ${policy.name} selects unknown VM or tag "${u}": skipped`);
    const at = new Date(Math.floor(slot.getTime() / 1000) * 1000);
    for (const vm of vms) {
      try {
        await this.fireOne(policy, vm, at);
      } catch (err) {
        this.deps.log.error({ err, policy: policy.name, vm: vm.name }, 'could not enqueue a scheduled backup');
      }
    }
  }

  /** Enqueues one drill per selected VM for `slot` (its newest backup, whichever that is when the job runs). Safe to call twice. */
  async fireDrill(policy: Policy, slot: Date): Promise<void> {
    const { vms } = this.deps.select(policy);
    const at = new Date(Math.floor(slot.getTime() / 1000) * 1000);
    for (const vm of vms) {
      try {
        const jobId = scheduledJobId(`${policy.name}+drill`, vm.name, at);
        await this.deps.enqueueDrill?.({ jobId, host: vm.host, vm: vm.name, policy, slot: at });
      } catch (err) {
        this.deps.log.error({ err, policy: policy.name, vm: vm.name }, 'could not enqueue a scheduled drill');
      }
    }
  }

  private async catchUp(): Promise<void> {
    const now = new Date();
    for (const { policy } of this.tasks.values()) {
      const since = await this.deps.firstSeen?.(policy.name);
      for (const vm of this.deps.select(policy).vms) {
        const last = await this.deps.lastBackup?.(policy.name, vm.name);
        const slot = missedSlot(policy.schedule, now, last, policy.timezone, since);
        if (!slot) continue;
        this.deps.log.info({ policy: policy.name, vm: vm.name, slot }, 'catching up a missed slot');
        await this.fireOne(policy, vm, slot);
      }
    }
  }

  private async fireOne(policy: Policy, vm: ScheduledVm, slot: Date): Promise<void> {
    const jobId = scheduledJobId(policy.name, vm.name, slot);
    await this.deps.enqueueBackup({ jobId, host: vm.host, vm: vm.name, policy, slot });
  }
}

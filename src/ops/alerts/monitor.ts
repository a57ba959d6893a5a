/**
 * The alert checks, run by the scheduler process every `alerts.checkEvery`:
 * - job_failed: a job failed for good (BullMQ moves a job to `failed` only after its
 *   last attempt), on any host queue or the maintenance queue;
 * - backup_overdue: a VM with no successful backup within its policy's period
 *   (the status report's `overdue`);
 * - worker_offline: a host with VMs or queued jobs and no worker heartbeat for
 *   `alerts.offlineAfter`;
 * - verify_damage: a backup that verify found damaged;
 * - backup_unreadable: a backup whose manifest cannot be read (damaged, of another
 *   version, or no file at its name): it is in no listing or VM figure, and gc deletes
 *   no chunk while it stays, so the repository only grows until it is dealt with.
 *
 * State lives in Redis, so scheduler replicas and restarts agree: a failed job is
 * alerted once (a key per job, kept as long as job history), and the others once per
 * episode (a member of a Redis set, added when the condition starts and removed when
 * it ends, so the next episode alerts again). SADD and SET NX are atomic: of two
 * replicas only one sends. Failed jobs from before alerts were first enabled are not
 * alerted (`vmvault:alerts:since`).
 */
import type { Job, Queue } from 'bullmq';
import type { RedisConnection } from '../../queue/connection.js';
import type { Logger } from 'pino';
import { JOB_HISTORY } from '../../queue/enqueue.js';
import { failureCode } from '../../queue/job-failures.js';
import { errorMessage } from '../../errors.js';
import { collectStatus, pending, type Status, type StatusSources, type UnreadableStatus } from '../status.js';
import { newAlert, type Alert } from './alert.js';
import { deliver, type Channel } from './deliver.js';

const K = {
  since: 'vmvault:alerts:since',
  job: (queue: string, id: string) => `vmvault:alerts:job:${queue}:${id}`,
  episodes: (kind: string) => `vmvault:alerts:episodes:${kind}`,
  offlineSince: 'vmvault:alerts:offline-since',
};

export interface MonitorOptions {
  sources: StatusSources;
  channels: Channel[];
  log: Logger;
  checkEveryMs: number;
  offlineAfterMs: number;
  now?: () => Date;
}

export class AlertMonitor {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private readonly deliveries = new Set<Promise<unknown>>();
  private readonly stopping = new AbortController();
  private readonly redis: RedisConnection;

  constructor(private readonly o: MonitorOptions) {
    this.redis = o.sources.redis;
  }

  /**
   * Starts checking. Failures are alerted from this moment on (the first start of any
   * scheduler records it in Redis): a job that fails before the first check, such as one
   * enqueued as soon as the API listens, is not missed.
   */
  async start(): Promise<void> {
    await this.redis.set(K.since, String((this.o.now ?? (() => new Date()))().getTime()), 'NX');
    const tick = () => {
      this.running = this.check()
        .catch((err: unknown) => this.o.log.warn({ err: errorMessage(err) }, 'alert check failed (tried again at the next interval)'))
        .finally(() => {
          this.running = undefined;
          if (!this.stopping.signal.aborted) this.timer = setTimeout(tick, this.o.checkEveryMs);
        });
    };
    this.timer = setTimeout(tick, this.o.checkEveryMs);
  }

  /** Stops checking; deliveries still retrying get a few seconds, then are abandoned. */
  async stop(): Promise<void> {
    clearTimeout(this.timer);
    this.stopping.abort();
    await this.running;
    await Promise.race([Promise.all(this.deliveries), new Promise((r) => setTimeout(r, 5000).unref())]);
    for (const c of this.o.channels) c.close();
  }

  /** One round of checks; sends what is new. */
  async check(): Promise<void> {
    const now = (this.o.now ?? (() => new Date()))();
    await this.redis.set(K.since, String(now.getTime()), 'NX');
    const since = Number(await this.redis.get(K.since));
    const status = await collectStatus({ ...this.o.sources, now: () => now });
    const queues = [...status.hosts.map((h) => this.o.sources.queueOf(h.host)), this.o.sources.maintenance];
    for (const q of queues) await this.failedJobs(q, since, now);
    await this.episodes('overdue', status.vms.filter((v) => v.overdue).map((v) => v.name), (vm) => overdueAlert(status, vm, now));
    await this.episodes('offline', await this.offlineHosts(status, now), (host) => offlineAlert(status, host, this.o.offlineAfterMs, now));
    const states = await this.o.sources.verification();
    const damaged = [...states].filter(([, s]) => s.status === 'damaged').map(([id]) => id);
    const backups = damaged.length ? await this.o.sources.backups() : [];
    await this.episodes('damage', damaged, (id) => {
      const b = backups.find((x) => x.id === id);
      const s = states.get(id)!;
      return newAlert('verify_damage', `verify found backup ${id.slice(0, 12)}${b ? ` of VM ${b.vm}` : ''} damaged`,
        `Verify found ${s.damagedChunks} chunk(s) of this backup missing or corrupt (disks: ${s.damagedDisks.join(', ')}). ` +
        'They are quarantined: the next backup that produces them uploads them again and heals it. Run "vmvault verify" and see "vmvault repair" for the backups that stay damaged.',
        { backup: id, vm: b?.vm ?? null, host: b?.host ?? null, time: b?.time ?? null, ...s }, now);
    });
    // By id and kind: a manifest that goes from damaged to a stray (or back) is a new episode.
    const unreadable = new Map(status.unreadableBackups.map((u) => [`${u.id}:${u.kind}`, u]));
    await this.episodes('unreadable', [...unreadable.keys()], (key) => unreadableAlert(unreadable.get(key)!, now));
  }

  private async failedJobs(q: Queue, since: number, now: Date): Promise<void> {
    const failed = (await q.getJobs(['failed'], 0, 999, false)).filter((j): j is Job => !!j && (j.finishedOn ?? 0) >= since);
    for (const job of failed) {
      if (await this.redis.set(K.job(q.name, job.id!), '1', 'EX', JOB_HISTORY.age + 86_400, 'NX') !== 'OK') continue;
      const data = job.data as { vm?: unknown };
      const vm = typeof data.vm === 'string' ? data.vm : undefined;
      const code = await failureCode(q, job.id!);
      this.send(newAlert('job_failed', `${job.name} job ${job.id}${vm ? ` of VM ${vm}` : ''} failed (${code})`,
        `The ${job.name} job ${job.id} on queue ${q.name} failed after ${job.attemptsMade} attempt(s) of ${job.opts.attempts ?? 1}: ${job.failedReason ?? ''}`,
        { queue: q.name, job: job.id, kind: job.name, vm: vm ?? null, code, message: job.failedReason ?? '', attemptsMade: job.attemptsMade,
          finishedAt: job.finishedOn ? new Date(job.finishedOn).toISOString() : null }, now));
    }
  }

  /** Hosts offline for offlineAfterMs that have VMs or pending jobs; forgets hosts back online. */
  private async offlineHosts(status: Status, now: Date): Promise<string[]> {
    const out: string[] = [];
    for (const h of status.hosts) {
      const vms = status.vms.filter((v) => v.host === h.host).length;
      if (h.online || (vms === 0 && pending(h.queue) === 0)) {
        await this.redis.hdel(K.offlineSince, h.host);
        continue;
      }
      await this.redis.hsetnx(K.offlineSince, h.host, String(now.getTime()));
      const from = Number(await this.redis.hget(K.offlineSince, h.host));
      if (now.getTime() - from >= this.o.offlineAfterMs) out.push(h.host);
    }
    return out;
  }

  /** Alerts each member new to the set `kind`; members no longer there end their episode. */
  private async episodes(kind: string, current: string[], make: (member: string) => Alert): Promise<void> {
    const key = K.episodes(kind);
    for (const m of current) if (await this.redis.sadd(key, m) === 1) this.send(make(m));
    const known = await this.redis.smembers(key);
    const ended = known.filter((m) => !current.includes(m));
    if (ended.length) await this.redis.srem(key, ...ended);
  }

  private send(alert: Alert): void {
    this.o.log.warn({ alert: alert.id, event: alert.event, ...alert.details }, `alert: ${alert.summary}`);
    for (const ch of this.o.channels.filter((c) => c.wants(alert))) {
      const p = deliver(ch, alert, {
        signal: this.stopping.signal,
        onFailure: (attempt, message, final) => this.o.log.warn({ alert: alert.id, channel: ch.name, attempt, err: message },
          final ? 'alert not delivered: giving up' : 'alert delivery failed: retrying'),
      }).then((ok) => { if (ok) this.o.log.info({ alert: alert.id, channel: ch.name }, 'alert delivered'); });
      this.deliveries.add(p);
      void p.finally(() => this.deliveries.delete(p));
    }
  }
}

function unreadableAlert(u: UnreadableStatus, now: Date): Alert {
  const what = u.kind === 'other-version' ? 'was written by another version of vmvault' : 'cannot be read';
  return newAlert('backup_unreadable', `the manifest of backup ${u.id.slice(0, 12)} ${what}`,
    `Backup ${u.id}: ${u.problem}. It is left out of every listing and restore. What to do: ${u.advice}.`,
    { backup: u.id, kind: u.kind, problem: u.problem, advice: u.advice }, now);
}

function overdueAlert(status: Status, name: string, now: Date): Alert {
  const v = status.vms.find((x) => x.name === name)!;
  return newAlert('backup_overdue', `VM ${name} has no successful backup within its policy's period`,
    `VM ${name} (host ${v.host}, policy ${v.policy ?? '-'}) missed a scheduled backup: its newest backup is ${v.lastSuccessAt ?? 'none'}` +
    `${v.lastFailure ? `; its last failure (${v.lastFailure.at}, ${v.lastFailure.code}): ${v.lastFailure.message}` : ''}.`,
    { vm: name, host: v.host, policy: v.policy, lastSuccessAt: v.lastSuccessAt, nextRun: v.nextRun, lastFailure: v.lastFailure }, now);
}

function offlineAlert(status: Status, host: string, afterMs: number, now: Date): Alert {
  const h = status.hosts.find((x) => x.host === host)!;
  const vms = status.vms.filter((v) => v.host === host).map((v) => v.name);
  return newAlert('worker_offline', `no worker is running on host ${host}`,
    `No worker heartbeat from host ${host} for ${Math.round(afterMs / 1000)} s or more; it has ${vms.length} VM(s) and ${pending(h.queue)} queued job(s), ` +
    `which wait until a worker runs: start "vmvault worker --host ${host}" there.`,
    { host, vms, queue: h.queue }, now);
}

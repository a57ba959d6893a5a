/**
 * The host agent: a BullMQ worker on one hypervisor host's queue. It runs backups of
 * that host's VMs and restores onto it, one job per VM at a time, and reports
 * progress. See DESIGN.md (Moving parts, Known pitfalls) and workers/job-guard.ts
 * for what keeps an at-least-once queue from committing a backup twice.
 *
 * A job whose VM is busy (another job holds the VM lock) is postponed with
 * DelayedError, not failed: a retriable error would spend one of the job's attempts
 * every time, and a job queued behind a long backup of the same VM would run out of
 * attempts without ever having failed.
 */
import { DelayedError, UnrecoverableError, Worker, type Job, type Queue } from 'bullmq';
import path from 'node:path';
import { pino, type Logger } from 'pino';
import { errorMessage, VmvaultError } from '../src/errors.js';
import { auditFailures, backupVm } from '../src/vm/drivers.js';
import { durationMs, parseDuration } from '../src/policy/retention.js';
import { restore, type RestoreResult } from '../src/pipeline/restore.js';
import { PoolKeeper } from '../src/pipeline/pool.js';
import type { Progress } from '../src/pipeline/progress.js';
import { Repository } from '../src/repo/repository.js';
import { summarise, type BackupStats, type BackupSummary as ManifestSummary } from '../src/repo/manifest.js';
import { openStorage } from '../src/storage/open.js';
import { checkNoEviction, closeRedis, createConnection, queueOptions, type RedisConnection } from '../src/queue/connection.js';
import { deterministicJobId, hostQueueName } from '../src/queue/names.js';
import { parseHostJob, type BackupPayload, type DrillPayload, type RestorePayload } from '../src/queue/payloads.js';
import { drillBackup, drillFailure, resolveDrillTarget, type DrillResult } from '../src/vm/drill.js';
import { DEFAULT_STATE_DIR } from '../src/config/schema.js';
import { enqueueMaintenance, JOB_HISTORY, maintenanceQueue } from '../src/queue/enqueue.js';
import { DEFAULT_VM_LOCK_TTL_MS, tryAcquireVmLock, vmLockRemainingMs } from '../src/queue/vm-lock.js';
import { JobAbortedError, JobGuard } from './job-guard.js';
import { toJobError } from './job-errors.js';
import { runSnapshotJob, type SnapshotJobResult } from './snapshot-job.js';
import { HostExports, type ExportJobResult } from './export-job.js';
import { startHeartbeat, type Heartbeat } from '../src/queue/heartbeat.js';
import { packageVersion } from '../src/package-files.js';
import { recordFailureCode } from '../src/queue/job-failures.js';

export interface HostWorkerOptions {
  /** This host's name; the worker consumes `vmvault-host-<host>`. */
  host: string;
  redisUrl: string;
  repoUrl: string;
  passphrase: string;
  /** Jobs at once (default 1); jobs on one VM never overlap whatever this is. */
  concurrency?: number;
  logger?: Logger;
  /** BullMQ job lock: a worker that stops renewing it loses the job after this long (default 30 s). */
  jobLockMs?: number;
  /** How often the queue looks for jobs of crashed workers (BullMQ's stalledInterval, default 30 s). */
  stalledIntervalMs?: number;
  /** VM lock lifetime without refresh (default 60 s). */
  vmLockTtlMs?: number;
  /** Upper bound of the wait before a job whose VM is busy is tried again (default 15 s). */
  busyRetryMs?: number;
  /** Least time between two progress updates of a job (default 1 s). */
  progressIntervalMs?: number;
  /** close(): how long the running jobs may take to finish before they are stopped and handed back (default 60 s). */
  closeTimeoutMs?: number;
  /** When set, restores may write only inside these directories. */
  restoreRoots?: string[];
  /** The host's state directory, where snapshot labels and expiry are kept (default /var/lib/vmvault). */
  stateDir?: string;
  /** Besides loopback, the address NBD exports may listen on. */
  exportAddress?: string;
  /** How often the worker's heartbeat key is refreshed in Redis (default 10 s; src/queue/heartbeat.ts). */
  heartbeatMs?: number;
}

export interface HostWorker {
  readonly host: string;
  readonly queueName: string;
  /** Stops taking jobs, lets running ones finish within closeTimeoutMs, then hands them back; closes connections. */
  close(): Promise<void>;
}

export interface BackupJobResult extends ManifestSummary {
  stats: BackupStats;
  slot?: string;
  /** When this worker held the VM (ms since epoch): the span in which nothing else touched it. */
  startedAt: number;
  finishedAt: number;
  /** True when an earlier attempt had already committed this backup and this one only reported it. */
  reused?: boolean;
}

export interface RestoreJobResult extends RestoreResult { directory: string; startedAt: number; finishedAt: number }

export type HostJobResult = BackupJobResult | RestoreJobResult | SnapshotJobResult | ExportJobResult | DrillResult;

/** Commit markers live as long as job history: a retry within that time finds them. */
const MARKER_TTL_S = JOB_HISTORY.age;

interface Context {
  opts: Required<Omit<HostWorkerOptions, 'logger' | 'restoreRoots' | 'concurrency' | 'exportAddress' | 'heartbeatMs'>> & Pick<HostWorkerOptions, 'restoreRoots'>;
  queueName: string;
  repo: Repository;
  /** Fast-failing connection for VM locks and commit markers (a refresh must notice Redis is gone). */
  locks: RedisConnection;
  /** The shared maintenance queue: a policy's backup enqueues that VM's prune there. */
  maintenance: Queue;
  log: Logger;
  guards: Map<string, JobGuard>;
  exports: HostExports;
  /** The chunk threads, kept between backup and restore jobs for KEEP_THREADS_MS. */
  pools: PoolKeeper;
}

/**
 * How long the chunk threads (and their slots) outlive a backup or restore job: scheduled
 * backups come in runs, and each job then starts on threads already up.
 */
const KEEP_THREADS_MS = 60_000;

/**
 * Starts the host agent. Refuses to start (VmvaultError BAD_INPUT) unless Redis has
 * maxmemory-policy noeviction; fails like `vmvault` does when the repository cannot
 * be opened with the passphrase.
 */
export async function startHostWorker(options: HostWorkerOptions): Promise<HostWorker> {
  const queueName = hostQueueName(options.host);
  const log = (options.logger ?? pino({ name: 'vmvault-worker' })).child({ host: options.host });
  const opts: Context['opts'] = {
    host: options.host, redisUrl: options.redisUrl, repoUrl: options.repoUrl, passphrase: options.passphrase,
    jobLockMs: options.jobLockMs ?? 30_000,
    vmLockTtlMs: options.vmLockTtlMs ?? DEFAULT_VM_LOCK_TTL_MS,
    busyRetryMs: options.busyRetryMs ?? 15_000,
    progressIntervalMs: options.progressIntervalMs ?? 1000,
    closeTimeoutMs: options.closeTimeoutMs ?? 60_000,
    stalledIntervalMs: options.stalledIntervalMs ?? 30_000,
    restoreRoots: options.restoreRoots?.map((r) => path.resolve(r)),
    stateDir: path.resolve(options.stateDir ?? DEFAULT_STATE_DIR),
  };

  const connection = createConnection(opts.redisUrl, 'worker');
  const locks = createConnection(opts.redisUrl, 'producer');
  const swallow = (err: Error) => log.warn({ err: err.message }, 'redis connection error');
  connection.on('error', swallow);
  locks.on('error', swallow);
  let repo: Repository;
  try {
    await checkNoEviction(connection);
    repo = await Repository.open(openStorage(opts.repoUrl), opts.passphrase, { cacheDir: path.join(opts.stateDir, 'cache') });
  } catch (err) {
    await Promise.all([closeRedis(connection), closeRedis(locks)]);
    throw err;
  }

  const ctx: Context = { opts, queueName, repo, locks, maintenance: maintenanceQueue(locks), log, guards: new Map(), exports: new HostExports(repo, log, options.exportAddress),
    pools: new PoolKeeper(() => repo.workerInit(), KEEP_THREADS_MS) };
  const worker = new Worker(queueName, (job, token, signal) => processJob(ctx, job, token, signal), {
    ...queueOptions(connection), concurrency: options.concurrency ?? 1, lockDuration: opts.jobLockMs, autorun: false,
    stalledInterval: opts.stalledIntervalMs,
  });
  worker.on('stalled', (id) => log.warn({ job: id }, 'job of a crashed worker handed back to the queue'));
  worker.on('error', (err) => log.error({ err: err.message }, 'worker error'));
  worker.on('lockRenewalFailed', (ids) => {
    for (const id of ids) ctx.guards.get(id)?.abort({ kind: 'lost', message: `the lock of job ${id} could not be renewed` });
  });
  worker.on('failed', (job, err) => log.warn({ job: job?.id, attempt: job?.attemptsMade, err: err.message }, 'job failed'));
  worker.on('completed', (job) => log.info({ job: job.id }, 'job completed'));
  void worker.run().catch((err: unknown) => log.error({ err: errorMessage(err) }, 'worker stopped'));
  await worker.waitUntilReady();
  const heartbeat = await startHeartbeat(locks, {
    host: opts.host, version: packageVersion(), ...(options.heartbeatMs ? { intervalMs: options.heartbeatMs } : {}),
    onError: (err) => log.warn({ err: err.message }, 'heartbeat not written'),
  });
  log.info({ queue: queueName, worker: heartbeat.id }, 'worker started');

  let closing: Promise<void> | undefined;
  return {
    host: opts.host,
    queueName,
    close: () => (closing ??= closeWorker(ctx, worker, [connection, locks], heartbeat)),
  };
}

async function closeWorker(ctx: Context, worker: Worker, connections: RedisConnection[], heartbeat: Heartbeat): Promise<void> {
  const graceful = worker.close();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), ctx.opts.closeTimeoutMs); });
  if ((await Promise.race([graceful.then(() => 'closed' as const), deadline])) === 'timeout') {
    ctx.log.warn({ jobs: [...ctx.guards.keys()] }, 'running jobs did not finish in time: handing them back');
    for (const g of ctx.guards.values()) g.abort({ kind: 'shutdown', message: 'the worker is shutting down' });
  }
  clearTimeout(timer);
  await graceful;
  await ctx.pools.close();
  await ctx.exports.closeAll();
  await heartbeat.stop();
  await ctx.maintenance.close();
  await Promise.all(connections.map(closeRedis));
}

async function processJob(ctx: Context, job: Job, token: string | undefined, signal?: AbortSignal): Promise<HostJobResult> {
  if (!token) throw new Error('BullMQ gave no lock token: this worker must run jobs itself');
  let parsed;
  try {
    parsed = parseHostJob(job.name, job.data);
  } catch (err) {
    throw new UnrecoverableError(errorMessage(err));
  }
  const marker = `vmvault:commit:${ctx.queueName}:${job.id}`;
  try {
    if (parsed.name === 'export') return await ctx.exports.start(parsed.payload); // Touches no VM: no VM lock.
    if (parsed.name === 'drill') return await runDrillJob(ctx, job, parsed.payload); // Reads the repository only: no VM lock.
    const done = await earlierResult(ctx, marker);
    if (done) return done;
    const vm = parsed.name === 'restore' ? await vmOfBackup(ctx, parsed.payload) : parsed.payload.vm;
    let guard: JobGuard | undefined;
    const lock = await tryAcquireVmLock(ctx.locks, vm, {
      ttlMs: ctx.opts.vmLockTtlMs, holder: `${ctx.opts.host}/${job.id}`,
      onLost: (why) => guard?.abort({ kind: 'lost', message: why }),
    });
    if (!lock) return await postpone(ctx, job, token, vm);
    guard = new JobGuard(job, token, lock, ctx.opts.jobLockMs);
    const onCancel = () => guard?.abort({ kind: 'cancelled', message: String(signal?.reason ?? 'cancelled') });
    signal?.addEventListener('abort', onCancel);
    ctx.guards.set(job.id!, guard);
    try {
      if (parsed.name === 'snapshot') {
        const result = await runSnapshotJob({
          host: ctx.opts.host, stateDir: ctx.opts.stateDir, repo: guard.wrap(ctx.repo, async () => {}),
          warn: (message, fields) => ctx.log.warn({ job: job.id, ...fields }, message),
        }, parsed.payload);
        // A create or revert must not run again if this job is handed to another worker after finishing.
        await ctx.locks.set(marker, JSON.stringify({ result, startedAt: result.startedAt }), 'EX', MARKER_TTL_S);
        return result;
      }
      return parsed.name === 'backup'
        ? await runBackup(ctx, job, guard, parsed.payload, marker)
        : await runRestore(ctx, job, guard, parsed.payload, marker);
    } catch (err) {
      if (err instanceof JobAbortedError && err.reason.kind === 'shutdown') return await handBack(job, token);
      throw err;
    } finally {
      signal?.removeEventListener('abort', onCancel);
      ctx.guards.delete(job.id!);
      await lock.release().catch((err: unknown) => ctx.log.warn({ vm, err: errorMessage(err) }, 'could not release the VM lock (it will expire)'));
    }
  } catch (err) {
    await recordFailureCode(job, err);
    throw toJobError(err);
  }
}

/** The VM is busy: try again when its lock should be free, without spending an attempt. */
async function postpone(ctx: Context, job: Job, token: string, vm: string): Promise<never> {
  const remaining = await vmLockRemainingMs(ctx.locks, vm);
  const wait = Math.min(ctx.opts.busyRetryMs, Math.max(remaining, 0)) + Math.floor(Math.random() * 50);
  ctx.log.info({ job: job.id, vm, wait }, 'VM busy with another job: postponed');
  await job.moveToDelayed(Date.now() + Math.max(wait, 20), token);
  throw new DelayedError();
}

/** Shutdown: put the job back (delayed by nothing) so another worker takes it, without spending an attempt. */
async function handBack(job: Job, token: string): Promise<never> {
  await job.moveToDelayed(Date.now(), token);
  throw new DelayedError();
}

async function vmOfBackup(ctx: Context, p: RestorePayload): Promise<string> {
  return (await ctx.repo.loadManifest(await ctx.repo.resolveBackupId(p.backupId))).vm;
}

/** The result of an earlier attempt that committed before its job could complete (crash, lost lock). */
async function earlierResult(ctx: Context, marker: string): Promise<HostJobResult | undefined> {
  const raw = await ctx.locks.get(marker);
  if (!raw) return undefined;
  const m = JSON.parse(raw) as { backup?: string; result?: HostJobResult; startedAt: number };
  if (m.result) return m.result;
  if (!m.backup) return undefined;
  if (!(await ctx.repo.backupIds()).includes(m.backup)) return undefined; // Crashed before the manifest was written.
  const manifest = await ctx.repo.loadManifest(m.backup);
  ctx.log.info({ backup: m.backup }, 'an earlier attempt already committed this backup');
  return { ...summarise(manifest), stats: manifest.stats, startedAt: m.startedAt, finishedAt: Date.now(), reused: true };
}

async function runBackup(ctx: Context, job: Job, guard: JobGuard, p: BackupPayload, marker: string): Promise<BackupJobResult> {
  const startedAt = Date.now();
  const progress = progressReporter(ctx, job);
  // The marker is written before the manifest: a retry finds it and, if the manifest exists, reports instead of backing up again.
  const repo = guard.wrap(ctx.repo, async (m) => {
    await ctx.locks.set(marker, JSON.stringify({ backup: m.id, startedAt }), 'EX', MARKER_TTL_S);
  });
  // The driver decides how the point in time is taken (DESIGN.md, data path step 1).
  const warn = (message: string, fields?: Record<string, unknown>) => ctx.log.warn({ job: job.id, vm: p.vm, ...fields }, message);
  const done = await backupVm(repo, {
    vm: p.vm, driver: p.driver ?? 'image', disks: p.disks, configs: p.configs, labels: p.labels, host: ctx.opts.host,
    ...(p.policy ? { policy: p.policy } : {}), onProgress: progress.report, warn, chunkPool: () => ctx.pools.lease(), signal: guard.signal,
    ...(p.qmpSocket ? { qmpSocket: p.qmpSocket } : {}), ...(p.guestAgentSocket ? { guestAgentSocket: p.guestAgentSocket } : {}),
    ...(p.libvirtDomain ? { domain: p.libvirtDomain } : {}),
    ...(p.fullReadEvery ? { fullReadEveryMs: durationMs(parseDuration(p.fullReadEvery)) } : {}),
  });
  const { manifest, stats } = done;
  for (const message of auditFailures(manifest)) ctx.log.error({ job: job.id, vm: p.vm, backup: manifest.id }, message);
  await progress.flush();
  if (p.policy) {
    // The policy's retention now has a new backup to count: prune this VM (one job per backup, deduplicated by id).
    await enqueueMaintenance(ctx.maintenance, { kind: 'prune', policy: p.policy, vms: [p.vm] }, { jobId: deterministicJobId(['prune', p.policy, p.vm, manifest.id]) })
      .catch((err: unknown) => ctx.log.warn({ err: errorMessage(err), policy: p.policy, vm: p.vm }, 'could not enqueue the prune that follows a backup'));
  }
  return { ...summarise(manifest), stats, ...(p.slot ? { slot: p.slot } : {}), startedAt, finishedAt: Date.now() };
}

/**
 * A restore drill (vm/drill.ts): the result is recorded in the repository either way; a
 * failed boot then fails the job (DRILL_FAILED, not retried), so it raises what any
 * failed job raises.
 */
async function runDrillJob(ctx: Context, job: Job, p: DrillPayload): Promise<DrillResult> {
  const backupId = p.backupId ? await ctx.repo.resolveBackupId(p.backupId) : await resolveDrillTarget(ctx.repo, p.vm!);
  const r = await drillBackup(ctx.repo, {
    backupId, stateDir: ctx.opts.stateDir, host: ctx.opts.host, timeoutMs: p.timeoutSeconds * 1000, ...(p.probe ? { probe: p.probe } : {}),
  });
  ctx.log[r.status === 'boot-verified' ? 'info' : 'error']({ job: job.id, backup: r.backup, vm: r.vm, status: r.status, reason: r.reason, serialLog: r.serialLog, screenshot: r.screenshot }, 'restore drill');
  if (r.status === 'boot-failed') throw drillFailure(r);
  return r;
}

async function runRestore(ctx: Context, job: Job, guard: JobGuard, p: RestorePayload, marker: string): Promise<RestoreJobResult> {
  const startedAt = Date.now();
  const directory = path.resolve(p.directory);
  const roots = ctx.opts.restoreRoots;
  // A queued restore comes from someone else (the API): it writes only inside the roots this host allows.
  if (!roots?.length) {
    throw new VmvaultError('BAD_INPUT', `host "${ctx.opts.host}" has no restoreRoots in its configuration, so it takes no restore jobs: add hosts: { ${ctx.opts.host}: { restoreRoots: [/var/lib/vmvault/restore] } } (or restore with the vmvault CLI on this host); nothing was written`);
  }
  const progress = progressReporter(ctx, job);
  const backupId = await ctx.repo.resolveBackupId(p.backupId);
  const r = await restore(guard.wrap(ctx.repo, async () => {}), {
    backupId, to: directory, force: p.overwrite, onProgress: progress.report, roots, chunkPool: () => ctx.pools.lease(), signal: guard.signal,
    // Restore jobs come from the API: its request field is "overwrite".
    forceHint: 'set "overwrite": true in the restore request to replace them',
    ...(p.format ? { format: p.format } : {}), ...(p.disks ? { disks: p.disks } : {}),
    ...(p.diskPaths ? { diskPaths: p.diskPaths } : {}), ...(p.name !== undefined ? { name: p.name } : {}),
  });
  await guard.confirmOwnership();
  const result: RestoreJobResult = { ...r, directory, startedAt, finishedAt: Date.now() };
  await ctx.locks.set(marker, JSON.stringify({ result, startedAt }), 'EX', MARKER_TTL_S);
  await progress.flush();
  return result;
}

/** Job progress at most every progressIntervalMs (and always the last one), sent in order. */
function progressReporter(ctx: Context, job: Job): { report: (p: Progress) => void; flush: () => Promise<void> } {
  let last = 0;
  let chain: Promise<void> = Promise.resolve();
  return {
    report: (p) => {
      const now = Date.now();
      if (now - last < ctx.opts.progressIntervalMs && p.bytesDone < p.bytesTotal) return;
      last = now;
      const body = { phase: p.phase, ...(p.disk ? { disk: p.disk } : {}), bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, bytesPerSecond: Math.round(p.bytesPerSecond) };
      chain = chain.then(() => job.updateProgress(body)).catch((err: unknown) => ctx.log.warn({ job: job.id, err: errorMessage(err) }, 'progress update failed'));
    },
    flush: () => chain,
  };
}

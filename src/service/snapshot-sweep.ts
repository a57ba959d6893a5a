/**
 * The expiry sweep of a host's on-demand snapshots, run by the host's worker
 * service: once at start, then every few minutes. Snapshots live on the host's own
 * disks, so each host sweeps its own VMs; each VM is swept under the queue's VM
 * lock, so a sweep never deletes a snapshot while a backup or a snapshot job works
 * on that VM (a busy VM waits for the next sweep).
 */
import type { Logger } from 'pino';
import type { Config } from '../config/schema.js';
import { errorMessage } from '../errors.js';
import { closeRedis, createConnection } from '../queue/connection.js';
import { tryAcquireVmLock } from '../queue/vm-lock.js';
import { expireSnapshots, type ExpiryReport } from '../vm/snapshots.js';

export const DEFAULT_SWEEP_INTERVAL_MS = 5 * 60_000;

export interface SnapshotSweep {
  /** Runs one sweep now (after any running one); resolves with its report. */
  runNow(): Promise<ExpiryReport>;
  stop(): Promise<void>;
}

export function startSnapshotSweep(
  config: Pick<Config, 'vms' | 'stateDir'>, host: string, opts: { redisUrl: string; logger: Logger; intervalMs?: number; now?: () => Date },
): SnapshotSweep {
  const log = opts.logger.child({ sweep: 'snapshots' });
  const redis = createConnection(opts.redisUrl, 'producer');
  redis.on('error', (err) => log.warn({ err: err.message }, 'redis connection error'));
  const exclusive = async <T>(vm: string, fn: () => Promise<T>): Promise<T | undefined> => {
    const lock = await tryAcquireVmLock(redis, vm, { holder: `${host}/snapshot-expiry` });
    if (!lock) return undefined;
    try {
      return await fn();
    } finally {
      await lock.release().catch(() => {});
    }
  };
  let chain: Promise<unknown> = Promise.resolve();
  const sweep = (): Promise<ExpiryReport> => {
    const run = chain.then(async () => {
      const report = await expireSnapshots(config, host, opts.now?.() ?? new Date(), { exclusive });
      for (const s of report.deleted) log.info({ vm: s.vm, snapshot: s.name, expiresAt: s.expiresAt }, 'expired snapshot deleted');
      for (const f of report.failed) log.warn({ vm: f.vm, snapshot: f.name, err: f.error }, 'expired snapshot not deleted: the next sweep tries again');
      if (report.busy.length) log.info({ vms: report.busy }, 'VMs busy: their expired snapshots wait for the next sweep');
      return report;
    });
    chain = run.catch(() => {});
    return run;
  };
  const logged = () => void sweep().catch((err: unknown) => log.error({ err: errorMessage(err) }, 'snapshot expiry sweep failed'));
  logged();
  const timer = setInterval(logged, opts.intervalMs ?? DEFAULT_SWEEP_INTERVAL_MS);
  timer.unref();
  let stopping: Promise<void> | undefined;
  return {
    runNow: sweep,
    stop: () => (stopping ??= (async () => {
      clearInterval(timer);
      await chain;
      await closeRedis(redis);
    })()),
  };
}

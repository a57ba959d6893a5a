/**
 * The maintenance worker: consumes the shared queue (prune, gc, verify), which any
 * host may run (copy, too: every host's configuration needs the same maintenance.copy). Prune finds its policy by name in the policies directory, and hands
 * prune the other policies there and the inventory (to resolve tags): an on-demand
 * backup goes only when every policy selecting its VM would remove it. GC takes
 * the repository's exclusive lock; while backups hold shared ones it fails with a
 * retriable LOCKED error and BullMQ tries again later with backoff. A verify that
 * finds problems fails the job, naming them, so that it shows in job history.
 */
import { Worker } from 'bullmq';
import { pino, type Logger } from 'pino';
import { IntegrityError, NotFoundError, VmvaultError } from '../src/errors.js';
import { copyBackups } from '../src/pipeline/copy.js';
import { loadPolicies } from '../src/policy/load.js';
import type { Policy } from '../src/policy/schema.js';
import { selectionOf, type InventoryVm } from '../src/policy/select.js';
import { prune } from '../src/pipeline/prune.js';
import { verify } from '../src/pipeline/verify.js';
import { parseSubset } from '../src/pipeline/subset.js';
import { collectGarbage } from '../src/repo/gc.js';
import { Repository } from '../src/repo/repository.js';
import { openStorage } from '../src/storage/open.js';
import { checkNoEviction, closeRedis, createConnection, queueOptions } from '../src/queue/connection.js';
import { MAINTENANCE_QUEUE } from '../src/queue/names.js';
import { parseMaintenancePayload, type MaintenancePayload } from '../src/queue/payloads.js';
import { toJobError } from './job-errors.js';
import { recordFailureCode } from '../src/queue/job-failures.js';

export interface MaintenanceWorkerOptions {
  redisUrl: string;
  repoUrl: string;
  passphrase: string;
  policiesDir: string;
  /**
   * The VMs of the inventory (read at each prune: it may change), to resolve the
   * policies' tags. Without it, or for a VM it does not list, a policy selecting by
   * tag governs no on-demand backup of that VM, and counts as wanting to keep them.
   */
  inventory?: () => readonly InventoryVm[];
  logger?: Logger;
  stalledIntervalMs?: number;
  /**
   * Where `copy` jobs copy the repository's backups (config maintenance.copy.to), with its
   * passphrase: read at each job, so a worker whose copy settings are wrong still runs
   * the other jobs, and its copy jobs fail saying why.
   */
  copyTo?: () => Promise<{ url: string; passphrase: string }>;
}

export interface MaintenanceWorker { close(): Promise<void> }

export async function startMaintenanceWorker(options: MaintenanceWorkerOptions): Promise<MaintenanceWorker> {
  const log = (options.logger ?? pino({ name: 'vmvault-maintenance' })).child({ queue: MAINTENANCE_QUEUE });
  const connection = createConnection(options.redisUrl, 'worker');
  connection.on('error', (err: Error) => log.warn({ err: err.message }, 'redis connection error'));
  let repo: Repository;
  try {
    await checkNoEviction(connection);
    repo = await Repository.open(openStorage(options.repoUrl), options.passphrase);
  } catch (err) {
    await closeRedis(connection);
    throw err;
  }
  const worker = new Worker(MAINTENANCE_QUEUE, async (job) => {
    try {
      const payload = parseMaintenancePayload(job.data);
      log.info({ job: job.id, kind: payload.kind }, 'maintenance job started');
      return await run(repo, options, payload, log);
    } catch (err) {
      await recordFailureCode(job, err);
      throw toJobError(err);
    }
  }, { ...queueOptions(connection), concurrency: 1, autorun: false, ...(options.stalledIntervalMs ? { stalledInterval: options.stalledIntervalMs } : {}) });
  worker.on('error', (err) => log.error({ err: err.message }, 'worker error'));
  worker.on('failed', (job, err) => log.warn({ job: job?.id, err: err.message }, 'maintenance job failed'));
  void worker.run();
  return {
    close: async () => {
      await worker.close();
      await closeRedis(connection);
    },
  };
}

async function run(repo: Repository, options: MaintenanceWorkerOptions, p: MaintenancePayload, log: Logger): Promise<unknown> {
  switch (p.kind) {
    case 'prune': {
      const { policy, policies, invalidFiles } = await findPolicy(options.policiesDir, p.policy);
      const warnings: string[] = [];
      const warn = (message: string) => {
        warnings.push(message);
        log.warn({ policy: policy.name }, message);
      };
      if (invalidFiles.length) {
        warn(`policy file(s) ${invalidFiles.join(', ')} cannot be read: prune removes no on-demand backup until they are fixed (what they select is unknown); "vmvault policy validate" shows the problems`);
      }
      const plan = await prune(repo, policy, {
        dryRun: p.dryRun, ...(p.vms ? { onlyVms: p.vms } : {}), warn,
        selection: selectionOf(options.inventory), policies, invalidPolicyFiles: invalidFiles,
      });
      return {
        policy: policy.name, dryRun: p.dryRun, kept: plan.filter((d) => d.keep).length, removed: plan.filter((d) => !d.keep).map((d) => d.id),
        ...(warnings.length ? { warnings } : {}),
      };
    }
    case 'gc': {
      const report = await collectGarbage(repo, { dryRun: p.dryRun });
      if (report.damagedManifests.length > 0) {
        // Deleting nothing was the safe thing to do, but the job did not do its work: it must not look like a success.
        throw new IntegrityError(`gc deleted no chunk: ${report.damagedManifests.length} backup manifest(s) cannot be read ` +
          `(${report.damagedManifests.map((d) => d.problem).join('; ')}), and any unused chunk may be theirs. ` +
          'Put a good copy of each back, or run "vmvault repair --remove" if those backups are lost, then run gc again');
      }
      return report;
    }
    case 'copy': {
      if (!options.copyTo) {
        throw new VmvaultError('BAD_INPUT', 'a copy job reached a worker whose configuration has no maintenance.copy.to: give every host\'s configuration the same maintenance.copy');
      }
      const where = await options.copyTo();
      const storage = openStorage(where.url);
      try {
        const to = await Repository.open(storage, where.passphrase);
        const result = await copyBackups(repo, to);
        const failed = result.skipped.filter((x) => x.failed);
        for (const s of failed) log.warn({ backup: s.id }, `not copied: ${s.skipped}`);
        if (failed.length) {
          throw new IntegrityError(`copied ${result.copied.length} backup(s), but ${failed.length} could not be copied: ` +
            failed.map((x) => `${x.id.slice(0, 12)}: ${x.skipped}`).join('; '));
        }
        return {
          to: to.storage.location, copied: result.copied.map((c) => c.id), skipped: result.skipped.length,
          chunksUploaded: result.copied.reduce((n, c) => n + c.chunksUploaded, 0), bytesUploaded: result.copied.reduce((n, c) => n + c.bytesUploaded, 0),
        };
      } finally {
        await storage.close();
      }
    }
    case 'verify': {
      const report = await verify(repo, {
        readData: p.readData, ...(p.readDataSubset ? { readDataSubset: parseSubset(p.readDataSubset) } : {}), ...(p.backups ? { backupIds: p.backups } : {}),
      });
      for (const w of report.warnings) log.warn({}, w);
      if (!report.ok) {
        throw new IntegrityError(`verify found ${report.problems.length} problem(s)${report.recorded ? ' (quarantined: the next backups that produce them heal them)' : ''}: ` +
          report.problems.map((x) => `${x.object}: ${x.problem} (backups ${x.backups.join(', ')})`).join('; '));
      }
      return report;
    }
  }
}

/** The policy named `name`, every valid policy of `dir`, and the files that are not valid. */
async function findPolicy(dir: string, name: string): Promise<{ policy: Policy; policies: Policy[]; invalidFiles: string[] }> {
  const { policies, problems } = await loadPolicies(dir);
  const found = policies.find((l) => l.policy.name === name);
  if (!found) throw new NotFoundError(`policy "${name}" is not among the valid policies in ${dir}`);
  return { policy: found.policy, policies: policies.map((l) => l.policy), invalidFiles: [...new Set(problems.map((x) => x.file))] };
}

/**
 * The long-running parts of vmvault, wired together:
 * - runScheduler(config): the Scheduler (node-cron) enqueuing backups on BullMQ host queues;
 * - runWorker(config, {host}): the host agent (workers/host-agent.ts) of one host;
 * - up(config): both in one process for this host, plus (when the configuration
 *   names none) its own redis-server on a unix socket and a directory repository,
 *   both in the state directory.
 *
 * Tuning for tests and special setups, from the environment (milliseconds):
 *   VMVAULT_JOB_LOCK_MS        BullMQ job lock of the worker (default 30000)
 *   VMVAULT_STALLED_INTERVAL_MS how often a crashed worker's jobs are looked for (default 30000, BullMQ's)
 *   VMVAULT_VM_LOCK_TTL_MS     per-VM lock lifetime without refresh (default 60000)
 *   VMVAULT_CLOSE_TIMEOUT_MS   how long a stopping worker lets its running job finish (default 60000)
 *   VMVAULT_SNAPSHOT_SWEEP_MS  how often a worker deletes its host's expired snapshots (default 300000)
 *   VMVAULT_HEARTBEAT_MS       how often a worker refreshes its heartbeat in Redis (default 10000; gone after 3 missed)
 * and VMVAULT_API_LISTEN (host:port) overrides api.listen.
 */
import { mkdir, stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { passphrase as readPassphrase } from '../config/passphrase.js';
import { parseConfig, selectVms } from '../config/load.js';
import { VmInventory } from '../config/inventory.js';
import type { Config, RepositoryConfig } from '../config/schema.js';
import { NAME_RE } from '../policy/schema.js';
import { errnoCode, errorMessage, VmvaultError } from '../errors.js';
import { checkNoEviction, closeRedis, createConnection } from '../queue/connection.js';
import { startEmbeddedRedis, type EmbeddedRedis } from '../queue/embedded-redis.js';
import { QueueSet, enqueueBackup, enqueueDrill, enqueueMaintenance } from '../queue/enqueue.js';
import { policyFirstSeen } from '../queue/first-seen.js';
import { backupPayloadFor, drillPayloadFor } from '../queue/payloads.js';
import { Catalogue } from '../repo/catalogue.js';
import { Repository } from '../repo/repository.js';
import { Scheduler } from '../scheduler/scheduler.js';
import { openStorage } from '../storage/open.js';
import { startApiServer, type ApiServer } from '../api/server.js';
import { startHostWorker, type HostWorker } from '../../workers/host-agent.js';
import { startMaintenanceWorker } from '../../workers/maintenance.js';
import { adminTokenForStart, withStateToken } from './admin-token.js';
import { joinCommand, joinRedisUrl, parseRedisListen, REDIS_PASSWORD_FILE, stateRedisPassword } from './join.js';
import { startSnapshotSweep } from './snapshot-sweep.js';
import { stateRepository } from './state-repository.js';
import { startAlerts } from '../ops/alerts/start.js';
import { VerificationCache } from '../repo/health.js';

export interface Service { stop(): Promise<void> }

export interface ServiceOptions {
  logger?: Logger;
  env?: NodeJS.ProcessEnv;
}

/** Logs go to stderr, as JSON lines (pino): stdout is left to what the operator must read. */
export function serviceLogger(name: string): Logger {
  return pino({ name, level: process.env.VMVAULT_LOG_LEVEL ?? 'info' }, pino.destination(2));
}

function envMs(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const v = env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new VmvaultError('BAD_INPUT', `${name}=${v}: expected a whole number of milliseconds > 0`);
  return n;
}

/**
 * How long a stopping service may take before it gives up: the workers' close timeout
 * (VMVAULT_CLOSE_TIMEOUT_MS, default 60 s, in which a running job may finish) and 15 s
 * to hand it back and close connections.
 */
export function stopDeadlineMs(env: NodeJS.ProcessEnv): number {
  return (envMs(env, 'VMVAULT_CLOSE_TIMEOUT_MS') ?? 60_000) + 15_000;
}

/** Where the repository is and its passphrase, from config.repository. */
export async function repositoryFrom(config: Config): Promise<{ url: string; passphrase: string }> {
  const r = config.repository;
  if (!r) throw new VmvaultError('BAD_INPUT', 'no repository in the configuration: add repository: { url, passwordFile } (or run "vmvault up", which makes one in its state directory)');
  return openingOf(r);
}

/**
 * The off-site repository of maintenance.copy and its passphrase, read at each copy job
 * and never prompted for (a worker on a terminal would wait there, unseen): a missing
 * file or variable fails the job, saying which and where.
 */
async function copyTarget(r: RepositoryConfig): Promise<{ url: string; passphrase: string }> {
  if ('passwordFile' in r && r.passwordFile !== undefined) return openingOf(r);
  const name = (r as { passwordEnv: string }).passwordEnv;
  const value = process.env[name];
  if (!value) {
    throw new VmvaultError('BAD_INPUT', `maintenance.copy.to: the environment variable ${name} (the passphrase of the repository copied to) is not set ` +
      `for this worker on ${hostname()}: set it in the worker's environment, or give maintenance.copy.to.passwordFile`);
  }
  return { url: r.url, passphrase: value };
}

/** A configured repository's URL and passphrase (from its passwordFile or passwordEnv). */
async function openingOf(r: RepositoryConfig): Promise<{ url: string; passphrase: string }> {
  const pass = 'passwordFile' in r && r.passwordFile !== undefined
    ? await readPassphrase(r.passwordFile, 'VMVAULT_PASSWORD', 'repository passphrase: ')
    : await readPassphrase(undefined, (r as { passwordEnv: string }).passwordEnv, 'repository passphrase: ');
  return { url: r.url, passphrase: pass };
}

function redisFrom(config: Config): string {
  if (!config.redis.url) throw new VmvaultError('BAD_INPUT', 'no Redis in the configuration: add redis: { url: redis://HOST:PORT } (or run "vmvault up", which starts its own)');
  return config.redis.url;
}

/**
 * Makes sure the policies directory is there before the scheduler reads and watches it:
 * the default one (the configuration names none) is created empty; one the
 * configuration names is never created (a typo would otherwise run no policy at all,
 * silently), so a missing one is a BAD_INPUT error saying what to do.
 */
export async function preparePoliciesDir(config: Pick<Config, 'policiesDir' | 'policiesDirDefaulted'>, log?: Logger): Promise<void> {
  const dir = config.policiesDir;
  try {
    if ((await stat(dir)).isDirectory()) return;
    throw new VmvaultError('BAD_INPUT', `policiesDir ${dir} is not a directory: point policiesDir in the configuration at the directory that holds the policy files`);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') {
      if (err instanceof VmvaultError) throw err;
      throw new VmvaultError('BAD_INPUT', `cannot read policiesDir ${dir}: ${errorMessage(err)}`, { cause: err });
    }
  }
  if (!config.policiesDirDefaulted) {
    throw new VmvaultError('BAD_INPUT', `policiesDir ${dir} does not exist: create it (mkdir -p ${dir}) and put the policy files there, or set policiesDir in the configuration to the directory that holds them`);
  }
  await mkdir(dir, { recursive: true });
  log?.info({ policiesDir: dir }, 'created the policies directory (empty: no backups are scheduled until a policy is added)');
}

/** The scheduler, enqueuing on BullMQ. Resolves once policies are loaded and missed slots caught up. */
export async function runScheduler(
  config: Config,
  opts: ServiceOptions & { redisUrl?: string; repository?: { url: string; passphrase: string } } = {},
): Promise<Service> {
  const log = opts.logger ?? serviceLogger('vmvault-scheduler');
  await preparePoliciesDir(config, log);
  const redisUrl = opts.redisUrl ?? redisFrom(config);
  const where = opts.repository ?? await repositoryFrom(config);
  const repo = await Repository.open(openStorage(where.url), where.passphrase);
  const connection = createConnection(redisUrl, 'producer');
  connection.on('error', (err) => log.warn({ err: err.message }, 'redis connection error'));
  const queues = new QueueSet(connection);
  const { of: queueOf, maintenance } = queues;
  // Catch-up asks for every (policy, VM): the backup summaries are read at most once per minute (or per alert check), not once per question.
  const refreshMs = Math.min(config.alerts?.checkEvery ?? 60_000, 60_000);
  const catalogue = new Catalogue(repo, refreshMs);
  const scheduler = new Scheduler({
    policiesDir: config.policiesDir,
    log,
    select: (policy) => {
      const { vms, unknown } = selectVms(config, policy.select);
      return { vms: vms.map((vm) => ({ name: vm.name, host: vm.host })), unknown };
    },
    enqueueBackup: async ({ jobId, host, vm, policy, slot }) => {
      // config.vms is live (the state directory's VM file adds to it).
      const v = config.vms.find((x) => x.name === vm);
      if (!v) throw new VmvaultError('NOT_FOUND', `VM "${vm}" is not in the inventory`);
      const job = await enqueueBackup(queueOf(host), backupPayloadFor(v, {
        labels: policy.labels ?? [], policy: policy.name, slot: slot.toISOString(), ...(policy.fullReadEvery ? { fullReadEvery: policy.fullReadEvery } : {}),
      }), { jobId });
      log.info({ policy: policy.name, vm, host, job: job.id, slot }, 'backup enqueued');
    },
    lastBackup: async (policy, vm) => {
      const times = (await catalogue.list()).filter((m) => m.policy === policy && m.vm === vm).map((m) => Date.parse(m.time));
      return times.length ? new Date(Math.max(...times)) : undefined;
    },
    catchUp: (opts.env ?? process.env).VMVAULT_NO_CATCH_UP ? false : true,
    firstSeen: (policy) => policyFirstSeen(connection, policy),
    maintenance: config.maintenance,
    enqueueMaintenance: async ({ jobId, payload }) => {
      await enqueueMaintenance(maintenance, payload, { jobId });
    },
    enqueueDrill: async ({ jobId, host, vm, policy, slot }) => {
      const job = await enqueueDrill(queueOf(host), drillPayloadFor(vm, policy, slot), { jobId });
      log.info({ policy: policy.name, vm, host, job: job.id, slot }, 'drill enqueued');
    },
  });
  let alerts: Awaited<ReturnType<typeof startAlerts>>;
  try {
    await scheduler.start();
    // Alerts (config alerts:) are checked here: one place that sees every queue, whichever host runs the jobs.
    const verification = new VerificationCache(repo, refreshMs);
    alerts = await startAlerts(config, { config, redis: connection, backups: () => catalogue.list(), unreadable: () => catalogue.unreadable(), verification: () => verification.get(), queueOf, maintenance }, log, opts.env);
  } catch (err) {
    await scheduler.stop().catch(() => {});
    await queues.close();
    await closeRedis(connection);
    throw err;
  }
  log.info({ policiesDir: config.policiesDir, policies: scheduler.scheduled().map((p) => p.name) }, 'scheduler started');
  let stopping: Promise<void> | undefined;
  return {
    stop: () => (stopping ??= (async () => {
      await alerts?.stop();
      await scheduler.stop();
      await queues.close();
      await closeRedis(connection);
      log.info({}, 'scheduler stopped');
    })()),
  };
}

/** The HTTP API on api.listen, or on VMVAULT_API_LISTEN when set. */
function startApi(config: Config, opts: ServiceOptions, where: Omit<Parameters<typeof startApiServer>[1], 'listen'>): Promise<ApiServer> {
  const listen = (opts.env ?? process.env).VMVAULT_API_LISTEN;
  return startApiServer(config, { ...where, ...(listen ? { listen } : {}) });
}

/** `vmvault serve`: the scheduler and the HTTP API. */
export async function runServe(
  config: Config,
  opts: ServiceOptions & { redisUrl?: string; repository?: { url: string; passphrase: string }; say?: (line: string) => void; terminal?: boolean } = {},
): Promise<Service> {
  const log = opts.logger ?? serviceLogger('vmvault');
  const redisUrl = opts.redisUrl ?? redisFrom(config);
  const repository = opts.repository ?? await repositoryFrom(config);
  await preparePoliciesDir(config, log);
  // As up does: with no admin token configured, the first start makes one (shown once, kept hashed in stateDir).
  const say = opts.say ?? ((line: string) => process.stdout.write(`${line}\n`));
  const terminal = opts.terminal ?? stdoutIsTerminal();
  const adminToken = await adminTokenForStart(config, config.stateDir);
  const inventory = await startInventory(config, log);
  const scheduler = await runScheduler(config, { ...opts, logger: log, redisUrl, repository }).catch((err: unknown) => {
    inventory.stop();
    throw err;
  });
  const apiConfig = withStateToken(config, adminToken.hash);
  const api = await startApi(apiConfig, opts, { redisUrl, repository, logger: log, inventory }).catch(async (err: unknown) => {
    await scheduler.stop();
    inventory.stop();
    throw err;
  });
  await adminToken.announce({ say, terminal }).catch(async (err: unknown) => {
    await api.stop();
    await scheduler.stop();
    inventory.stop();
    throw err;
  });
  say(`vmvault: serve: API on ${api.url} (routes under /v1; dashboard: ${api.url}/); add VMs with POST /v1/vms or in ${inventory.file}`);
  let stopping: Promise<void> | undefined;
  return { stop: () => (stopping ??= (async () => { await api.stop(); await scheduler.stop(); inventory.stop(); })()) };
}

/** The state directory's VM file, loaded into config.vms and watched (an invalid file stops the start, naming its problems). */
async function startInventory(config: Config, log: Logger): Promise<VmInventory> {
  const inventory = new VmInventory(config, log.child({ component: 'inventory' }));
  await inventory.start();
  if (inventory.fromFile().length) log.info({ file: inventory.file, vms: inventory.fromFile().map((v) => v.name) }, 'VMs of the VM file');
  return inventory;
}

/** The host agent of `host` (default: config.host). */
export async function runWorker(
  config: Config,
  opts: ServiceOptions & { host?: string; redisUrl?: string; repository?: { url: string; passphrase: string } } = {},
): Promise<Service> {
  const env = opts.env ?? process.env;
  const host = opts.host ?? config.host;
  const log = opts.logger ?? serviceLogger('vmvault-worker');
  const redisUrl = opts.redisUrl ?? redisFrom(config);
  const where = opts.repository ?? await repositoryFrom(config);
  const jobLockMs = envMs(env, 'VMVAULT_JOB_LOCK_MS');
  const vmLockTtlMs = envMs(env, 'VMVAULT_VM_LOCK_TTL_MS');
  const closeTimeoutMs = envMs(env, 'VMVAULT_CLOSE_TIMEOUT_MS');
  const stalledMs = envMs(env, 'VMVAULT_STALLED_INTERVAL_MS');
  const heartbeatMs = envMs(env, 'VMVAULT_HEARTBEAT_MS');
  const restoreRoots = config.hosts[host]?.restoreRoots;
  // Restore roots inside the state directory are vmvault's own: made when missing (an empty container volume).
  for (const root of restoreRoots ?? []) {
    if (root.startsWith(`${config.stateDir}/`)) await mkdir(root, { recursive: true, mode: 0o700 });
  }
  const worker: HostWorker = await startHostWorker({
    host, redisUrl, repoUrl: where.url, passphrase: where.passphrase, logger: log,
    ...(jobLockMs ? { jobLockMs } : {}), ...(vmLockTtlMs ? { vmLockTtlMs } : {}), ...(closeTimeoutMs ? { closeTimeoutMs } : {}),
    ...(restoreRoots && restoreRoots.length ? { restoreRoots } : {}), ...(stalledMs ? { stalledIntervalMs: stalledMs } : {}),
    ...(heartbeatMs ? { heartbeatMs } : {}), stateDir: config.stateDir,
    ...(config.hosts[host]?.exportAddress ? { exportAddress: config.hosts[host].exportAddress } : {}),
  });
  // Every host agent also serves the shared maintenance queue (prune, gc, verify).
  const maintenance = await startMaintenanceWorker({
    redisUrl, repoUrl: where.url, passphrase: where.passphrase, policiesDir: config.policiesDir, logger: log,
    // Live under up (the VM file adds to config.vms); a worker of another host knows its configuration's VMs only.
    inventory: () => config.vms,
    ...(stalledMs ? { stalledIntervalMs: stalledMs } : {}),
    ...(config.maintenance.copy ? { copyTo: () => copyTarget(config.maintenance.copy!.to) } : {}),
  }).catch(async (err: unknown) => {
    await worker.close();
    throw err;
  });
  // Expired on-demand snapshots of this host's VMs: once now, then periodically.
  const sweepMs = envMs(env, 'VMVAULT_SNAPSHOT_SWEEP_MS');
  const sweep = startSnapshotSweep(config, host, { redisUrl, logger: log, ...(sweepMs ? { intervalMs: sweepMs } : {}) });
  let stopping: Promise<void> | undefined;
  return {
    stop: () => (stopping ??= (async () => {
      await Promise.all([worker.close(), maintenance.close(), sweep.stop()]);
      log.info({ host }, 'worker stopped');
    })()),
  };
}

export interface UpOptions extends ServiceOptions {
  /** Overrides config.stateDir (--state-dir, VMVAULT_STATE_DIR). */
  stateDir?: string;
  /** Told to the operator (stdout). */
  say?: (line: string) => void;
  /** Whether `say` reaches a terminal: secrets (a new admin token, the Redis password) are shown only then. Default: stdout is a TTY. */
  terminal?: boolean;
  /** `--redis-listen HOST:PORT`: the embedded Redis also listens there, with a password, for workers on other hosts. */
  redisListen?: string;
}

export interface UpService extends Service {
  stateDir: string;
  redisUrl: string;
  repositoryUrl: string;
  /** Set when up started its own redis-server. */
  redis?: EmbeddedRedis;
}

/**
 * The configuration `vmvault up` uses when there is no configuration file: this
 * host, no VMs, policies in `<stateDir>/policies` (created empty), the state
 * directory's own Redis and repository.
 */
export function defaultConfig(stateDir: string): Config {
  // Restores through the API (and the dashboard) land in STATE_DIR/restores.
  const host = hostname();
  const restores = NAME_RE.test(host) ? `hosts: { ${JSON.stringify(host)}: { restoreRoots: [${JSON.stringify(join(stateDir, 'restores'))}] } }\n` : '';
  const text = `stateDir: ${JSON.stringify(stateDir)}\npoliciesDir: ${JSON.stringify(join(stateDir, 'policies'))}\nvms: []\n${restores}`;
  return parseConfig(text, join(stateDir, '(built-in configuration)'));
}

/** Scheduler and this host's worker in one process, with Redis and a repository of its own when none is configured. */
export async function up(configIn: Config, opts: UpOptions = {}): Promise<UpService> {
  const say = opts.say ?? ((line: string) => process.stdout.write(`${line}\n`));
  const log = opts.logger ?? serviceLogger('vmvault');
  const stateDir = opts.stateDir ?? configIn.stateDir;
  // --state-dir replaces the configuration's stateDir for every part, the worker's snapshot records included.
  const config: Config = { ...configIn, stateDir };
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  await mkdir(config.policiesDir, { recursive: true });
  const tcp = opts.redisListen === undefined ? undefined : parseRedisListen(opts.redisListen);
  if (tcp && config.redis.url) throw new VmvaultError('BAD_INPUT', '--redis-listen is for up\'s own Redis, but the configuration names redis.url: give workers on other hosts that Redis instead');
  const cleanups: Array<() => Promise<void>> = [];
  const unwind = async () => {
    for (const c of cleanups.reverse()) await c().catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'cleanup failed'));
  };
  try {
    let redis: EmbeddedRedis | undefined;
    let redisUrl = config.redis.url;
    let redisPassword: string | undefined;
    if (!redisUrl) {
      redisPassword = tcp ? (await stateRedisPassword(stateDir)).password : undefined;
      redis = await startEmbeddedRedis({
        dir: join(stateDir, 'redis'), socketPath: join(stateDir, 'redis.sock'), ...(tcp ? { tcp: { ...tcp, password: redisPassword! } } : {}),
      });
      cleanups.push(() => redis!.stop());
      redisUrl = redis.url;
      log.info({ socket: redis.socketPath, pid: redis.pid }, 'started redis-server');
    } else {
      const c = createConnection(redisUrl, 'producer');
      c.on('error', () => {});
      try { await checkNoEviction(c); } finally { await closeRedis(c); }
    }
    const repository = config.repository ? await repositoryFrom(config) : await stateRepository(stateDir, say);
    const terminal = opts.terminal ?? stdoutIsTerminal();
    const adminToken = await adminTokenForStart(config, stateDir);
    const inventory = await startInventory(config, log);
    cleanups.push(async () => inventory.stop());
    const scheduler = await runScheduler(config, { ...opts, logger: log, redisUrl, repository });
    cleanups.push(() => scheduler.stop());
    const worker = await runWorker(config, { ...opts, logger: log, redisUrl, repository, host: config.host });
    cleanups.push(() => worker.stop());
    const api = await startApi(withStateToken(config, adminToken.hash), opts, { redisUrl, repository, logger: log, inventory });
    cleanups.push(() => api.stop());
    // Only now: a start that failed has printed no token (and kept no hash of one).
    await adminToken.announce({ say, terminal });
    say(`vmvault: up: host ${config.host}, policies in ${config.policiesDir}, state in ${stateDir}`);
    say(`vmvault: API on ${api.url} (routes under /v1; dashboard: ${api.url}/); add VMs with POST /v1/vms or in ${inventory.file}`);
    if (tcp && redisPassword) {
      const passphraseFile = !config.repository ? join(stateDir, 'passphrase') : 'passwordFile' in config.repository ? config.repository.passwordFile : undefined;
      const passwordFile = join(stateDir, REDIS_PASSWORD_FILE);
      say(`vmvault: Redis also listens on ${opts.redisListen} (password in ${passwordFile}); a worker on another host joins with:`);
      // Off a terminal the command names the password's file, never the password: a journal keeps what is printed.
      const secret = terminal ? { password: redisPassword } : { passwordFile };
      say(`  ${joinCommand({ redisUrl: joinRedisUrl(tcp), ...secret, repoUrl: repository.url, passphraseFile: passphraseFile ?? '/path/to/passphrase' })}`);
      if (!terminal) say(`vmvault: (that host needs a copy of ${passwordFile} at that path, mode 0600)`);
      if (!/^[a-z0-9]+:\/\//.test(repository.url) || repository.url.startsWith('file://')) {
        say(`vmvault: (the repository ${repository.url} is a directory of this host: that host needs it at the same path, e.g. an NFS mount, and a copy of the passphrase file)`);
      }
    }
    let stopping: Promise<void> | undefined;
    return {
      stateDir, redisUrl, repositoryUrl: repository.url, ...(redis ? { redis } : {}),
      // API and scheduler first (no new jobs), then the worker (hands back its running job), then Redis.
      stop: () => (stopping ??= (async () => {
        await api.stop();
        await scheduler.stop();
        inventory.stop();
        await worker.stop();
        if (redis) await redis.stop();
      })()),
    };
  } catch (err) {
    await unwind();
    throw err;
  }
}

/** Whether what the service prints reaches a person at a terminal rather than a journal or a log file. */
const stdoutIsTerminal = (): boolean => process.stdout.isTTY === true;

/** Resolves on the first SIGTERM or SIGINT. */
export function untilSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const on = (sig: NodeJS.Signals) => {
      process.off('SIGTERM', on);
      process.off('SIGINT', on);
      resolve(sig);
    };
    process.on('SIGTERM', on);
    process.on('SIGINT', on);
  });
}

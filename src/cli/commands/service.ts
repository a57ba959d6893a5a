/**
 * `vmvault up` (scheduler, API and this host's worker, with its own Redis and repository
 * when none is configured), `vmvault serve` (the scheduler and the API) and `vmvault worker`.
 * Each runs until SIGTERM or SIGINT, then stops cleanly and exits 0.
 */
import type { Command } from 'commander';
import { configPathFrom, loadConfig, parseConfig } from '../../config/load.js';
import { joinUrlWithPassword, readRedisPasswordFile } from '../../service/join.js';
import type { Config } from '../../config/schema.js';
import { VmvaultError } from '../../errors.js';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Service, serviceLogger } from '../../service/service.js';

/** The service (BullMQ, Redis, the API) loads only for the commands that run it: every other command starts faster. */
const loadService = () => import('../../service/service.js');

interface ServiceFlags { config?: string; host?: string; stateDir?: string; redisListen?: string; join?: string; redisPasswordFile?: string }

async function requireConfig(flags: ServiceFlags): Promise<Config> {
  const file = configPathFrom(flags.config);
  if (!file) throw new VmvaultError('BAD_INPUT', 'no configuration: pass --config FILE or set VMVAULT_CONFIG (see vmvault.example.yaml)');
  return loadConfig(file, flags.host ? { host: flags.host } : {});
}

/**
 * The configuration of `worker --join REDIS_URL` (its password from
 * --redis-password-file or VMVAULT_REDIS_PASSWORD): a configuration file when one is
 * given (its redis.url replaced), else one made of the flags: the repository of
 * --repo (or VMVAULT_REPOSITORY) and --password-file (or VMVAULT_PASSWORD), this
 * host's name (or --host), the state directory.
 */
async function joinConfig(flags: ServiceFlags, globals: { repo?: string; passwordFile?: string }): Promise<Config> {
  const fromFile = flags.redisPasswordFile ? await readRedisPasswordFile(flags.redisPasswordFile) : undefined;
  const redisUrl = joinUrlWithPassword(flags.join!, process.env, fromFile);
  const file = configPathFrom(flags.config);
  if (file) return { ...(await loadConfig(file, flags.host ? { host: flags.host } : {})), redis: { url: redisUrl } };
  const repo = globals.repo ?? (process.env.VMVAULT_REPOSITORY || undefined);
  if (!repo) throw new VmvaultError('BAD_INPUT', 'worker --join needs the repository: pass --repo URL --password-file FILE (as printed by vmvault up), or --config FILE');
  const stateDir = flags.stateDir ?? (process.env.VMVAULT_STATE_DIR || '/var/lib/vmvault');
  const passwordFile = globals.passwordFile;
  const text = [
    `repository: ${JSON.stringify(passwordFile ? { url: repo, passwordFile } : { url: repo, passwordEnv: 'VMVAULT_PASSWORD' })}`,
    `stateDir: ${JSON.stringify(stateDir)}`,
    `policiesDir: ${JSON.stringify(`${stateDir}/policies`)}`,
    'vms: []',
    '',
  ].join('\n');
  // The URL (with its password) stays out of the text: a problem message would quote it.
  return { ...parseConfig(text, '(worker --join)', flags.host ? { host: flags.host } : {}), redis: { url: redisUrl } };
}

/**
 * Starts the service and stops it on the first SIGTERM or SIGINT, whatever state it
 * is in. A signal during start (e.g. a worker still waiting for a Redis it cannot
 * reach) stops what has started, if it finishes starting within a few seconds, and
 * exits otherwise: nothing is running yet. A stop that cannot finish (Redis gone, so
 * a running job cannot be handed back) is abandoned after the workers' close timeout
 * plus a margin, exit code 1: the job's lock then expires and another worker takes it.
 */
async function runUntilSignal(start: () => Promise<Service>, log: ReturnType<typeof serviceLogger>): Promise<void> {
  const { stopDeadlineMs, untilSignal } = await loadService();
  const deadlineMs = stopDeadlineMs(process.env);
  const signal = untilSignal();
  const starting = start();
  const first = await Promise.race([starting.then((service) => ({ service })), signal.then((sig) => ({ sig }))]);
  let service: Service | undefined;
  if ('sig' in first) {
    log.info({ signal: first.sig }, 'stopping before the service had started');
    const late = await Promise.race([starting.catch(() => undefined), sleep(START_GRACE_MS, undefined, { ref: false })]);
    if (!late) {
      log.warn({}, `the service had not started within ${START_GRACE_MS / 1000} s of the signal (is Redis reachable?): exiting with nothing running`);
      return;
    }
    service = late;
  } else {
    service = first.service;
    log.info({ signal: await signal }, 'stopping');
  }
  const stopped = await Promise.race([service.stop().then(() => true), sleep(deadlineMs, undefined, { ref: false }).then(() => false)]);
  if (!stopped) {
    log.error({}, `could not stop cleanly within ${deadlineMs / 1000} s (is Redis reachable?): exiting; a job that was running is taken over by another worker once its lock expires`);
    process.exitCode = 1;
  }
}

/** How long a signal waits for a service still starting before it exits anyway. */
const START_GRACE_MS = 2000;

export function registerServiceCommands(program: Command): void {
  program
    .command('up')
    .description('run the scheduler, the HTTP API and this host\'s worker in one process; with no Redis or repository configured, starts its own in the state directory')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG); without one, an empty inventory and policies in STATE_DIR/policies')
    .option('--state-dir <dir>', 'state directory (env VMVAULT_STATE_DIR; default: the configuration\'s stateDir, /var/lib/vmvault)')
    .option('--redis-listen <host:port>', 'let workers on other hosts join: up\'s own Redis also listens there, with a password (STATE_DIR/redis.password); the join command is printed')
    .action(async (flags: ServiceFlags) => {
      const file = configPathFrom(flags.config);
      const stateDir = flags.stateDir ?? (process.env.VMVAULT_STATE_DIR || undefined);
      const { defaultConfig, serviceLogger, up } = await loadService();
      const config = file ? await loadConfig(file) : defaultConfig(stateDir ?? '/var/lib/vmvault');
      const log = serviceLogger('vmvault');
      await runUntilSignal(() => up(config, { logger: log, ...(stateDir ? { stateDir } : {}), ...(flags.redisListen ? { redisListen: flags.redisListen } : {}) }), log);
    });

  program
    .command('serve')
    .description('run the scheduler (enqueue the backups of every enabled policy on the queues of the VMs\' hosts) and the HTTP API')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG)')
    .action(async (flags: ServiceFlags) => {
      const config = await requireConfig(flags);
      const { runServe, serviceLogger } = await loadService();
      const log = serviceLogger('vmvault');
      await runUntilSignal(() => runServe(config, { logger: log }), log);
    });

  program
    .command('worker')
    .description('run the worker of one host: back up and restore the VMs of that host')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG)')
    .option('--host <name>', 'the host whose queue to serve (default: the configuration\'s host)')
    .option('--join <redis-url>', 'join a vmvault up on another host: its Redis (redis://HOST:PORT, password from --redis-password-file or env VMVAULT_REDIS_PASSWORD) and the repository of --repo/--password-file; no configuration file needed')
    .option('--redis-password-file <file>', 'with --join: a file holding the Redis password (a copy of up\'s STATE_DIR/redis.password)')
    .option('--state-dir <dir>', 'with --join and no configuration: the state directory (env VMVAULT_STATE_DIR; default /var/lib/vmvault)')
    .action(async (flags: ServiceFlags, cmd: Command) => {
      if (flags.redisPasswordFile && !flags.join) throw new VmvaultError('BAD_INPUT', '--redis-password-file is for worker --join; with a configuration file, put the password in redis.url');
      const config = flags.join ? await joinConfig(flags, cmd.optsWithGlobals()) : await requireConfig(flags);
      const { runWorker, serviceLogger } = await loadService();
      const log = serviceLogger('vmvault-worker');
      await runUntilSignal(() => runWorker(config, { logger: log, ...(flags.host ? { host: flags.host } : {}) }), log);
    });
}

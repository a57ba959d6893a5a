/**
 * `vmvault up` (scheduler, API and this host's worker, with its own Redis and repository
 * when none is configured), `vmvault serve` (the scheduler and the API) and `vmvault worker`.
 * Each runs until SIGTERM or SIGINT, then stops cleanly and exits 0.
 */
import type { Command } from 'commander';
import { configPathFrom, loadConfig } from '../../config/load.js';
import type { Config } from '../../config/schema.js';
import { VmvaultError } from '../../errors.js';
import { defaultConfig, runServe, runWorker, serviceLogger, untilSignal, up, type Service } from '../../service/service.js';

interface ServiceFlags { config?: string; host?: string; stateDir?: string }

async function requireConfig(flags: ServiceFlags): Promise<Config> {
  const file = configPathFrom(flags.config);
  if (!file) throw new VmvaultError('BAD_INPUT', 'no configuration: pass --config FILE or set VMVAULT_CONFIG (see vmvault.example.yaml)');
  return loadConfig(file, flags.host ? { host: flags.host } : {});
}

async function runUntilSignal(start: () => Promise<Service>, log: ReturnType<typeof serviceLogger>): Promise<void> {
  const signal = untilSignal();
  const service = await start();
  const sig = await signal;
  log.info({ signal: sig }, 'stopping');
  await service.stop();
}

export function registerServiceCommands(program: Command): void {
  program
    .command('up')
    .description('run the scheduler, the HTTP API and this host\'s worker in one process; with no Redis or repository configured, starts its own in the state directory')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG); without one, an empty inventory and policies in STATE_DIR/policies')
    .option('--state-dir <dir>', 'state directory (env VMVAULT_STATE_DIR; default: the configuration\'s stateDir, /var/lib/vmvault)')
    .action(async (flags: ServiceFlags) => {
      const file = configPathFrom(flags.config);
      const stateDir = flags.stateDir ?? (process.env.VMVAULT_STATE_DIR || undefined);
      const config = file ? await loadConfig(file) : defaultConfig(stateDir ?? '/var/lib/vmvault');
      const log = serviceLogger('vmvault');
      await runUntilSignal(() => up(config, { logger: log, ...(stateDir ? { stateDir } : {}) }), log);
    });

  program
    .command('serve')
    .description('run the scheduler (enqueue the backups of every enabled policy on the queues of the VMs\' hosts) and the HTTP API')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG)')
    .action(async (flags: ServiceFlags) => {
      const config = await requireConfig(flags);
      const log = serviceLogger('vmvault');
      await runUntilSignal(() => runServe(config, { logger: log }), log);
    });

  program
    .command('worker')
    .description('run the worker of one host: back up and restore the VMs of that host')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG)')
    .option('--host <name>', 'the host whose queue to serve (default: the configuration\'s host)')
    .action(async (flags: ServiceFlags) => {
      const config = await requireConfig(flags);
      const log = serviceLogger('vmvault-worker');
      await runUntilSignal(() => runWorker(config, { logger: log, ...(flags.host ? { host: flags.host } : {}) }), log);
    });
}

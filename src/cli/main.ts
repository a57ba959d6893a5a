/**
 * The `vmvault` command line. Every repository operation works standalone, with
 * no Redis and no API, so a brand-new host can restore with only the repository
 * and the key.
 */
import { Command, CommanderError } from 'commander';
import { VmvaultError } from '../errors.js';
import type { GlobalOptions } from './context.js';
import { packageVersion } from '../package-files.js';
import { registerKeyCommands } from './commands/keys.js';
import { registerBackupCommands } from './commands/backups.js';
import { registerMaintenanceCommands } from './commands/maintenance.js';
import { registerHealthCommands } from './commands/repair.js'; // verify / repair (issue 9)
import { registerPolicyCommands } from './commands/policy.js'; // policy validate / simulate (issue 3)
import { registerServiceCommands } from './commands/service.js'; // up / serve / worker (issue 3)
import { registerSnapshotCommands } from './commands/snapshot.js'; // snapshot create / list / revert / delete (issue 5)
import { registerExportCommand } from './commands/export.js'; // export over NBD (issue 13)
import { registerTokenCommands } from './commands/token.js'; // token create (issue 12)
import { registerStatusCommand } from './commands/status.js'; // status (issue 12)
import { registerDrillCommand } from './commands/drill.js'; // restore drills (issue 13)
import { registerBitmapCommands } from './commands/bitmaps.js'; // dirty bitmaps of repositories that are gone
import { registerCopyCommand } from './commands/copy.js'; // off-site copies

export function buildProgram(): Command {
  const program = new Command('vmvault')
    .description('encrypted, deduplicated backups of virtual machines')
    .version(packageVersion(), '-V, --version', 'print vmvault\'s version and exit')
    .option('-r, --repo <url>', 'repository: a directory, or s3://BUCKET/PREFIX?endpoint=URL (env VMVAULT_REPOSITORY)')
    .option('--password-file <file>', 'file holding the repository passphrase (env VMVAULT_PASSWORD)')
    .option('--no-lock', 'take no lock and write nothing (commands that only read; automatic, with a warning, when the repository refuses writes)')
    .option('--retry-lock <duration>', 'wait up to this long (90s, 5min, 1h) for a lock another process holds, trying again, instead of failing at once (env VMVAULT_RETRY_LOCK)')
    .showHelpAfterError()
    .exitOverride();
  const globals = () => program.opts<GlobalOptions>();
  registerKeyCommands(program, globals);
  registerBackupCommands(program, globals);
  registerMaintenanceCommands(program, globals);
  registerHealthCommands(program, globals); // verify / repair (issue 9)
  registerPolicyCommands(program); // policy validate / simulate (issue 3)
  registerServiceCommands(program); // up / serve / worker (issue 3)
  registerSnapshotCommands(program, globals); // snapshot create / list / revert / delete (issue 5)
  registerExportCommand(program, globals); // export over NBD (issue 13)
  registerTokenCommands(program); // token create (issue 12)
  registerStatusCommand(program); // status (issue 12)
  registerDrillCommand(program, globals); // restore drills (issue 13)
  registerBitmapCommands(program, globals); // dirty bitmaps of repositories that are gone
  registerCopyCommand(program, globals); // copy backups between repositories
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    if (err instanceof VmvaultError) {
      process.stderr.write(`vmvault: error: ${err.message}\n`);
      return 1;
    }
    process.stderr.write(`vmvault: unexpected error: ${(err as Error)?.stack ?? String(err)}\n`);
    return 1;
  }
}

/** `vmvault gc` and `vmvault unlock`. */
import type { Command } from 'commander';
import { collectGarbage } from '../../repo/gc.js';
import { readLocks } from '../../repo/locks.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { formatBytes } from '../format.js';
import { print } from '../output.js';

export function registerMaintenanceCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('gc')
    .description('delete chunks that no backup references (takes the exclusive lock)')
    .option('--dry-run', 'only report what would be deleted')
    .option('--json', 'print the report as JSON')
    .action(async (o: { dryRun?: boolean; json?: boolean }) => {
      const repo = await openRepository(globals());
      const r = await collectGarbage(repo, { dryRun: !!o.dryRun });
      print(o.json, r, () =>
        `${r.dryRun ? 'would delete' : 'deleted'} ${r.chunksDeleted} of ${r.chunksTotal} chunk(s), ${formatBytes(r.bytesDeleted)}; ` +
        `${r.chunksReferenced} chunk(s) are used by ${r.backups} backup(s)`);
    });

  program
    .command('unlock')
    .description('remove stale locks left by crashed processes (--all: every lock)')
    .option('--all', 'also remove locks that have not expired: only when no vmvault process is running')
    .action(async (o: { all?: boolean }) => {
      const repo = await openRepository(globals());
      const locks = await readLocks(repo);
      const gone = locks.filter((l) => o.all || l.stale);
      for (const l of gone) await repo.storage.delete(`locks/${l.id}`);
      console.log(`removed ${gone.length} lock(s); ${locks.length - gone.length} live lock(s) remain`);
    });
}

/** `vmvault prune`, `vmvault gc` and `vmvault unlock`. */
import type { Command } from 'commander';
import { collectGarbage } from '../../repo/gc.js';
import { loadPolicyFile } from '../../policy/load.js';
import { prune } from '../../pipeline/prune.js';
import { readLocks } from '../../repo/locks.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { formatBytes, table } from '../format.js';
import { print } from '../output.js';

export function registerMaintenanceCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('prune')
    .description("delete the backups a policy's retention does not keep (then run gc to reclaim space)")
    .requiredOption('--policy <file>', 'policy file (YAML)')
    .option('--dry-run', 'only show what would be removed')
    .option('--json', 'print the decisions as JSON')
    .action(async (o: { policy: string; dryRun?: boolean; json?: boolean }) => {
      const policy = await loadPolicyFile(o.policy);
      const repo = await openRepository(globals());
      const plan = await prune(repo, policy, { dryRun: !!o.dryRun });
      const removed = plan.filter((d) => !d.keep).length;
      print(o.json, plan, () => [
        plan.length === 0 ? `policy ${policy.name} governs no backup` : table([
          ['ID', 'TIME', 'VM', 'LABELS', 'DECISION', 'REASONS'],
          ...plan.map((d) => [d.id.slice(0, 12), d.time, d.vm, d.labels.join(','), d.keep ? 'keep' : 'remove', d.reasons.join(', ')]),
        ]),
        `${o.dryRun ? 'would remove' : 'removed'} ${removed} of ${plan.length} backup(s)${removed && !o.dryRun ? '; run "vmvault gc" to reclaim their space' : ''}`,
      ].join('\n'));
    });

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

/** `vmvault prune`, `vmvault gc` and `vmvault unlock`. */
import type { Command } from 'commander';
import { collectGarbage } from '../../repo/gc.js';
import { loadPolicies, loadPolicyFile } from '../../policy/load.js';
import { prune, type PruneOptions } from '../../pipeline/prune.js';
import { configPathFrom, loadConfig } from '../../config/load.js';
import { VmInventory } from '../../config/inventory.js';
import type { Policy } from '../../policy/schema.js';
import { selectionOf } from '../../policy/select.js';
import { heldByDeadProcess, lockName, readLocksNow, type FoundLock } from '../../repo/locks.js';
import { openRepository, warn, type GlobalOptions } from '../context.js';
import { formatBytes, table } from '../format.js';
import { print } from '../output.js';

export function registerMaintenanceCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('prune')
    .description("delete the backups a policy's retention does not keep (then run gc to reclaim space)")
    .requiredOption('--policy <file>', 'policy file (YAML)')
    .option('--dry-run', 'only show what would be removed')
    .option('--json', 'print the decisions as JSON')
    .option('-c, --config <file>', 'service configuration (env VMVAULT_CONFIG): its inventory resolves tags, and the policies of its policiesDir keep the on-demand backups they would keep')
    .action(async (o: { policy: string; dryRun?: boolean; json?: boolean; config?: string }) => {
      const policy = await loadPolicyFile(o.policy);
      const service = await serviceContext(o.config, policy);
      const repo = await openRepository(globals());
      const plan = await prune(repo, policy, { dryRun: !!o.dryRun, ...service });
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
    .description('delete chunks that no backup references and temporary files of killed writers (takes the exclusive lock; on a full repository it frees room for it first)')
    .option('--dry-run', 'only report what would be deleted')
    .option('--json', 'print the report as JSON')
    .action(async (o: { dryRun?: boolean; json?: boolean }) => {
      const repo = await openRepository(globals());
      const r = await collectGarbage(repo, { dryRun: !!o.dryRun });
      print(o.json, r, () =>
        `${r.dryRun ? 'would delete' : 'deleted'} ${r.chunksDeleted} of ${r.chunksTotal} chunk(s), ${formatBytes(r.bytesDeleted)}; ` +
        `${r.chunksReferenced} chunk(s) are used by ${r.backups} backup(s)` +
        (r.tempFilesDeleted ? `; removed ${r.tempFilesDeleted} temporary file(s) of unfinished writes, ${formatBytes(r.tempBytesDeleted)}` : '') +
        (r.damagedManifests.length ? `; kept ${r.chunksKept} unreferenced chunk(s) because ${r.damagedManifests.length} manifest(s) are damaged` : ''));
      // The warning (printed by the repository) says what to do; the exit status makes it seen.
      if (r.damagedManifests.length) process.exitCode = 1;
    });

  program
    .command('unlock')
    .description('remove locks left by crashed processes: expired, unreadable, or of a process gone from this host (--all: every lock)')
    .option('--all', 'also remove live locks: only when no vmvault process is running')
    .action(async (o: { all?: boolean }) => {
      const repo = await openRepository(globals());
      const locks = await readLocksNow(repo, 'unlock');
      const why = (l: FoundLock): string | undefined => {
        if (l.damaged !== undefined) return `it cannot be read: ${l.damaged}`;
        if (l.stale) return `expired at ${l.lock.expires}`;
        if (heldByDeadProcess(l.lock)) return `${l.lock.purpose}: process ${l.lock.pid} is gone from this host`;
        return o.all ? `${l.lock.purpose} by ${l.lock.host} pid ${l.lock.pid} (--all)` : undefined;
      };
      let removed = 0;
      for (const l of locks) {
        const reason = why(l);
        if (!reason) continue;
        await repo.storage.delete(lockName(l.id));
        console.log(`removed ${lockName(l.id)}: ${reason}`);
        removed++;
      }
      console.log(`removed ${removed} lock(s); ${locks.length - removed} live lock(s) remain`);
    });
}

/**
 * What the service's prune knows, from the configuration when there is one: its
 * inventory (VMs and their tags, the state directory's VM file included) and the
 * policies of its policiesDir. Without one, prune says what it cannot know.
 */
async function serviceContext(flag: string | undefined, policy: Policy): Promise<Pick<PruneOptions, 'selection' | 'policies' | 'invalidPolicyFiles'>> {
  const file = configPathFrom(flag);
  if (!file) {
    if (policy.select.tags?.length) {
      warn(`policy ${policy.name} selects VMs by tag (${policy.select.tags.join(', ')}), and without a configuration (--config FILE or VMVAULT_CONFIG) ` +
        'prune cannot read the inventory: it leaves the on-demand backups of the VMs it selects by tag alone (those of VMs named in select.vms are pruned)');
    }
    warn(`without a configuration (--config FILE or VMVAULT_CONFIG) prune knows no other policy: policy ${policy.name}'s rules alone decide ` +
      'which on-demand backups of its VMs go, even where another policy selecting those VMs would keep them');
    return {};
  }
  const config = await loadConfig(file);
  await new VmInventory(config).load();
  const { policies, problems } = await loadPolicies(config.policiesDir);
  const invalid = [...new Set(problems.map((p) => p.file))];
  if (invalid.length) {
    warn(`policy file(s) ${invalid.join(', ')} cannot be read: prune removes no on-demand backup until they are fixed (what they select is unknown); "vmvault policy validate" shows the problems`);
  }
  return { selection: selectionOf(() => config.vms), policies: policies.map((l) => l.policy), invalidPolicyFiles: invalid };
}

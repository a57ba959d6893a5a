/** `vmvault copy`: copy backups from another repository into this one (an off-site copy). */
import type { Command } from 'commander';
import { copyBackups, type CopiedBackup, type SkippedBackup } from '../../pipeline/copy.js';
import { formatBytes } from '../format.js';
import { onInterrupt } from '../interrupt.js';
import { openRepository, openSourceRepository, type GlobalOptions } from '../context.js';
import { print } from '../output.js';

export function registerCopyCommand(program: Command, globals: () => GlobalOptions): void {
  program
    .command('copy [ids...]')
    .description('copy backups from another repository into this one (--repo), skipping those it has; only the chunks it lacks are uploaded')
    .requiredOption('--from-repo <url>', 'the repository to copy from')
    .option('--from-password-file <file>', "file holding the source repository's passphrase (env VMVAULT_FROM_PASSWORD)")
    .option('--vm <name>', "only this VM's backups (repeatable)", (v: string, all: string[] = []) => [...all, v])
    .option('--json', 'print what was copied and skipped as JSON')
    .action(async (ids: string[], o: { fromRepo: string; fromPasswordFile?: string; vm?: string[]; json?: boolean }) => {
      const interrupt = new AbortController();
      // The destination is written: it always takes its lock (--no-lock applies to the source, which is only read).
      const to = await openRepository({ ...globals(), lock: true }, { signal: interrupt.signal });
      const from = await openSourceRepository(o.fromRepo, o.fromPasswordFile, globals(), { signal: interrupt.signal });
      const stop = onInterrupt({
        what: 'the copy', outcome: 'the backups copied before it stand; the one under way was not committed', controller: interrupt,
        stopping: 'stopping the copy', leftovers: () => [],
      });
      // Copied backups and failures, one line each as they come (failures on stderr); what is
      // skipped for being there already (every run's bulk) only counted at the end.
      const say = (b: CopiedBackup | SkippedBackup) => {
        if (!('skipped' in b)) {
          process.stdout.write(`copied ${b.id.slice(0, 12)} of ${b.vm} (${b.time}): read ${b.chunksRead} chunk(s), uploaded ${b.chunksUploaded} ` +
            `(${formatBytes(b.bytesUploaded)}), ${b.chunksKnown} known from an earlier copy${b.replaced ? '; its damaged manifest in this repository was replaced' : ''}\n`);
        } else if (b.failed) {
          process.stderr.write(`vmvault: not copied: ${b.id.slice(0, 12)}${b.vm ? ` of ${b.vm} (${b.time})` : ''}: ${b.skipped}\n`);
        }
      };
      let result;
      try {
        result = await copyBackups(from, to, { ids, ...(o.vm ? { vms: o.vm } : {}), signal: stop.signal, ...(o.json ? {} : { onBackup: say }) });
      } finally {
        stop.dispose();
      }
      const failed = result.skipped.filter((s) => s.failed);
      print(o.json, result, () => `copied ${result.copied.length} backup(s); ${failed.length} could not be copied; ` +
        `skipped ${result.skipped.length - failed.length} (in this repository already, or older than its newest copy of their VM)`);
      // A backup the source could not produce was not copied: the exit status makes it seen.
      if (failed.length) process.exitCode = 1;
    });
}

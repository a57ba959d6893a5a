/** `vmvault verify` and `vmvault repair`: checking backups, and what to do about damage. */
import type { Command } from 'commander';
import { VmvaultError } from '../../errors.js';
import { verify, type VerifyReport } from '../../pipeline/verify.js';
import { repair, type RepairReport } from '../../pipeline/repair.js';
import { parseSubset } from '../../pipeline/subset.js';
import type { VerificationState } from '../../repo/health.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { table } from '../format.js';
import { print } from '../output.js';
import { progressBar } from '../progress-bar.js';

/** One line for a backup's verification state, as `backups` and `show` print it. */
export function describeVerification(s: VerificationState | undefined): string {
  if (!s) return 'never';
  if (s.status === 'boot-verified' || s.status === 'boot-failed') {
    const b = s.boot!;
    return s.status === 'boot-verified' ? `boot-verified at ${b.time} (drill, ${b.probe})` : `BOOT-FAILED at ${b.time} (drill): ${b.reason ?? 'no reason recorded'}`;
  }
  const what = s.readData === 'none' ? 'chunks present' : s.readData === 'all' ? 'data read' : `data subset ${s.readData} read`;
  return s.status === 'ok'
    ? `ok at ${s.lastVerified} (${what})`
    : `DAMAGED: ${s.damagedChunks} chunk(s) of disk(s) ${s.damagedDisks.join(', ')} (at ${s.lastVerified}; see "vmvault repair")`;
}

function verifyText(r: VerifyReport): string {
  const read = r.readData ? ', all read and re-hashed' : r.readDataSubset ? `, ${r.chunksRead} read (subset ${r.readDataSubset})` : r.chunksRead ? `, ${r.chunksRead} quarantined one(s) read again` : '';
  const lines = r.ok
    ? [`ok: ${r.backupsChecked} backup(s), ${r.chunksChecked} chunk(s) present${read}`]
    : [`FAILED: ${r.problems.length} problem(s) in ${r.backupsChecked} backup(s), ${r.chunksChecked} chunk(s)${read}:`,
      ...r.problems.map((p) => `  ${p.object}: ${p.problem}\n    needed by backup(s) ${p.backups.join(', ')}`),
      ...(r.recorded ? ['damaged chunks are quarantined: the next backup that produces one uploads it again and heals every backup using it; "vmvault repair" lists the backups that cannot heal'] : [])];
  if (r.healed) lines.push(`${r.healed} quarantined chunk(s) were intact again (re-uploaded by a backup) and left quarantine`);
  for (const w of r.warnings) lines.push(`warning: ${w}`);
  return lines.join('\n');
}

function repairText(r: RepairReport, remove: boolean): string {
  const intact = r.intactAgain === 0 ? [] : [r.released !== undefined
    ? `${r.intactAgain} quarantined chunk(s) read intact again: taken out of quarantine`
    : `${r.intactAgain} quarantined chunk(s) read intact again (put back, or uploaded since verify): they count for nothing here; "vmvault repair --remove" or the next verify takes them out of quarantine`];
  if (r.backups.length === 0) return [`no damaged backup known (${r.quarantinedChunks} damaged chunk(s) in quarantine); run "vmvault verify --read-data" for a full check`, ...intact].join('\n');
  const lost = r.backups.filter((b) => !b.healable);
  return [
    ...intact,
    table([
      ['ID', 'TIME', 'VM', 'DISKS', 'VERDICT', 'WHY'],
      ...r.backups.map((b) => [b.id.slice(0, 12), b.time ?? '-', b.vm ?? '-', b.damagedDisks.join(',') || '-', b.otherVersion ? 'other version' : b.healable ? 'may heal' : 'beyond healing', b.reason]),
    ]),
    lost.length === 0
      ? 'no backup is beyond healing'
      : remove
        ? `removed ${r.removed.length} backup(s) beyond healing; run "vmvault gc" to reclaim their space`
        : `${lost.length} backup(s) beyond healing: "vmvault repair --remove" deletes them (and only them)`,
  ].join('\n');
}

export function registerHealthCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('verify [id]')
    .description('check that backups are complete (and with --read-data, intact); damaged chunks are quarantined so the next backup heals them')
    .option('--read-data', 'download, decrypt and re-hash every chunk')
    .option('--read-data-subset <k/n|p%>', 'download and re-hash only the k-th of n slices (1/7 … 7/7 covers every chunk once) or p percent at random')
    .option('--json', 'print the report as JSON')
    .action(async (id: string | undefined, o: { readData?: boolean; readDataSubset?: string; json?: boolean }) => {
      if (o.readData && o.readDataSubset) throw new VmvaultError('BAD_INPUT', '--read-data reads everything: leave out --read-data-subset, or --read-data');
      const subset = o.readDataSubset !== undefined ? parseSubset(o.readDataSubset) : undefined;
      const repo = await openRepository(globals());
      const bar = progressBar(!o.json);
      const ids = id ? [await repo.resolveBackupId(id)] : undefined;
      const report = await verify(repo, { ...(ids ? { backupIds: ids } : {}), readData: !!o.readData, ...(subset ? { readDataSubset: subset } : {}), onProgress: bar.update });
      bar.done();
      for (const w of report.warnings) if (o.json) process.stderr.write(`vmvault: warning: ${w}\n`);
      print(o.json, report, () => verifyText(report));
      if (!report.ok) process.exitCode = 1;
    });

  program
    .command('repair')
    .description('list damaged backups, saying which are beyond healing; --remove deletes those')
    .option('--remove', 'delete the backups beyond healing (then run gc)')
    .option('--json', 'print the report as JSON')
    .action(async (o: { remove?: boolean; json?: boolean }) => {
      const repo = await openRepository(globals());
      const report = await repair(repo, { remove: !!o.remove });
      print(o.json, report, () => repairText(report, !!o.remove));
    });
}

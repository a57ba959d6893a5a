/** `vmvault policy validate FILE…` and `vmvault policy simulate`: no repository needed. */
import { InvalidArgumentError, type Command } from 'commander';
import { VmvaultError } from '../../errors.js';
import { loadPolicyFile } from '../../policy/load.js';
import { parseDuration, parseIsoTime, planRetention, type RetentionRules } from '../../policy/retention.js';
import { table } from '../format.js';
import { print } from '../output.js';

/** A --keep-* count: a whole number ≥ 0, or -1 / "unlimited" for no limit (restic's spelling). */
function parseCount(value: string): number {
  if (value === 'unlimited' || value === '-1') return -1;
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError('expected a whole number ≥ 0, or "unlimited"');
  return Number(value);
}

function parseWithin(value: string): string {
  try {
    parseDuration(value);
    return value;
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write('reading backup times from stdin, one ISO-8601 time per line (end with Ctrl-D)\n');
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** One item per non-blank line; every bad line is reported with its number. */
export function parseTimes(text: string, timeZone: string): Array<{ id: string; time: Date; text: string }> {
  const items: Array<{ id: string; time: Date; text: string }> = [];
  const bad: string[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (!line) return;
    const time = parseIsoTime(line, timeZone);
    if (time) items.push({ id: String(i + 1), time, text: line });
    else bad.push(`line ${i + 1}: "${line.length > 60 ? `${line.slice(0, 60)}…` : line}" is not an ISO-8601 time (e.g. 2024-03-01T01:30:00Z)`);
  });
  if (bad.length > 0) {
    const more = bad.length > 10 ? [`…and ${bad.length - 10} more bad line(s)`] : [];
    throw new VmvaultError('BAD_INPUT', ['cannot read the backup times on stdin:', ...bad.slice(0, 10), ...more].join('\n  '));
  }
  return items;
}

interface SimulateOptions {
  keepLast?: number; keepHourly?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; keepYearly?: number;
  keepWithin?: string; timezone: string; json?: boolean;
}

export function registerPolicyCommands(program: Command): void {
  const policy = program.command('policy').description('check policy files and simulate retention rules');

  policy
    .command('validate <files...>')
    .description('check policy files: prints "FILE: ok", or every problem as FILE:LINE:COL: key: message')
    .action(async (files: string[]) => {
      for (const file of files) {
        try {
          await loadPolicyFile(file);
          process.stdout.write(`${file}: ok\n`);
        } catch (err) {
          if (!(err instanceof VmvaultError)) throw err;
          process.stderr.write(`${err.message}\n`);
          process.exitCode = 1;
        }
      }
    });

  policy
    .command('simulate')
    .description("read backup times on stdin (ISO-8601, one per line) and show which the rules keep and why, as restic's forget --keep-*")
    .option('--keep-last <n>', 'keep the last n backups', parseCount)
    .option('--keep-hourly <n>', 'keep the last backup of each of the last n hours with one', parseCount)
    .option('--keep-daily <n>', 'keep the last backup of each of the last n days with one', parseCount)
    .option('--keep-weekly <n>', 'keep the last backup of each of the last n ISO weeks with one', parseCount)
    .option('--keep-monthly <n>', 'keep the last backup of each of the last n months with one', parseCount)
    .option('--keep-yearly <n>', 'keep the last backup of each of the last n years with one', parseCount)
    .option('--keep-within <duration>', 'keep every backup within this long (e.g. 14d, 1y2mo3d4h; units y, mo, w, d, h, min) of the newest', parseWithin)
    .option('--timezone <zone>', 'IANA zone whose hours, days, weeks… count, and for times without an offset', 'UTC')
    .option('--json', 'print a JSON array of {time, keep, reasons}')
    .action(async (o: SimulateOptions) => {
      const { timezone, json, ...rules } = o;
      const items = parseTimes(await readStdin(), timezone);
      const plan = planRetention(items, rules as RetentionRules, { timeZone: timezone, now: new Date() });
      const rows = plan.map((d) => ({ time: d.item.text, keep: d.keep, reasons: d.reasons }));
      print(json, rows, () => {
        if (rows.length === 0) return 'no backup times on stdin';
        const kept = rows.filter((r) => r.keep).length;
        return [
          table([['TIME', 'ACTION', 'REASONS'], ...rows.map((r) => [r.time, r.keep ? 'keep' : 'remove', r.reasons.join(', ')])]),
          `${kept} kept, ${rows.length - kept} removed${plan[0]?.reasons[0] === 'empty policy' ? ' (no --keep-* rule: everything is kept)' : ''}`,
        ].join('\n');
      });
    });
}

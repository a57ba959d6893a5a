/** `vmvault policy validate` and `vmvault policy simulate`, through the built command. */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { BIN, cli, type CliResult, type Env } from '../helpers/cli.js';

/** Like cli(), with `input` written to the command's stdin. */
async function cliWithInput(args: string[], input: string, env: Env = {}): Promise<CliResult> {
  const r = await execa(process.execPath, [BIN, ...args], { reject: false, env: { ...env }, input });
  return { code: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
}

const EXAMPLES = fileURLToPath(new URL('../../../policies/', import.meta.url));

const TIMES = `2024-03-01T01:30:00Z

2024-03-02T01:30:00Z
2024-03-02T23:59:59+02:00
2024-02-25T01:30:00Z
  2024-03-03 01:30:00
`;

describe('vmvault policy simulate', () => {
  test('--json: one {time, keep, reasons} per line, newest first', async () => {
    const r = await cliWithInput(['policy', 'simulate', '--keep-last', '1', '--keep-daily', '2', '--keep-weekly', 'unlimited', '--json'], TIMES);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), [
      { time: '2024-03-03 01:30:00', keep: true, reasons: ['last', 'daily', 'weekly'] },
      { time: '2024-03-02T23:59:59+02:00', keep: true, reasons: ['daily'] },
      { time: '2024-03-02T01:30:00Z', keep: false, reasons: [] },
      { time: '2024-03-01T01:30:00Z', keep: false, reasons: [] },
      { time: '2024-02-25T01:30:00Z', keep: true, reasons: ['weekly'] },
    ]);
  });

  test('a readable table by default; --timezone moves the day boundaries', async () => {
    const r = await cliWithInput(['policy', 'simulate', '--keep-daily', '3'], '2024-01-15T23:30:00Z\n2024-01-15T22:30:00Z\n');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trimEnd().split('\n'), [
      'TIME                  ACTION  REASONS',
      '2024-01-15T23:30:00Z  keep    daily',
      '2024-01-15T22:30:00Z  keep    oldest daily',
      '2 kept, 0 removed',
    ]);
    const paris = await cliWithInput(['policy', 'simulate', '--keep-daily', '3', '--timezone', 'Europe/Paris', '--json'], '2024-01-15T23:30:00Z\n2024-01-15T22:30:00Z\n');
    assert.deepEqual(JSON.parse(paris.stdout).map((d: { reasons: string[] }) => d.reasons), [['daily'], ['daily']]);
  });

  test('--keep-within counts back from the newest backup', async () => {
    const r = await cliWithInput(['policy', 'simulate', '--keep-within', '1mo', '--json'], '2024-03-31T12:00:00Z\n2024-03-02T12:00:01Z\n2024-03-02T12:00:00Z\n');
    assert.deepEqual(JSON.parse(r.stdout).map((d: { keep: boolean }) => d.keep), [true, true, false]);
  });

  test('no rule keeps everything, and says so', async () => {
    const r = await cliWithInput(['policy', 'simulate'], '2024-03-01T00:00:00Z\n');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /keep {4}empty policy\n1 kept, 0 removed \(no --keep-\* rule: everything is kept\)/);
  });

  test('a bad line is an error naming its line number', async () => {
    const r = await cliWithInput(['policy', 'simulate', '--keep-last', '1'], '2024-03-01T00:00:00Z\n\n2024-02-30T00:00:00Z\nyesterday\n');
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /line 3: "2024-02-30T00:00:00Z" is not an ISO-8601 time/);
    assert.match(r.stderr, /line 4: "yesterday" is not an ISO-8601 time/);
  });

  test('bad options are usage errors', async () => {
    for (const [args, re] of [
      [['--keep-daily', 'seven'], /--keep-daily.*whole number/],
      [['--keep-within', '2x'], /unknown unit "x"/],
      [['--keep-within', '30m'], /"30m" is ambiguous: write 30min for minutes or 30mo for months/],
      [['--keep-hourly', '-3'], /--keep-hourly/],
    ] as Array<[string[], RegExp]>) {
      const r = await cliWithInput(['policy', 'simulate', ...args], '2024-03-01T00:00:00Z\n');
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, re);
    }
    const zone = await cliWithInput(['policy', 'simulate', '--keep-last', '1', '--timezone', 'Mars/Olympus'], '2024-03-01T00:00:00Z\n');
    assert.equal(zone.code, 1);
    assert.match(zone.stderr, /unknown time zone "Mars\/Olympus"/);
  });
});

describe('vmvault policy validate', () => {
  let dir: string;
  let bad: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmvault-policy-cli-'));
    bad = join(dir, 'bad.yaml');
    await writeFile(bad, 'name: nightly\nschedule: "30 25 * * *"\nselect:\n  tags: [production]\nretention:\n  keep_daily: 7\n');
  });

  test('refuses a "billion laughs" file cleanly: one line, exit 1', async () => {
    const bomb = join(dir, 'bomb.yaml');
    const lists = 'bcdefghi'.split('').map((x, i) => `${x}: &${x} [${Array(9).fill(`*${'abcdefghi'[i]}`).join(', ')}]`);
    await writeFile(bomb, ['a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]', ...lists, 'name: bomb', ''].join('\n'));
    const r = await cli(['policy', 'validate', bomb]);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, new RegExp(`^${bomb}:2:8: YAML: refused: .*"billion laughs" document; write the values out, or use fewer aliases$`));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test('prints FILE: ok for each valid file', async () => {
    const files = ['daily.yaml', 'hourly-databases.yaml', 'pre-update.yaml'].map((f) => join(EXAMPLES, f));
    const r = await cli(['policy', 'validate', ...files]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trimEnd().split('\n'), files.map((f) => `${f}: ok`));
  });

  test('prints every problem as FILE:LINE:COL on stderr and exits 1', async () => {
    const good = join(EXAMPLES, 'daily.yaml');
    const r = await cli(['policy', 'validate', bad, good, join(EXAMPLES, 'missing.yaml')]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, `${good}: ok`); // execa strips the final newline
    const lines = r.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 3, r.stderr);
    assert.match(lines[0]!, new RegExp(`^${bad}:2:11: schedule: "30 25 \\* \\* \\*" is not a valid`));
    assert.equal(lines[1], `${bad}:6:3: retention.keep_daily: unknown key (did you mean "keepDaily"?)`);
    assert.match(lines[2]!, /missing\.yaml: cannot read policy file/);
  });
});

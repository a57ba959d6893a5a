/** Policy files: the examples load, and every problem is reported as FILE:LINE:COL: key.path: message. */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VmvaultError } from '../../src/errors.js';
import { checkPolicyText, loadPolicies, loadPolicyFile, parsePolicy, PolicyFileError } from '../../src/policy/load.js';
import { retentionFor } from '../../src/policy/schema.js';

const EXAMPLES = fileURLToPath(new URL('../../../policies/', import.meta.url));

/** The problems of a policy text, as the lines an operator sees. */
function problems(text: string, file = 'p.yaml'): string[] {
  try {
    parsePolicy(text, file);
  } catch (err) {
    assert.ok(err instanceof PolicyFileError, `expected a PolicyFileError, got ${String(err)}`);
    assert.ok(err instanceof VmvaultError && err.code === 'BAD_INPUT');
    assert.equal(err.message, err.problems.map((p) => `${p.file}:${p.line}:${p.col}: ${p.path}: ${p.message}`).join('\n'));
    return err.message.split('\n');
  }
  return assert.fail('the policy was accepted');
}

const valid = `name: nightly
schedule: "30 1 * * *"
select:
  tags: [production]
retention:
  keepDaily: 7
`;

/**
 * A "billion laughs" policy: 342 bytes of anchors, each alias list nine times the one
 * before, 9^9 (387 million) strings once expanded. Its first alias is at line 2, column 8.
 */
const ALIAS_BOMB = [
  'a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]',
  ...'bcdefghi'.split('').map((x, i) => `${x}: &${x} [${Array(9).fill(`*${'abcdefghi'[i]}`).join(', ')}]`),
  valid,
].join('\n');

describe('the example policies', () => {
  test('policies/daily.yaml: nightly at 01:30, 7 daily, 4 weekly, 6 monthly, tag production', async () => {
    const p = await loadPolicyFile(join(EXAMPLES, 'daily.yaml'));
    assert.deepEqual(p, {
      name: 'daily', schedule: '30 1 * * *', timezone: 'Europe/Paris', select: { tags: ['production'] },
      retention: { keepDaily: 7, keepWeekly: 4, keepMonthly: 6 }, enabled: true, labels: ['nightly'],
    });
  });

  test('all of policies/ load, pre-update backups on their own clock', async () => {
    const { policies, problems: bad } = await loadPolicies(EXAMPLES);
    assert.deepEqual(bad, []);
    assert.deepEqual(policies.map((p) => p.policy.name).sort(), ['daily', 'hourly-databases', 'web-weekly']);
    const web = policies.find((p) => p.policy.name === 'web-weekly')!.policy;
    assert.equal(web.schedule, '0 0 3 * * 0');
    assert.deepEqual(retentionFor(web.retention, ['pre-update', 'manual']), { label: 'pre-update', rules: { keepWithin: '14d', keepLast: 2 } });
    assert.deepEqual(retentionFor(web.retention, ['manual']), { rules: { keepWeekly: 8, keepMonthly: 3 } });
  });
});

describe('problems, each at its FILE:LINE:COL', () => {
  test('malformed YAML', () => {
    assert.deepEqual(problems('name: nightly\nschedule: [30 1 * * *\nselect: {}\n'), ['p.yaml:3:1: YAML: Flow sequence in block collection must be sufficiently indented and end with a ]']);
    assert.deepEqual(problems('name: nightly\nschedule: "30 1 * * *\n'), ['p.yaml:3:1: YAML: Missing closing "quote']);
    assert.match(problems('name: a\nname: b\n')[0]!, /^p\.yaml:2:1: YAML: Map keys must be unique/);
    assert.match(problems('name: nightly\n  schedule: x\n')[0]!, /^p\.yaml:1:7: YAML: /);
  });

  test('an unknown key, with a suggestion for a near miss', () => {
    assert.deepEqual(problems(`${valid}  keep_weekly: 4\ncolour: blue\n`), [
      'p.yaml:7:3: retention.keep_weekly: unknown key (did you mean "keepWeekly"?)',
      'p.yaml:8:1: colour: unknown key',
    ]);
  });

  test('a bad cron expression', () => {
    assert.deepEqual(problems(valid.replace('"30 1 * * *"', '"61 1 * * *"')), [
      'p.yaml:2:11: schedule: "61 1 * * *" is not a valid 5- or 6-field cron expression: 61 is a invalid expression for minute',
    ]);
    assert.match(problems(valid.replace('"30 1 * * *"', '"* * *"'))[0]!, /^p\.yaml:2:11: schedule: .*expected 5 or 6 fields but got 3$/);
  });

  test('a bad time zone', () => {
    assert.deepEqual(problems(`${valid}timezone: Mars/Olympus_Mons\n`), [
      'p.yaml:7:11: timezone: unknown time zone "Mars/Olympus_Mons": expected an IANA name such as Europe/Paris or UTC',
    ]);
  });

  test('a bad duration, a bad count, a bad label', () => {
    assert.deepEqual(problems(`${valid}  keepWithin: 6m\n  keepLast: -5\n  byLabel:\n    "pre update": { keepWithin: 14d }\n`), [
      'p.yaml:7:15: retention.keepWithin: "6m" is ambiguous: write 6min for minutes or 6mo for months (restic\'s m means months)',
      'p.yaml:8:13: retention.keepLast: expected a whole number ≥ 0, or -1 / "unlimited" for no limit',
      'p.yaml:10:5: retention.byLabel.pre update: a label is letters, digits, ".", "_" or "-", starting with a letter or digit, at most 64 characters',
    ]);
  });

  test('several problems in one file are all reported, in file order', () => {
    const text = `name: "night ly"
schedule: "30 25 * * *"
timezone: Nowhere
select:
  vms: []
retention:
  keepDaily: seven
  byLabel:
    pre-update:
      keepWithin: 1x
enabled: yes
`;
    assert.deepEqual(problems(text, 'policies/bad.yaml').map((l) => l.split(': ').slice(0, 2).join(': ')), [
      'policies/bad.yaml:1:7: name',
      'policies/bad.yaml:2:11: schedule',
      'policies/bad.yaml:3:11: timezone',
      'policies/bad.yaml:5:8: select.vms',
      'policies/bad.yaml:7:14: retention.keepDaily',
      'policies/bad.yaml:10:19: retention.byLabel.pre-update.keepWithin',
      'policies/bad.yaml:11:10: enabled',
    ]);
  });

  test('missing keys point at the mapping that lacks them', () => {
    assert.deepEqual(problems('name: nightly\nselect:\n  tags: [a]\n'), [
      'p.yaml:1:1: schedule: missing: "schedule" is required',
      'p.yaml:1:1: retention: missing: "retention" is required',
    ]);
    assert.deepEqual(problems(valid.replace('  tags: [production]\n', '  {}\n')), [
      'p.yaml:4:3: select: choose VMs with vms: [names] and/or tags: [tags]',
    ]);
  });

  test('an empty file, a list instead of a mapping', () => {
    assert.deepEqual(problems('# nothing\n'), ['p.yaml:1:1: (policy): the file is empty: expected name, schedule, select and retention']);
    assert.deepEqual(problems('- name: x\n'), ['p.yaml:1:1: (policy): expected a policy: a mapping with name, schedule, select and retention']);
  });

  test('aliases that expand too far are refused at the first alias, never expanded; a few aliases are fine', () => {
    const started = Date.now();
    assert.deepEqual(problems(ALIAS_BOMB), [
      'p.yaml:2:8: YAML: refused: its aliases (*name) expand to more than 100 copies of anchored values, the shape of a "billion laughs" document; write the values out, or use fewer aliases',
    ]);
    const r = checkPolicyText(ALIAS_BOMB, 'p.yaml');
    assert.ok(!r.ok && r.refused, 'marked as refused, not as a policy with problems');
    assert.ok(Date.now() - started < 2000, 'refused quickly');
    const reused = valid.replace('[production]', '&t [production]') + 'labels: *t\n';
    assert.deepEqual(parsePolicy(reused, 'p.yaml').labels, ['production']);
  });

  test('6-field cron, unlimited counts, enabled false, defaults', () => {
    const text = `${valid}  keepMonthly: unlimited\n  keepYearly: -1\nenabled: false\n`.replace('"30 1 * * *"', '"0 30 1 * * *"');
    const p = parsePolicy(text, 'p.yaml');
    assert.equal(p.schedule, '0 30 1 * * *');
    assert.deepEqual(p.retention, { keepDaily: 7, keepMonthly: -1, keepYearly: -1 });
    assert.equal(p.enabled, false);
    assert.equal(parsePolicy(valid, 'p.yaml').enabled, true);
  });
});

describe('loadPolicies', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmvault-policies-'));
    await writeFile(join(dir, 'a.yaml'), valid);
    await writeFile(join(dir, 'b.yml'), valid.replace('"30 1 * * *"', '"oops"'));
    await writeFile(join(dir, 'c.yaml'), `# the same name again\n${valid}`);
    await writeFile(join(dir, 'd.yaml'), valid.replace('nightly', 'weekly'));
    await writeFile(join(dir, 'e.yaml'), ALIAS_BOMB.replace('nightly', 'bomb'));
    await writeFile(join(dir, 'notes.txt'), 'not a policy');
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test('a bad file does not stop the others; a duplicate name is a problem of the later file', async () => {
    const { policies, problems: bad } = await loadPolicies(dir);
    assert.deepEqual(policies.map((p) => [p.file, p.policy.name]), [[join(dir, 'a.yaml'), 'nightly'], [join(dir, 'd.yaml'), 'weekly']]);
    assert.deepEqual(bad.map((p) => `${p.file}:${p.line}:${p.col}: ${p.path}`), [`${join(dir, 'b.yml')}:2:11: schedule`, `${join(dir, 'c.yaml')}:2:7: name`, `${join(dir, 'e.yaml')}:2:8: YAML`]);
    assert.match(bad[1]!.message, /already defined in .*a\.yaml/);
    assert.match(bad[2]!.message, /billion laughs/); // what the scheduler logs, skipping the file
  });

  test('a file that cannot be read is BAD_INPUT naming it', async () => {
    await assert.rejects(loadPolicyFile(join(dir, 'missing.yaml')), (e: unknown) => e instanceof VmvaultError && e.code === 'BAD_INPUT' && e.message.includes('missing.yaml'));
  });
});

/**
 * The retention planner against restic's own expectations: the golden files of
 * restic's TestApplyPolicy (fixtures/restic-testdata.json, see its notes), the
 * examples of restic's documentation (doc/060_forget.rst), and edge cases.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { VmvaultError } from '../../src/errors.js';
import {
  formatDuration, parseDuration, parseIsoTime, planRetention, shiftByDuration,
  type RetentionDecision, type RetentionItem, type RetentionRules,
} from '../../src/policy/retention.js';

interface Fixture {
  input: string[];
  cases: Array<{ index: number; commit: string; policy: string; rules: RetentionRules; semantics: 'pre-0.16' | '0.16'; keep: Array<[string, string[]]> }>;
}
const fixture = JSON.parse(readFileSync(fileURLToPath(new URL('../../../test/policy/fixtures/restic-testdata.json', import.meta.url)), 'utf8')) as Fixture;
// restic writes months as m; vmvault as mo (a bare m is refused as ambiguous).
for (const c of fixture.cases) if (typeof c.rules.keepWithin === 'string') c.rules.keepWithin = c.rules.keepWithin.replace(/(\d+)m(?![a-z])/g, '$1mo');

const items = (times: Array<string | Date>): RetentionItem[] => times.map((time, i) => ({ id: `b${i}`, time }));
const kept = (plan: RetentionDecision[]) => plan.filter((d) => d.keep).map((d) => [d.time.toISOString(), d.reasons] as const);
const iso = (t: string) => new Date(t).toISOString();
const badInput = (fn: () => unknown, re: RegExp) => assert.throws(fn, (e: unknown) => e instanceof VmvaultError && e.code === 'BAD_INPUT' && re.test(e.message));

/** restic's "daily snapshot" / "within 1d" → ours. */
const fromRestic = (m: string) => (m.startsWith('within ') ? 'within' : m.replace(/ snapshot$/, ''));

describe("restic's TestApplyPolicy golden files", () => {
  for (const c of fixture.cases) {
    test(`policy_keep_snapshots_${c.index} ${c.policy} (restic ${c.semantics})`, () => {
      const plan = planRetention(items(fixture.input), c.rules, { keepOldest: c.semantics !== 'pre-0.16' });
      assert.equal(plan.length, fixture.input.length);
      // Before PR #5039 restic said "monthly snapshot" where it now says "oldest monthly snapshot".
      const ours = kept(plan).map(([t, r]) => [t, r.map((x) => x.replace(/^oldest /, ''))]);
      assert.deepEqual(ours, c.keep.map(([t, m]) => [iso(t), m.map(fromRestic)]));
    });
  }

  test('since restic 0.16 the oldest snapshot is kept while a rule has counts left, and named so', () => {
    const byIndex = (i: number) => fixture.cases.find((c) => c.index === i)!;
    const yearly = kept(planRetention(items(fixture.input), byIndex(16).rules));
    assert.deepEqual(yearly.map(([t, r]) => `${t} ${r.join(',')}`), [
      '2016-01-18T12:02:03.000Z yearly', '2015-11-22T10:20:30.000Z yearly', '2014-11-22T10:20:30.000Z yearly', '2014-08-08T10:20:30.000Z oldest yearly',
    ]);
    const mixed = kept(planRetention(items(fixture.input), byIndex(17).rules));
    assert.deepEqual(mixed.at(-1), ['2014-08-08T10:20:30.000Z', ['oldest yearly']]);
    const unlimited = kept(planRetention(items(fixture.input), byIndex(39).rules));
    assert.deepEqual(unlimited.at(-1), ['2014-08-08T10:20:30.000Z', ['oldest monthly', 'oldest yearly']]);
  });
});

describe("restic's documented examples (doc/060_forget.rst)", () => {
  test('one backup every Sunday for 12 weeks: --keep-daily 4 keeps the last four Sundays', () => {
    const sundays = Array.from({ length: 12 }, (_, i) => new Date(Date.UTC(2019, 8, 1 + 7 * i, 11)));
    const plan = planRetention(items(sundays), { keepDaily: 4 });
    assert.deepEqual(kept(plan).map(([t]) => t.slice(0, 10)), ['2019-11-17', '2019-11-10', '2019-11-03', '2019-10-27']);
    assert.ok(kept(plan).every(([, r]) => r.join() === 'daily'));
    assert.equal(plan.filter((d) => !d.keep).length, 8);
  });

  test('daily for 100 years with --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --keep-yearly 75', () => {
    const days = Array.from({ length: 36525 }, (_, i) => new Date(Date.UTC(1925, 0, 1, 3) + i * 86_400_000));
    const plan = planRetention(items(days), { keepDaily: 7, keepWeekly: 5, keepMonthly: 12, keepYearly: 75 });
    const count = (r: string) => plan.filter((d) => d.reasons.includes(r as never)).length;
    assert.deepEqual([count('daily'), count('weekly'), count('monthly'), count('yearly')], [7, 5, 12, 75]);
    // The docs count "7 daily, 4 more weekly, 12 or 11 monthly, 75 or 74 yearly". Here the newest
    // backup is Tuesday 31 December 2024: the 7 dailies hold 2 weekly ones (that Tuesday and Sunday
    // the 29th), the monthlies are the ends of 2024's months, the yearlies 31 December of 1950–2024.
    assert.equal(plan.filter((d) => d.keep).length, 7 + 3 + 11 + 74);
  });

  test('1w is 7 days (restic refuses w; vmvault reads it as operators mean it)', () => {
    assert.deepEqual(parseDuration('1w'), { years: 0, months: 0, days: 7, hours: 0, minutes: 0 });
    assert.deepEqual(parseDuration('7d'), parseDuration('1w'));
  });
});

describe('parseDuration', () => {
  test("restic's TestParseDuration cases (without negative numbers), with months written mo", () => {
    const cases: Array<[string, string]> = [['9h', '9h'], ['3d', '3d'], ['4d2h', '4d2h'], ['7mo5d', '7mo5d'], ['6mo4d8h', '6mo4d8h'], ['5d7mo', '7mo5d'], ['4h3d9mo', '9mo3d4h'], ['2y5mo7d3h', '2y5mo7d3h']];
    for (const [input, out] of cases) assert.equal(formatDuration(parseDuration(input)), out, input);
    assert.deepEqual(parseDuration(' 5d  '), { years: 0, months: 0, days: 5, hours: 0, minutes: 0 });
    assert.equal(formatDuration(parseDuration('0d')), '0h');
  });

  test('stricter than restic: negative numbers, repeated or unknown units, missing units are errors', () => {
    badInput(() => parseDuration('-7mo5d'), /not a duration/);
    badInput(() => parseDuration('1d2d'), /given twice/);
    badInput(() => parseDuration('3x'), /unknown unit "x"/);
    badInput(() => parseDuration('12'), /no unit after 12/);
    badInput(() => parseDuration(''), /empty duration/);
    badInput(() => parseDuration('1d 2h'), /not a duration/);
  });

  test('minutes are min, months are mo, and a bare m is refused as ambiguous', () => {
    assert.deepEqual(parseDuration('30min'), { years: 0, months: 0, days: 0, hours: 0, minutes: 30 });
    assert.deepEqual(parseDuration('30mo'), { years: 0, months: 30, days: 0, hours: 0, minutes: 0 });
    assert.deepEqual(parseDuration('1y2mo1w3d4h5min'), { years: 1, months: 2, days: 10, hours: 4, minutes: 5 });
    assert.equal(formatDuration(parseDuration('2h30min')), '2h30min');
    badInput(() => parseDuration('30m'), /"30m" is ambiguous: write 30min for minutes or 30mo for months/);
    badInput(() => parseDuration('1y6m'), /ambiguous: write 6min for minutes or 6mo for months/);
    badInput(() => parseDuration('5mins'), /unknown unit "mins"/);
  });

  test('minutes move an instant by real time', () => {
    assert.equal(shiftByDuration(new Date('2024-01-01T00:00:00Z'), parseDuration('1h30min'), 1).toISOString(), '2024-01-01T01:30:00.000Z');
  });
});

describe('edge cases', () => {
  test('no backups, no rules, zero rules', () => {
    assert.deepEqual(planRetention([], { keepDaily: 3 }), []);
    for (const rules of [{}, { keepDaily: 0, keepLast: 0 }, { keepWithin: '0d' }] as RetentionRules[]) {
      const plan = planRetention(items(['2024-01-01T00:00:00Z', '2024-01-02T00:00:00Z']), rules);
      assert.deepEqual(plan.map((d) => [d.keep, d.reasons]), [[true, ['empty policy']], [true, ['empty policy']]]);
    }
  });

  test('-1 is unlimited', () => {
    const plan = planRetention(items(['2024-01-01T01:00:00Z', '2024-01-01T02:00:00Z', '2023-01-01T00:00:00Z']), { keepLast: -1 });
    assert.ok(plan.every((d) => d.keep && d.reasons.join() === 'last'));
  });

  test('bad counts, times and zones are BAD_INPUT errors', () => {
    badInput(() => planRetention(items(['2024-01-01T00:00:00Z']), { keepDaily: -2 }), /keepDaily/);
    badInput(() => planRetention(items(['2024-01-01T00:00:00Z']), { keepLast: 1.5 }), /keepLast/);
    badInput(() => planRetention(items(['2024-01-01T00:00:00Z', 'yesterday']), { keepLast: 1 }), /backup b1: "yesterday"/);
    badInput(() => planRetention(items(['2024-01-01T00:00:00Z']), { keepLast: 1 }, { timeZone: 'Mars/Olympus' }), /unknown time zone/);
    badInput(() => planRetention(items(['2024-01-01T00:00:00Z']), { keepWithin: '2x' }), /unknown unit "x"/);
  });

  test('newest first; equal times keep their input order (a stable sort, like restic)', () => {
    const plan = planRetention([{ id: 'a', time: '2024-01-01T00:00:00Z' }, { id: 'b', time: new Date('2024-01-03T00:00:00Z') }, { id: 'c', time: '2024-01-01T00:00:00Z' }], { keepLast: 2 });
    assert.deepEqual(plan.map((d) => [d.id, d.keep]), [['b', true], ['a', true], ['c', false]]);
  });

  test('keepWithin counts back from the newest backup, not from now', () => {
    const plan = planRetention(items(['2010-05-01T00:00:00Z', '2010-05-03T00:00:00Z', '2010-05-03T12:00:00Z']), { keepWithin: '1d' }, { now: new Date('2024-01-01T00:00:00Z') });
    assert.deepEqual(plan.map((d) => d.keep), [true, true, false]);
  });

  test('keepWithin ignores backups in the future for "newest" (they are within, so kept)', () => {
    const now = new Date('2024-01-10T00:00:00Z');
    const times = ['2030-01-01T00:00:00Z', '2024-01-09T00:00:00Z', '2024-01-08T12:00:00Z', '2024-01-07T00:00:00Z'];
    assert.deepEqual(planRetention(items(times), { keepWithin: '1d' }, { now }).map((d) => d.keep), [true, true, true, false]);
    // Without `now`, the 2030 backup is the newest and only it is within a day of itself.
    assert.deepEqual(planRetention(items(times), { keepWithin: '1d' }).map((d) => d.keep), [true, false, false, false]);
    // All in the future: restic counts from Go's zero time, so all are within.
    assert.ok(planRetention(items(times.slice(0, 1)), { keepWithin: '1d' }, { now: new Date('2000-01-01T00:00:00Z') })[0]!.keep);
  });

  test("keepWithin subtracts like Go's AddDate: 31 March − 1 month = 2 March, then hours", () => {
    const newest = '2024-03-31T12:00:00Z';
    const plan = planRetention(items([newest, '2024-03-02T12:00:01Z', '2024-03-02T12:00:00Z', '2024-02-29T12:00:00Z']), { keepWithin: '1mo' });
    assert.deepEqual(plan.map((d) => d.keep), [true, true, false, false]);
    assert.equal(shiftByDuration(new Date('2024-03-01T01:00:00Z'), parseDuration('1mo2h'), -1).toISOString(), '2024-01-31T23:00:00.000Z');
    assert.equal(shiftByDuration(new Date('2024-02-29T12:00:00Z'), parseDuration('1y'), -1).toISOString(), '2023-03-01T12:00:00.000Z');
    assert.equal(shiftByDuration(new Date('2024-01-31T00:00:00Z'), parseDuration('1mo'), 1).toISOString(), '2024-03-02T00:00:00.000Z');
  });

  test('while a rule has counts left, the oldest backup is kept too ("oldest daily"); keepOldest: false is restic < 0.16', () => {
    const day = ['2024-01-01T20:00:00Z', '2024-01-01T10:00:00Z', '2024-01-01T01:00:00Z'];
    assert.deepEqual(kept(planRetention(items(day), { keepDaily: 5 })), [['2024-01-01T20:00:00.000Z', ['daily']], ['2024-01-01T01:00:00.000Z', ['oldest daily']]]);
    assert.deepEqual(kept(planRetention(items(day), { keepDaily: 5 }, { keepOldest: false })), [['2024-01-01T20:00:00.000Z', ['daily']]]);
    assert.deepEqual(kept(planRetention(items(day), { keepDaily: 1 })), [['2024-01-01T20:00:00.000Z', ['daily']]]);
  });

  test('reasons come in restic order: within, last, hourly, daily, weekly, monthly, yearly', () => {
    const [first] = planRetention(items(['2024-01-01T00:00:00Z']), { keepYearly: 1, keepMonthly: 1, keepWeekly: 1, keepDaily: 1, keepHourly: 1, keepLast: 1, keepWithin: '1d' });
    assert.deepEqual(first!.reasons, ['within', 'last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly']);
  });

  test('ISO weeks: Sunday 3 January 2021 is in week 53 of 2020, Monday 4 January starts week 1', () => {
    const plan = planRetention(items(['2021-01-04T08:00:00Z', '2021-01-03T08:00:00Z', '2020-12-28T08:00:00Z', '2020-12-27T08:00:00Z']), { keepWeekly: 10 }, { keepOldest: false });
    assert.deepEqual(plan.map((d) => d.keep), [true, true, false, true]);
  });

  test('periods are read on the wall clock of the time zone', () => {
    const times = ['2024-01-15T23:30:00Z', '2024-01-15T22:30:00Z'];
    assert.equal(planRetention(items(times), { keepDaily: 5 }, { keepOldest: false }).filter((d) => d.keep).length, 1);
    // In Paris (UTC+1) 23:30Z is already 16 January.
    assert.equal(planRetention(items(times), { keepDaily: 5 }, { timeZone: 'Europe/Paris', keepOldest: false }).filter((d) => d.keep).length, 2);
    // When clocks go back, 02:30 CEST and 02:30 CET are the same wall-clock hour, as restic (Go) counts it.
    const twice = ['2024-10-27T01:30:00Z', '2024-10-27T00:30:00Z'];
    assert.equal(planRetention(items(twice), { keepHourly: 5 }, { timeZone: 'Europe/Berlin', keepOldest: false }).filter((d) => d.keep).length, 1);
  });

  test('in a gap of a DST change, date arithmetic lands like Go: 1 April 02:30 − 1 day = 31 March 03:30 CEST', () => {
    const from = parseIsoTime('2024-04-01T02:30:00', 'Europe/Berlin')!;
    assert.equal(from.toISOString(), '2024-04-01T00:30:00.000Z');
    assert.equal(shiftByDuration(from, parseDuration('1d'), -1, 'Europe/Berlin').toISOString(), '2024-03-31T01:30:00.000Z');
    const autumn = parseIsoTime('2024-10-28T02:30:00', 'Europe/Berlin')!;
    assert.equal(shiftByDuration(autumn, parseDuration('1d'), -1, 'Europe/Berlin').toISOString(), '2024-10-27T01:30:00.000Z');
  });
});

describe('parseIsoTime', () => {
  test('ISO-8601 forms; without an offset, the wall clock of the given zone (default UTC)', () => {
    const ok: Array<[string, string | undefined, string]> = [
      ['2024-03-01T01:30:00Z', undefined, '2024-03-01T01:30:00.000Z'],
      ['2024-03-01 01:30:00.25+02:00', undefined, '2024-02-29T23:30:00.250Z'],
      ['2024-03-01T01:30-0130', undefined, '2024-03-01T03:00:00.000Z'],
      ['2024-03-01', undefined, '2024-03-01T00:00:00.000Z'],
      ['2024-03-01T12:00:00', 'America/New_York', '2024-03-01T17:00:00.000Z'],
      ['2024-07-01T12:00:00', 'Europe/Paris', '2024-07-01T10:00:00.000Z'],
    ];
    for (const [text, zone, want] of ok) assert.equal(parseIsoTime(text, zone)?.toISOString(), want, text);
  });

  test('not times: no date, impossible dates, other formats', () => {
    for (const text of ['', 'yesterday', 'March 7, 2024', '2024-02-30', '2023-02-29T00:00:00Z', '2024-13-01', '2024-03-01T24:00:00Z', '2024-03-01T12:60:00Z', '1709256600', '2024-3-1']) {
      assert.equal(parseIsoTime(text), undefined, text);
    }
  });
});

/**
 * The retention planner: restic's `forget --keep-*` as a pure function.
 *
 * Semantics (restic `internal/restic/snapshot_policy.go`, `ApplyPolicy`):
 * - Items are sorted newest first (a stable sort: equal times keep their input order).
 * - Each count rule (`keepLast`, `keepHourly`, `keepDaily`, `keepWeekly`, `keepMonthly`,
 *   `keepYearly`) walks that list once. An item is kept by the rule when its period
 *   (hour, day, ISO week, month, year; for `last` every item is its own period)
 *   differs from the period of the last item the rule kept, while the rule has counts
 *   left; each keep uses one count. So each rule keeps the newest item of each of its
 *   last N periods that have one. A count of -1 is unlimited (restic's `unlimited`).
 * - While a rule still has counts left when the walk reaches the oldest item, that item
 *   is kept too (restic ≥ 0.16), with the reason `oldest <rule>` when it shares its
 *   period with the rule's previous keep (as restic since PR #5039: "oldest daily
 *   snapshot"; 0.16 and 0.17.x say "daily snapshot"). `keepOldest: false` gives the
 *   behaviour of restic ≤ 0.15.
 * - `keepWithin` keeps every item strictly newer than (newest − duration), where the
 *   newest is the newest item that is not in the future (`now`), and the subtraction is
 *   Go's `AddDate(-y, -m, -d)` on the wall clock followed by `-h` hours of real time.
 * - The kept sets are united; the reasons list every rule that kept an item, in
 *   restic's order: within, last, hourly, daily, weekly, monthly, yearly.
 * - No rule at all (every count 0 and no duration): everything is kept with the reason
 *   `empty policy`. restic's CLI refuses to forget with an empty policy, so nothing is
 *   ever removed without a rule asking for it.
 *
 * Periods (and keepWithin's calendar arithmetic) are read on the wall clock of one IANA
 * time zone (default UTC, so results do not depend on the machine). restic reads each
 * snapshot's time with the offset recorded at backup (the backup host's local time,
 * with its DST rules when forget runs in that same zone): pass that zone to reproduce it.
 */
import { VmvaultError } from '../errors.js';

/** A calendar duration: `2y5mo7d3h30min` (see parseDuration; weeks count as 7 days). */
export interface Duration { years: number; months: number; days: number; hours: number; minutes: number }

export interface RetentionRules {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
  /** A duration (`14d`, `1y2mo`), counted back from the newest item. */
  keepWithin?: string | Duration;
}

export type CountRule = 'last' | 'hourly' | 'daily' | 'weekly' | 'monthly' | 'yearly';
export type KeepReason = CountRule | `oldest ${Exclude<CountRule, 'last'>}` | 'within' | 'empty policy';

/** A backup to plan: its id and time (a Date, or ISO-8601 text read as parseIsoTime does). */
export interface RetentionItem { id: string; time: Date | string }

export interface RetentionDecision<T extends RetentionItem = RetentionItem> {
  item: T;
  id: string;
  time: Date;
  keep: boolean;
  /** Why it is kept, in restic's order; empty when removed. */
  reasons: KeepReason[];
}

export interface PlanOptions {
  /** IANA zone whose wall clock defines hours, days, weeks, months, years. Default UTC. */
  timeZone?: string;
  /** Items at or after `now` are not considered the newest for `keepWithin` (as restic). Default: none are. */
  now?: Date;
  /** Keep the oldest item while a rule has counts left (restic ≥ 0.16). Default true. */
  keepOldest?: boolean;
}

const bad = (message: string) => new VmvaultError('BAD_INPUT', message);

// ---------------------------------------------------------------- durations

/**
 * Units, longest first where one is a prefix of another. Bare `m` is refused: restic
 * reads it as months and most other tools (and people) as minutes, so it is written
 * `mo` or `min` here and never guessed.
 */
const UNITS: Record<string, { field: keyof Duration; times: number }> = {
  y: { field: 'years', times: 1 },
  mo: { field: 'months', times: 1 },
  w: { field: 'days', times: 7 },
  d: { field: 'days', times: 1 },
  h: { field: 'hours', times: 1 },
  min: { field: 'minutes', times: 1 },
};
const UNIT_HELP = 'y=years, mo=months, w=weeks, d=days, h=hours, min=minutes';

/**
 * Parses a duration: numbers each followed by a unit (y, mo, w, d, h, min), in any
 * order, e.g. `14d`, `30min`, `1y6mo`, `2w3d12h`. The one parser for policies
 * (keepWithin), the CLI (--keep-within, --expire-in) and the API (expireIn).
 * restic's syntax differs in one letter: its `m` (months) is `mo` here, and a bare
 * `m` is refused as ambiguous rather than read as months or minutes. Unknown or
 * repeated units, negative numbers and empty text are BAD_INPUT errors too.
 */
export function parseDuration(text: string): Duration {
  const s = text.trim();
  const d: Duration = { years: 0, months: 0, days: 0, hours: 0, minutes: 0 };
  if (!s) throw bad('empty duration: expected e.g. 14d, 12h, 30min, 1y6mo');
  const seen = new Set<string>();
  const re = /(\d+)([a-zA-Z]*)/y;
  let at = 0;
  while (at < s.length) {
    re.lastIndex = at;
    const m = re.exec(s);
    if (!m) throw bad(`"${text}" is not a duration: expected numbers with units (${UNIT_HELP}), e.g. 14d, 30min, 1y6mo`);
    const unit = m[2]!;
    if (!unit) throw bad(`"${text}" is not a duration: no unit after ${m[1]} (${UNIT_HELP})`);
    if (unit === 'm') throw bad(`"${text}" is ambiguous: write ${m[1]}min for minutes or ${m[1]}mo for months (restic's m means months)`);
    const u = UNITS[unit];
    if (!u) throw bad(`"${text}" is not a duration: unknown unit "${unit}" (${UNIT_HELP})`);
    if (seen.has(unit)) throw bad(`"${text}" is not a duration: unit "${unit}" given twice`);
    seen.add(unit);
    const n = Number(m[1]);
    if (n > 1_000_000) throw bad(`"${text}" is not a duration: ${m[1]} is too large`);
    d[u.field] += n * u.times;
    at = re.lastIndex;
  }
  return d;
}

/** A duration's length in milliseconds, months and years at their average length: for "how often", not for calendars. */
export function durationMs(d: Duration): number {
  const day = 86_400_000;
  return Math.round(d.years * 365.2425 * day + d.months * 30.436875 * day + d.days * day + d.hours * 3_600_000 + d.minutes * 60_000);
}

/** A duration as parseDuration reads it: `1y2mo3d4h5min`, zero parts left out (`0h` for zero). */
export function formatDuration(d: Duration): string {
  const s = (d.years ? `${d.years}y` : '') + (d.months ? `${d.months}mo` : '') + (d.days ? `${d.days}d` : '') + (d.hours ? `${d.hours}h` : '') + (d.minutes ? `${d.minutes}min` : '');
  return s || '0h';
}

export const isZeroDuration = (d: Duration): boolean => !d.years && !d.months && !d.days && !d.hours && !d.minutes;

/**
 * `time` moved by `sign` × `d` as Go's `t.AddDate(±y, ±m, ±d).Add(±h hours)` does on the
 * wall clock of `timeZone`: calendar parts first (Jan 31 + 1m = Mar 3 or 2, like Go),
 * then hours and minutes of real time. Used by keepWithin (−1) and for expiry dates (+1).
 */
export function shiftByDuration(time: Date, d: Duration, sign: 1 | -1, timeZone = 'UTC'): Date {
  const w = wallClock(time.getTime(), timeZone);
  const shifted = utcFromParts(w.year + sign * d.years, w.month - 1 + sign * d.months, w.day + sign * d.days, w.hour, w.minute, w.second, w.ms);
  return new Date(wallToInstant(shifted, timeZone) + sign * (d.hours * 3_600_000 + (d.minutes ?? 0) * 60_000));
}

// ---------------------------------------------------------------- time zones

interface Wall { year: number; month: number; day: number; hour: number; minute: number; second: number; ms: number }

const formatters = new Map<string, Intl.DateTimeFormat>();

function formatter(timeZone: string): Intl.DateTimeFormat {
  let f = formatters.get(timeZone);
  if (!f) {
    f = new Intl.DateTimeFormat('en-US', {
      timeZone, hourCycle: 'h23', year: 'numeric', month: 'numeric', day: 'numeric',
      hour: 'numeric', minute: 'numeric', second: 'numeric', era: 'short',
    });
    formatters.set(timeZone, f);
  }
  return f;
}

/** True when `timeZone` is an IANA zone name this runtime knows (e.g. Europe/Paris, UTC). */
export function isValidTimeZone(timeZone: string): boolean {
  try {
    formatter(timeZone);
    return true;
  } catch {
    return false;
  }
}

function utcFromParts(year: number, month0: number, day: number, hour: number, minute: number, second: number, ms: number): number {
  const d = new Date(0);
  d.setUTCFullYear(year, month0, day); // unlike Date.UTC, years 0–99 stay themselves
  d.setUTCHours(hour, minute, second, ms);
  return d.getTime();
}

/** The wall clock of instant `t` (ms) in `timeZone`. */
function wallClock(t: number, timeZone: string): Wall {
  const ms = ((t % 1000) + 1000) % 1000;
  if (timeZone === 'UTC') {
    const d = new Date(t);
    return { year: d.getUTCFullYear(), month: d.getUTCMonth() + 1, day: d.getUTCDate(), hour: d.getUTCHours(), minute: d.getUTCMinutes(), second: d.getUTCSeconds(), ms };
  }
  const p: Record<string, string> = {};
  for (const part of formatter(timeZone).formatToParts(t)) p[part.type] = part.value;
  const y = Number(p.year);
  return {
    year: p.era === 'BC' || p.era === 'B' ? 1 - y : y, month: Number(p.month), day: Number(p.day),
    hour: Number(p.hour), minute: Number(p.minute), second: Number(p.second), ms,
  };
}

/** Offset (ms) of `timeZone` from UTC at instant `t`. */
function offsetAt(t: number, timeZone: string): number {
  const w = wallClock(t, timeZone);
  return utcFromParts(w.year, w.month - 1, w.day, w.hour, w.minute, w.second, w.ms) - t;
}

/**
 * The instant whose wall clock in `timeZone` reads `wall` (ms, as if UTC). Like Go's
 * `time.Date`: in a gap or an overlap it picks the offset in force just before.
 */
function wallToInstant(wall: number, timeZone: string): number {
  if (timeZone === 'UTC') return wall;
  return wall - offsetAt(wall - offsetAt(wall, timeZone), timeZone);
}

/** ISO-8601 week of a calendar date: year × 100 + week, as Go's `ISOWeek`. */
function isoWeek(year: number, month: number, day: number): number {
  const date = utcFromParts(year, month - 1, day, 0, 0, 0, 0);
  const weekday = (new Date(date).getUTCDay() + 6) % 7; // Monday = 0
  const thursday = new Date(date + (3 - weekday) * 86_400_000);
  const isoYear = thursday.getUTCFullYear();
  const week = Math.floor((thursday.getTime() - utcFromParts(isoYear, 0, 1, 0, 0, 0, 0)) / (7 * 86_400_000)) + 1;
  return isoYear * 100 + week;
}

// ---------------------------------------------------------------- input times

const ISO_RE = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?(Z|[+-]\d{2}(?::?\d{2})?)?$/i;

/**
 * Parses an ISO-8601 time (`2024-03-01T01:30:00Z`, `2024-03-01 01:30+02:00`,
 * `2024-03-01`). One without an offset is read on the wall clock of `timeZone`
 * (default UTC), never in the process's local zone. Fractions below a millisecond
 * are dropped. Undefined when the text is not such a time or names no real date.
 */
export function parseIsoTime(text: string, timeZone = 'UTC'): Date | undefined {
  const m = ISO_RE.exec(text.trim());
  if (!m) return undefined;
  const [y, mo, d, h, mi, s] = [m[1], m[2], m[3], m[4] ?? '0', m[5] ?? '0', m[6] ?? '0'].map(Number) as [number, number, number, number, number, number];
  const ms = Number(((m[7] ?? '') + '000').slice(0, 3));
  const wall = utcFromParts(y, mo - 1, d, h, mi, s, ms);
  const check = new Date(wall);
  if (check.getUTCFullYear() !== y || check.getUTCMonth() !== mo - 1 || check.getUTCDate() !== d || h > 23 || mi > 59 || s > 59) return undefined;
  const zone = m[8]?.toUpperCase();
  if (!zone) return new Date(wallToInstant(wall, timeZone));
  if (zone === 'Z') return check;
  const z = /^([+-])(\d{2}):?(\d{2})?$/.exec(zone)!;
  const offset = (Number(z[2]) * 60 + Number(z[3] ?? 0)) * (z[1] === '-' ? -1 : 1);
  return new Date(wall - offset * 60_000);
}

function toDate(item: RetentionItem, timeZone: string): Date {
  const t = item.time instanceof Date ? item.time : parseIsoTime(item.time, timeZone);
  if (!t || Number.isNaN(t.getTime())) throw bad(`backup ${item.id}: "${String(item.time)}" is not a valid ISO-8601 time`);
  return t;
}

// ---------------------------------------------------------------- the planner

type Bucketer = (w: Wall, nr: number) => number;

const COUNT_RULES: ReadonlyArray<{ rule: CountRule; key: keyof RetentionRules; bucket: Bucketer }> = [
  { rule: 'last', key: 'keepLast', bucket: (_w, nr) => nr },
  { rule: 'hourly', key: 'keepHourly', bucket: (w) => w.year * 1_000_000 + w.month * 10_000 + w.day * 100 + w.hour },
  { rule: 'daily', key: 'keepDaily', bucket: (w) => w.year * 10_000 + w.month * 100 + w.day },
  { rule: 'weekly', key: 'keepWeekly', bucket: (w) => isoWeek(w.year, w.month, w.day) },
  { rule: 'monthly', key: 'keepMonthly', bucket: (w) => w.year * 100 + w.month },
  { rule: 'yearly', key: 'keepYearly', bucket: (w) => w.year },
];

function checkCount(name: string, n: number | undefined): number {
  if (n === undefined) return 0;
  if (!Number.isInteger(n) || n < -1) throw bad(`${name} must be a whole number ≥ 0, or -1 for unlimited (got ${n})`);
  return n;
}

/** The normalised rules, or undefined when no rule is set (restic's "empty policy"). */
function normalise(rules: RetentionRules): { counts: number[]; within?: Duration } | undefined {
  const counts = COUNT_RULES.map((r) => checkCount(r.key, rules[r.key] as number | undefined));
  const within = typeof rules.keepWithin === 'string' ? parseDuration(rules.keepWithin) : rules.keepWithin;
  if (within && !Object.values(within).every((n) => Number.isInteger(n) && n >= 0 && n <= 1_000_000)) {
    throw bad(`keepWithin must be whole numbers of years, months, days, hours and minutes ≥ 0 (got ${JSON.stringify(within)})`);
  }
  const hasWithin = within !== undefined && !isZeroDuration(within);
  if (counts.every((c) => c === 0) && !hasWithin) return undefined;
  return hasWithin ? { counts, within: within! } : { counts };
}

/**
 * Decides, for every item, keep or remove and why. Pure: same input, same output.
 * Returns one decision per item, newest first. Throws BAD_INPUT for an invalid time,
 * count, duration or time zone.
 */
export function planRetention<T extends RetentionItem>(items: readonly T[], rules: RetentionRules, options: PlanOptions = {}): RetentionDecision<T>[] {
  const timeZone = options.timeZone ?? 'UTC';
  if (!isValidTimeZone(timeZone)) throw bad(`unknown time zone "${timeZone}": expected an IANA name such as Europe/Paris or UTC`);
  const sorted = items
    .map((item, i) => ({ item, i, time: toDate(item, timeZone) }))
    .sort((a, b) => b.time.getTime() - a.time.getTime() || a.i - b.i);
  const policy = normalise(rules);
  if (!policy) return sorted.map(({ item, time }) => ({ item, id: item.id, time, keep: true, reasons: ['empty policy'] }));
  if (sorted.length === 0) return [];

  const cutoff = withinCutoff(sorted.map((s) => s.time.getTime()), policy.within, options.now, timeZone);
  const keepOldest = options.keepOldest ?? true;
  const counts = [...policy.counts];
  const last = counts.map(() => Number.NaN);
  return sorted.map(({ item, time }, nr) => {
    const reasons: KeepReason[] = [];
    if (cutoff !== undefined && time.getTime() > cutoff) reasons.push('within');
    const wall = wallClock(time.getTime(), timeZone);
    const oldest = nr === sorted.length - 1;
    COUNT_RULES.forEach(({ rule, bucket }, i) => {
      if (counts[i]! <= 0 && counts[i] !== -1) return;
      const val = bucket(wall, nr);
      const fresh = val !== last[i];
      if (!fresh && !(oldest && keepOldest)) return;
      reasons.push(fresh || rule === 'last' ? rule : `oldest ${rule as Exclude<CountRule, 'last'>}`);
      last[i] = val;
      if (counts[i]! > 0) counts[i]!--;
    });
    return { item, id: item.id, time, keep: reasons.length > 0, reasons };
  });
}

/**
 * The instant after which keepWithin keeps items (exclusive), or undefined without
 * keepWithin. `times` are newest first. Counted from the newest item before `now`; with none (all in the
 * future) restic counts from Go's zero time, so every item is within.
 */
function withinCutoff(times: readonly number[], within: Duration | undefined, now: Date | undefined, timeZone: string): number | undefined {
  if (!within) return undefined;
  const limit = now?.getTime() ?? Number.POSITIVE_INFINITY;
  const newest = times.find((t) => t < limit); // times are newest first
  if (newest === undefined) return Number.NEGATIVE_INFINITY;
  return shiftByDuration(new Date(newest), within, -1, timeZone).getTime();
}

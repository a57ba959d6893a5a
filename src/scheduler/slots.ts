/**
 * Schedule slots: pure functions over cron expressions. A slot is the instant a
 * cron expression fires; the job of a scheduled backup is named after its policy,
 * VM and slot, so every scheduler replica, and every restart, enqueues the same id
 * and BullMQ keeps one job per slot.
 */
import { CronExpressionParser } from 'cron-parser';

/** BullMQ job id of a scheduled backup: `policy+vm+<slot epoch seconds>` (ids must not contain ':'). */
export function scheduledJobId(policy: string, vm: string, slot: Date): string {
  return `${policy}+${vm}+${Math.floor(slot.getTime() / 1000)}`;
}

function parse(schedule: string, currentDate: Date, timeZone?: string) {
  return CronExpressionParser.parse(schedule, { currentDate, ...(timeZone ? { tz: timeZone } : {}) });
}

/** The last slot at or before `now`, and the length of the period that ends there. */
export function previousSlot(schedule: string, now: Date, timeZone?: string): { slot: Date; periodMs: number } {
  // cron-parser's prev() is strictly before currentDate: start a millisecond later so a slot at `now` counts.
  const expr = parse(schedule, new Date(now.getTime() + 1), timeZone);
  const slot = expr.prev().toDate();
  const before = expr.prev().toDate();
  return { slot, periodMs: slot.getTime() - before.getTime() };
}

/**
 * Whether a VM missed its last slot: its newest backup under the policy is older
 * than the slot by more than one period (or it has none). A slot before `since`
 * (when the policy was first seen) was never the policy's: it is not missed.
 */
export function missedSlot(schedule: string, now: Date, lastBackup: Date | undefined, timeZone?: string, since?: Date): Date | undefined {
  const { slot, periodMs } = previousSlot(schedule, now, timeZone);
  if (since && slot.getTime() < since.getTime()) return undefined;
  if (!lastBackup) return slot;
  return slot.getTime() - lastBackup.getTime() > periodMs ? slot : undefined;
}

/** The first slot after `now`, or null when the expression has none. */
export function nextSlot(schedule: string, now: Date, timeZone?: string): Date | null {
  try {
    return parse(schedule, now, timeZone).next().toDate();
  } catch {
    return null;
  }
}

/**
 * Whether a VM is overdue under a schedule: its last slot came more than one period
 * after its newest backup (a whole slot missed, not one still running). Counted from
 * when the policy was first seen when that is later (a VM never backed up, or backed
 * up before the policy existed, is not overdue before the policy's first period has
 * passed); with neither a backup nor a first sighting (no scheduler has run it), never.
 */
export function isOverdue(schedule: string, now: Date, lastSuccess: Date | undefined, timeZone?: string, since?: Date): boolean {
  const times = [lastSuccess, since].filter((d): d is Date => d !== undefined).map((d) => d.getTime());
  if (times.length === 0) return false;
  return missedSlot(schedule, now, new Date(Math.max(...times)), timeZone) !== undefined;
}

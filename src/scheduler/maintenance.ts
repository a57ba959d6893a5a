/**
 * The maintenance schedule (config `maintenance:`): verify, gc and an off-site copy at set times, each
 * run one job on the shared maintenance queue under an id derived from its kind and
 * slot, so scheduler replicas enqueue it once. Deciding what a slot's job is, is pure.
 *
 * `readData: rotate N` makes each verify read the next of N slices of the chunks
 * (verify --read-data-subset k/N), so every chunk is read once every N runs: k
 * follows the slot's number in the schedule's period (slot time / period, in UTC, so a
 * daylight-saving shift of an hour does not skip or repeat a slice). Regular
 * schedules (hourly, daily, weekly) visit k = 1…N in turn; irregular ones (weekdays
 * only) may skip some, and still read every chunk sooner or later.
 */
import cron, { type ScheduledTask } from 'node-cron';
import { previousSlot } from './slots.js';

export interface MaintenanceSchedule {
  timezone?: string | undefined;
  verify?: { schedule: string; readData: string } | undefined;
  gc?: { schedule: string } | undefined;
  copy?: { schedule: string } | undefined;
}

export type MaintenancePayload =
  | { kind: 'verify'; readData: boolean; readDataSubset?: string }
  | { kind: 'gc'; dryRun: false }
  | { kind: 'copy' };

export interface MaintenanceJobRequest { jobId: string; slot: Date; payload: MaintenancePayload }

/** BullMQ job id of a scheduled maintenance run: `maintenance+<kind>+<slot epoch seconds>`. */
export function maintenanceJobId(kind: MaintenancePayload['kind'], slot: Date): string {
  return `maintenance+${kind}+${Math.floor(slot.getTime() / 1000)}`;
}

/** The slice (1…n) a rotating verify reads at `slot`. */
export function rotationSlice(schedule: string, slot: Date, n: number): number {
  const { periodMs } = previousSlot(schedule, slot);
  const index = Math.round(slot.getTime() / periodMs);
  return 1 + (((index % n) + n) % n);
}

/** The job of a maintenance slot. */
export function maintenanceJob(kind: MaintenancePayload['kind'], s: MaintenanceSchedule, slot: Date): MaintenanceJobRequest {
  const at = new Date(Math.floor(slot.getTime() / 1000) * 1000);
  if (kind === 'gc') return { jobId: maintenanceJobId('gc', at), slot: at, payload: { kind: 'gc', dryRun: false } };
  if (kind === 'copy') return { jobId: maintenanceJobId('copy', at), slot: at, payload: { kind: 'copy' } };
  const readData = s.verify?.readData ?? 'none';
  const rotate = /^rotate (\d+)$/.exec(readData);
  const payload: MaintenancePayload = readData === 'all' ? { kind: 'verify', readData: true }
    : rotate ? { kind: 'verify', readData: false, readDataSubset: `${rotationSlice(s.verify!.schedule, at, Number(rotate[1]))}/${rotate[1]}` }
      : readData.endsWith('%') ? { kind: 'verify', readData: false, readDataSubset: readData }
        : { kind: 'verify', readData: false };
  return { jobId: maintenanceJobId('verify', at), slot: at, payload };
}

/** One node-cron task per scheduled kind; `fire` enqueues (and reports its own errors). */
export function scheduleMaintenance(s: MaintenanceSchedule, fire: (job: MaintenanceJobRequest) => void): ScheduledTask[] {
  const tasks: ScheduledTask[] = [];
  for (const kind of ['verify', 'gc', 'copy'] as const) {
    const schedule = s[kind]?.schedule;
    if (!schedule) continue;
    tasks.push(cron.schedule(schedule, (ctx) => fire(maintenanceJob(kind, s, ctx.date)), {
      name: `maintenance-${kind}`, ...(s.timezone ? { timezone: s.timezone } : {}),
    }));
  }
  return tasks;
}

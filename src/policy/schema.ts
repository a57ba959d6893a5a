/**
 * The policy file (one per file in `policies/*.yaml`), as a zod schema.
 *
 * ```yaml
 * name: nightly                 # letters, digits, . _ - (it becomes part of job ids)
 * schedule: "30 1 * * *"        # 5- or 6-field cron (node-cron syntax)
 * timezone: Europe/Paris        # optional IANA zone: of the schedule and of retention's periods
 * select: { tags: [production] }  # vms: [names] and/or tags: [tags]; a VM matching either is selected
 * retention:                    # restic's forget --keep-* rules (see retention.ts)
 *   keepDaily: 7
 *   byLabel:                    # backups with this label follow these rules instead
 *     pre-update: { keepWithin: 14d }
 * enabled: true                 # default true
 * labels: [nightly]             # optional labels put on the backups this policy makes
 * drill: weekly                 # optional restore drill of each VM's newest backup: daily, weekly, monthly,
 *                               # or { every: weekly, serial: "login:" | guestAgent: true | tcp: 22, timeout: 5min }
 * ```
 * Unknown keys are errors (a typo must not silently keep or delete backups).
 */
import { lazy } from '../lazy-require.js';
import * as z from 'zod';
import { durationMs, isValidTimeZone, parseDuration } from './retention.js';

const cron = lazy<typeof import('node-cron')>('node-cron');

/** Policy names and labels end up in job ids and file names: no `:`, no spaces. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const nameRule = 'letters, digits, ".", "_" or "-", starting with a letter or digit, at most 64 characters';

const count = z
  .custom<number | 'unlimited'>((v) => v === 'unlimited' || (Number.isInteger(v) && (v as number) >= -1), 'expected a whole number ≥ 0, or -1 / "unlimited" for no limit')
  .transform((v) => (v === 'unlimited' ? -1 : v));

const duration = z.string({ error: 'expected a duration such as 14d, 12h, 30min, 1y6mo' }).superRefine((text, ctx) => {
  try {
    parseDuration(text);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: (err as Error).message });
  }
});

const ruleShape = {
  keepLast: count.optional(),
  keepHourly: count.optional(),
  keepDaily: count.optional(),
  keepWeekly: count.optional(),
  keepMonthly: count.optional(),
  keepYearly: count.optional(),
  keepWithin: duration.optional(),
};

/** One set of rules; absent rules and 0 do nothing, and no rule at all keeps everything. */
export const retentionRulesSchema = z.strictObject(ruleShape);

export const labelSchema = z.string({ error: 'expected a label' }).regex(NAME_RE, `a label is ${nameRule}`);

/** The rules for unlabelled backups, plus rules per label (a backup with several labels follows the first listed here). */
export const retentionSchema = z.strictObject({
  ...ruleShape,
  byLabel: z.record(labelSchema, retentionRulesSchema).optional(),
});

export const cronSchedule = z.string({ error: 'expected a cron expression such as "30 1 * * *"' }).superRefine((expr, ctx) => {
  const v = cron().validateDetailed(expr);
  if (v.valid) return;
  const why = v.errors.map((e) => e.message).join('; ') || 'not a valid cron expression';
  ctx.addIssue({ code: 'custom', message: `"${expr}" is not a valid 5- or 6-field cron expression: ${why}` });
});

const nonEmpty = (what: string) => z.string({ error: `expected a ${what}` }).min(1, `a ${what} cannot be empty`);

const selectSchema = z
  .strictObject({
    vms: z.array(nonEmpty('VM name'), { error: 'expected a list of VM names' }).min(1, 'list at least one VM, or leave vms out').optional(),
    tags: z.array(nonEmpty('tag'), { error: 'expected a list of tags' }).min(1, 'list at least one tag, or leave tags out').optional(),
  }, { error: 'expected vms: [names] and/or tags: [tags]' })
  .refine((s) => s.vms !== undefined || s.tags !== undefined, 'choose VMs with vms: [names] and/or tags: [tags]');

/** When drills run (local time of the policy's zone): daily at 04:15, weekly on Sunday, monthly on the 1st. */
export const DRILL_CRON = { daily: '15 4 * * *', weekly: '15 4 * * 0', monthly: '15 4 1 * *' } as const;
const drillEvery = z.enum(['daily', 'weekly', 'monthly'], { error: 'expected daily, weekly or monthly' });

/**
 * A policy's restore drill: how often, and how success is decided (one of serial text,
 * guest agent, guest TCP port; the serial text "login:" by default) within `timeout`.
 */
export const drillSchema = z.union([
  drillEvery.transform((every) => ({ every })),
  z.strictObject({
    every: drillEvery,
    serial: z.string({ error: 'expected the text to wait for on the serial console' }).min(1, 'the serial text cannot be empty').optional(),
    guestAgent: z.literal(true, { error: 'expected true (succeed when the guest agent answers guest-ping)' }).optional(),
    tcp: z.number({ error: 'expected a guest TCP port' }).int().min(1).max(65535, 'a TCP port is 1-65535').optional(),
    timeout: duration.optional(),
  }, { error: 'expected daily, weekly, monthly, or { every, serial | guestAgent | tcp, timeout }' })
    .refine((d) => [d.serial !== undefined, d.guestAgent !== undefined, d.tcp !== undefined].filter(Boolean).length <= 1, 'give one probe: serial, guestAgent or tcp'),
], { error: 'expected daily, weekly, monthly, or { every, serial | guestAgent | tcp, timeout }' });
export type PolicyDrill = z.output<typeof drillSchema>;

export const policySchema = z.strictObject({
  name: z.string({ error: 'expected a policy name' }).regex(NAME_RE, `a policy name is ${nameRule}`),
  schedule: cronSchedule,
  timezone: z
    .string({ error: 'expected an IANA time zone such as Europe/Paris' })
    .refine(isValidTimeZone, { error: (iss) => `unknown time zone "${String(iss.input)}": expected an IANA name such as Europe/Paris or UTC` })
    .optional(),
  select: selectSchema,
  retention: retentionSchema,
  enabled: z.boolean({ error: 'expected true or false' }).default(true),
  labels: z.array(labelSchema, { error: 'expected a list of labels' }).optional(),
  /**
   * An audited full read of each disk at least this often (`7d`): every chunk is read
   * and those change tracking called unchanged are compared with the previous backup.
   */
  fullReadEvery: z.string({ error: 'expected a duration such as 7d' }).superRefine((text, ctx) => {
    try {
      if (durationMs(parseDuration(text)) <= 0) ctx.addIssue({ code: 'custom', message: 'expected a duration longer than zero, such as 7d' });
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
    }
  }).optional(),
  /** Boot each selected VM's newest backup this often, in isolation, and record whether it came up (vm/drill.ts). */
  drill: drillSchema.optional(),
}, { error: 'expected a policy: a mapping with name, schedule, select and retention' });

export type RetentionPolicyRules = z.output<typeof retentionRulesSchema>;
export type PolicyRetention = z.output<typeof retentionSchema>;
export type Policy = z.output<typeof policySchema>;

/** Every key a policy file may use at any level, to suggest a fix for a typo. */
export const POLICY_KEYS: readonly string[] = [...Object.keys(policySchema.shape), 'vms', 'tags', ...Object.keys(ruleShape), 'byLabel', 'every', 'serial', 'guestAgent', 'tcp', 'timeout'];

/**
 * Which rules a backup with these labels follows: those of the first label (in the
 * order of `byLabel`) it carries, else the policy's own rules. Backups are planned
 * in groups with the same `label` (undefined for the policy's own rules), so a
 * `pre-update` backup expires on its own clock and never counts against nightly ones.
 */
export function retentionFor(retention: PolicyRetention, labels: readonly string[]): { label?: string; rules: RetentionPolicyRules } {
  for (const [label, rules] of Object.entries(retention.byLabel ?? {})) {
    if (labels.includes(label)) return { label, rules };
  }
  const { byLabel: _byLabel, ...rules } = retention;
  return { rules };
}

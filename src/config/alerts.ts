/**
 * The `alerts:` section of vmvault.yaml: where the scheduler sends alerts (signed
 * JSON webhooks, e-mail over SMTP) and how often it checks. Secrets (a webhook's
 * HMAC key, the SMTP password) come from a file or an environment variable, never
 * from the file itself, and are never logged. See README.md, "Alerts".
 */
import * as z from 'zod';

export const ALERT_EVENTS = ['job_failed', 'backup_overdue', 'worker_offline', 'verify_damage', 'backup_unreadable'] as const;
export type AlertEvent = (typeof ALERT_EVENTS)[number];

const UNITS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 } as const;

/** "90s", "5m", "1h", "500ms" → milliseconds; undefined when malformed. */
export function parseInterval(text: string): number | undefined {
  const m = /^(\d{1,9})(ms|s|m|h)$/.exec(text);
  return m ? Number(m[1]) * UNITS[m[2] as keyof typeof UNITS] : undefined;
}

const interval = (what: string, min = 100) => z.string({ error: `expected ${what} such as 60s, 5m or 1h` })
  .refine((t) => (parseInterval(t) ?? 0) >= min, `expected ${what}: a whole number with ms, s, m or h, such as 60s or 5m (at least ${min} ms)`)
  .transform((t) => parseInterval(t)!);

const envName = z.string({ error: 'expected an environment variable name' }).regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'expected an environment variable name such as VMVAULT_WEBHOOK_SECRET');
const events = z.array(z.enum(ALERT_EVENTS, { error: `expected an event: ${ALERT_EVENTS.join(', ')}` }), { error: `expected a list of events (${ALERT_EVENTS.join(', ')})` })
  .min(1, 'list at least one event, or leave events out for all of them').default([...ALERT_EVENTS]);

/** A secret from a file or an environment variable: exactly one of the two. */
function secretSource(fileKey: string, envKey: string, what: string, required: boolean) {
  return (v: Record<string, unknown>, ctx: z.RefinementCtx) => {
    const both = v[fileKey] !== undefined && v[envKey] !== undefined;
    if (both) ctx.addIssue({ code: 'custom', path: [envKey], message: `${what} comes from ${fileKey} or ${envKey}, not both: remove one` });
    if (required && v[fileKey] === undefined && v[envKey] === undefined) {
      ctx.addIssue({ code: 'custom', path: [], message: `${what} is needed: set ${fileKey} (a file holding it) or ${envKey} (an environment variable); it is never written in vmvault.yaml` });
    }
  };
}

const webhookSchema = z.strictObject({
  url: z.string({ error: 'expected a URL' }).refine((u) => {
    try {
      const p = new URL(u).protocol;
      return p === 'https:' || p === 'http:';
    } catch {
      return false;
    }
  }, 'expected an http:// or https:// URL'),
  /** The HMAC-SHA-256 key of the X-Vmvault-Signature header. */
  secretFile: z.string({ error: 'expected a file path' }).min(1).optional(),
  secretEnv: envName.optional(),
  events,
  /** Deliveries in total, first one included; the wait doubles after each failure. */
  attempts: z.number({ error: 'expected a whole number' }).int().min(1).max(20).default(5),
  retryDelay: interval('the first wait before a retry', 10).prefault('1s'),
}, { error: 'expected a webhook: { url, secretFile | secretEnv, events?, attempts?, retryDelay? }' })
  .superRefine(secretSource('secretFile', 'secretEnv', 'the webhook secret', true));

const emailSchema = z.strictObject({
  smtp: z.strictObject({
    host: z.string({ error: 'expected the SMTP server\'s host name' }).min(1),
    port: z.number({ error: 'expected a port number' }).int().min(1).max(65535).default(587),
    /** TLS from the start (port 465); otherwise STARTTLS when the server offers it. */
    secure: z.boolean({ error: 'expected true or false' }).default(false),
    /**
     * Refuse to send unless the server upgrades to TLS (STARTTLS). Default: true when
     * there is a password (a server offering no STARTTLS, or a man in the middle
     * removing it from the server's answer, would otherwise be sent it in cleartext),
     * false otherwise.
     */
    requireTLS: z.boolean({ error: 'expected true or false' }).optional(),
    /** The explicit opt-out: send the password without TLS when the server offers none (a trusted local relay only). */
    allowPlaintextAuth: z.boolean({ error: 'expected true or false' }).default(false),
    user: z.string({ error: 'expected a user name' }).min(1).optional(),
    passwordFile: z.string({ error: 'expected a file path' }).min(1).optional(),
    passwordEnv: envName.optional(),
  }, { error: 'expected smtp: { host, port?, secure?, requireTLS?, allowPlaintextAuth?, user?, passwordFile | passwordEnv }' })
    .superRefine(secretSource('passwordFile', 'passwordEnv', 'the SMTP password', false))
    .superRefine((s, ctx) => {
      if (s.user === undefined && (s.passwordFile !== undefined || s.passwordEnv !== undefined)) {
        ctx.addIssue({ code: 'custom', path: [], message: 'a password needs a user: add user' });
      }
      if (s.user !== undefined && s.passwordFile === undefined && s.passwordEnv === undefined) {
        ctx.addIssue({ code: 'custom', path: [], message: `user "${s.user}" needs a password: set passwordFile or passwordEnv` });
      }
      if (s.user !== undefined && s.requireTLS === false && !s.allowPlaintextAuth && !s.secure) {
        ctx.addIssue({ code: 'custom', path: ['requireTLS'], message: 'requireTLS: false would send the SMTP password in cleartext to a server that offers no STARTTLS: remove it, or add allowPlaintextAuth: true for a trusted relay' });
      }
    })
    // What is sent is decided here: TLS is required with a password unless plain AUTH is explicitly allowed.
    .transform((s) => ({ ...s, requireTLS: s.requireTLS ?? (s.user !== undefined && !s.allowPlaintextAuth) })),
  from: z.string({ error: 'expected the sender address' }).min(3),
  to: z.array(z.string().regex(/^[^\s@]+@[^\s@]+$/, 'expected an e-mail address'), { error: 'expected a list of addresses' }).min(1, 'expected at least one address'),
  events,
  attempts: z.number({ error: 'expected a whole number' }).int().min(1).max(20).default(5),
  retryDelay: interval('the first wait before a retry', 10).prefault('1s'),
}, { error: 'expected email: { smtp: { host, … }, from, to: [addresses], events? }' });

export const alertsSchema = z.strictObject({
  /** How often the scheduler looks for alerts to send. */
  checkEvery: interval('a check interval').prefault('60s'),
  /** A host with VMs or jobs counts as offline once no worker heartbeat was seen for this long. */
  offlineAfter: interval('a duration').prefault('2m'),
  webhooks: z.array(webhookSchema, { error: 'expected a list of webhooks' }).default([]),
  email: emailSchema.optional(),
}, { error: 'expected alerts: { checkEvery?, offlineAfter?, webhooks?: [...], email? }' });

export type AlertsConfig = z.output<typeof alertsSchema>;
export type WebhookConfig = AlertsConfig['webhooks'][number];
export type EmailConfig = NonNullable<AlertsConfig['email']>;

/** Every key of the section, for typo suggestions. */
export const ALERT_KEYS = ['alerts', ...Object.keys(alertsSchema.shape), 'url', 'secretFile', 'secretEnv', 'events', 'attempts', 'retryDelay',
  'smtp', 'host', 'port', 'secure', 'requireTLS', 'allowPlaintextAuth', 'user', 'passwordFile', 'passwordEnv', 'from', 'to'];

/**
 * Sending an alert: a signed JSON webhook or an e-mail, each retried with exponential
 * backoff. A webhook's body is the alert as JSON; `X-Vmvault-Timestamp` is the send
 * time (Unix seconds) and `X-Vmvault-Signature: sha256=<hex>` the HMAC-SHA-256, under
 * the configured secret, of `<timestamp>.<body>`: a receiver recomputes it, compares
 * in constant time and refuses a timestamp more than a few minutes old (a replay).
 * `X-Vmvault-Delivery` stays the same across retries of one alert, so a receiver can
 * drop a repeat. Secrets are read once, at start, and appear in no log or error.
 */
import { createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import nodemailer from 'nodemailer';
import type { EmailConfig, WebhookConfig } from '../../config/alerts.js';
import { errorMessage, VmvaultError } from '../../errors.js';
import type { Alert } from './alert.js';

/** One way out for alerts. */
export interface Channel {
  /** For logs: never carries a secret. */
  readonly name: string;
  wants(alert: Alert): boolean;
  /** Sends once; throws when it did not arrive (the caller retries). */
  send(alert: Alert): Promise<void>;
  readonly attempts: number;
  readonly retryDelayMs: number;
  close(): void;
}

const WEBHOOK_TIMEOUT_MS = 10_000;

export async function readSecret(file: string | undefined, env: string | undefined, what: string, environ: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  if (file !== undefined) {
    let text: string;
    try {
      text = (await readFile(file, 'utf8')).replace(/\r?\n$/, '');
    } catch (err) {
      throw new VmvaultError('BAD_INPUT', `cannot read ${what} from ${file}: ${errorMessage(err)}`);
    }
    if (!text) throw new VmvaultError('BAD_INPUT', `${what} file ${file} is empty`);
    return text;
  }
  if (env !== undefined) {
    const v = environ[env];
    if (!v) throw new VmvaultError('BAD_INPUT', `${what} is to come from the environment variable ${env}, which is not set`);
    return v;
  }
  return undefined;
}

/** The signature header's value for a body sent at `timestamp` (Unix seconds). */
export function signature(secret: string, timestamp: number, body: string): string {
  return `sha256=${createHmac('sha256', secret).update(`${timestamp}.${body}`).digest('hex')}`;
}

/** A delivery that must not be retried (the receiver refused the request itself). */
class Refused extends Error {}

/**
 * A webhook's name in logs: its origin and its place in alerts.webhooks. Never its path
 * or query: for Slack, Discord and the like the path is the secret that lets anyone post.
 */
export function webhookName(url: string, index: number): string {
  return `webhook ${new URL(url).origin} (alerts.webhooks[${index}])`;
}

export function webhookChannel(c: WebhookConfig, secret: string, o: { index: number; now?: () => number }): Channel {
  const now = o.now ?? Date.now;
  return {
    name: webhookName(c.url, o.index),
    wants: (a) => c.events.includes(a.event),
    attempts: c.attempts,
    retryDelayMs: c.retryDelay,
    close: () => {},
    async send(alert) {
      const body = JSON.stringify(alert);
      const ts = Math.floor(now() / 1000);
      const r = await fetch(c.url, {
        method: 'POST', body, redirect: 'error', signal: AbortSignal.timeout(WEBHOOK_TIMEOUT_MS),
        headers: {
          'content-type': 'application/json', 'user-agent': 'vmvault',
          'x-vmvault-event': alert.event, 'x-vmvault-delivery': alert.id,
          'x-vmvault-timestamp': String(ts), 'x-vmvault-signature': signature(secret, ts, body),
        },
      });
      await r.body?.cancel().catch(() => {});
      if (r.ok) return;
      const retriable = r.status >= 500 || r.status === 408 || r.status === 429;
      const e = `the endpoint answered ${r.status} ${r.statusText}`;
      throw retriable ? new Error(e) : new Refused(e);
    },
  };
}

export function emailChannel(c: EmailConfig, password: string | undefined): Channel {
  const transport = nodemailer.createTransport({
    host: c.smtp.host, port: c.smtp.port, secure: c.smtp.secure, requireTLS: c.smtp.requireTLS,
    ...(c.smtp.user ? { auth: { user: c.smtp.user, pass: password ?? '' } } : {}),
    connectionTimeout: 15_000, greetingTimeout: 15_000, socketTimeout: 30_000,
  });
  return {
    name: `e-mail via ${c.smtp.host}:${c.smtp.port}`,
    wants: (a) => c.events.includes(a.event),
    attempts: c.attempts,
    retryDelayMs: c.retryDelay,
    close: () => transport.close(),
    async send(alert) {
      try {
        await transport.sendMail({
          from: c.from, to: c.to, subject: `[vmvault] ${alert.summary}`,
          text: `${alert.summary}\n\n${alert.text}\n\nevent: ${alert.event}\ntime: ${alert.at}\nalert id: ${alert.id}\n\n${JSON.stringify(alert.details, null, 2)}\n`,
          headers: { 'X-Vmvault-Event': alert.event, 'X-Vmvault-Delivery': alert.id },
        });
      } catch (err) {
        // The server refused STARTTLS (or does not offer it): retrying would not change that.
        const e = err as { code?: string; command?: string; response?: string };
        if (e.code === 'ETLS' && e.command === 'STARTTLS' && e.response) {
          throw new Refused(`${c.smtp.host}:${c.smtp.port} does not offer STARTTLS (it answered "${e.response.trim()}"), and the password is sent over TLS only: ` +
            'use its TLS port with secure: true (usually 465), or, for a trusted relay only, allowPlaintextAuth: true');
        }
        throw err;
      }
    },
  };
}

/**
 * Sends with retries: attempts in total, waiting retryDelayMs, then twice that, and so
 * on. Resolves true when delivered; false when every attempt failed, the receiver
 * refused it, or `signal` stopped it (each failure goes to onFailure, without secrets).
 */
export async function deliver(channel: Channel, alert: Alert, opts: { signal?: AbortSignal; onFailure?: (attempt: number, message: string, final: boolean) => void } = {}): Promise<boolean> {
  for (let attempt = 1; attempt <= channel.attempts; attempt++) {
    try {
      await channel.send(alert);
      return true;
    } catch (err) {
      const final = err instanceof Refused || attempt === channel.attempts || !!opts.signal?.aborted;
      opts.onFailure?.(attempt, errorMessage(err), final);
      if (final) return false;
      try {
        await sleep(channel.retryDelayMs * 2 ** (attempt - 1), undefined, opts.signal ? { signal: opts.signal } : {});
      } catch {
        return false; // Stopped while waiting.
      }
    }
  }
  return false;
}

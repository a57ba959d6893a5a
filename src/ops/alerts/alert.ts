/** An alert, as webhooks receive it (JSON) and e-mails show it. */
import { randomBytes } from 'node:crypto';
import type { AlertEvent } from '../../config/alerts.js';

export interface Alert {
  /** Unique per alert, the same across retries of its delivery. */
  id: string;
  event: AlertEvent;
  at: string;
  /** One line: the e-mail's subject. */
  summary: string;
  /** What happened and what to do, in sentences. */
  text: string;
  details: Record<string, unknown>;
}

export function newAlert(event: AlertEvent, summary: string, text: string, details: Record<string, unknown>, now = new Date()): Alert {
  return { id: randomBytes(8).toString('hex'), event, at: now.toISOString(), summary, text, details };
}

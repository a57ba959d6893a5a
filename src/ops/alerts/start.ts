/**
 * Starts the alert checks of a scheduler process from `alerts:` in the configuration
 * (nothing when it names no webhook and no e-mail). The secrets are read here, once:
 * a missing file or variable stops the service from starting, with the reason.
 */
import type { Logger } from 'pino';
import type { Config } from '../../config/schema.js';
import type { StatusSources } from '../status.js';
import { emailChannel, readSecret, webhookChannel, type Channel } from './deliver.js';
import { AlertMonitor } from './monitor.js';

export async function alertChannels(config: Pick<Config, 'alerts'>, env: NodeJS.ProcessEnv = process.env): Promise<Channel[]> {
  const a = config.alerts;
  if (!a) return [];
  const channels: Channel[] = [];
  for (const [i, w] of a.webhooks.entries()) {
    const secret = await readSecret(w.secretFile, w.secretEnv, `the secret of alerts.webhooks[${i}]`, env);
    channels.push(webhookChannel(w, secret!, { index: i }));
  }
  if (a.email) {
    const pass = await readSecret(a.email.smtp.passwordFile, a.email.smtp.passwordEnv, 'the SMTP password of alerts.email', env);
    channels.push(emailChannel(a.email, pass));
  }
  return channels;
}

export async function startAlerts(config: Config, sources: StatusSources, log: Logger, env?: NodeJS.ProcessEnv): Promise<AlertMonitor | undefined> {
  const channels = await alertChannels(config, env);
  if (!config.alerts || channels.length === 0) return undefined;
  const monitor = new AlertMonitor({ sources, channels, log, checkEveryMs: config.alerts.checkEvery, offlineAfterMs: config.alerts.offlineAfter });
  await monitor.start();
  log.info({ channels: channels.map((c) => c.name), checkEveryMs: config.alerts.checkEvery }, 'alerts enabled');
  return monitor;
}

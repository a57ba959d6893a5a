/**
 * What alert delivery gives away: a webhook is named in logs by its origin and its
 * index, never by the path that is a Slack or Discord hook's secret, in the channel
 * name and in every failure; the SMTP password is not sent to a server that offers no
 * STARTTLS (the delivery fails, saying so, and the server sees no AUTH) unless
 * allowPlaintextAuth says so.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { SMTPServer } from 'smtp-server';
import { parseConfig } from '../../src/config/load.js';
import type { Alert } from '../../src/ops/alerts/alert.js';
import { deliver, emailChannel, webhookChannel } from '../../src/ops/alerts/deliver.js';
import { alertChannels } from '../../src/ops/alerts/start.js';

const HOOK_PATH = '/services/T0123ABCD/B0456EFGH/s3cr3tPathToken0123456789';
const ALERT: Alert = {
  id: 'a1', event: 'job_failed', at: new Date(0).toISOString(), summary: 'backup job 1 of VM web failed', text: 'it failed', details: {},
};

describe('alert delivery', () => {
  let hooks: Server;
  let smtp: SMTPServer;
  let smtpPort = 0;
  const auths: string[] = [];
  const mails: string[] = [];
  let hookOrigin = '';

  before(async () => {
    hooks = createServer((_req, res) => res.writeHead(500).end());
    await new Promise<void>((r) => hooks.listen(0, '127.0.0.1', r));
    hookOrigin = `http://127.0.0.1:${(hooks.address() as AddressInfo).port}`;
    smtp = new SMTPServer({
      disabledCommands: ['STARTTLS'], allowInsecureAuth: true, logger: false,
      onAuth(auth, _s, cb) { auths.push(`${auth.username}:${auth.password}`); cb(null, { user: auth.username }); },
      onData(stream, _s, cb) { stream.on('data', () => {}); stream.on('end', () => { mails.push('mail'); cb(); }); },
    });
    await new Promise<void>((r) => smtp.listen(0, '127.0.0.1', r));
    smtpPort = (smtp.server.address() as AddressInfo).port;
  });
  after(async () => {
    await new Promise((r) => hooks.close(r));
    await new Promise<void>((r) => smtp.close(() => r()));
  });

  test('a webhook\'s name and failures carry its origin and index, never its path or query', async () => {
    const c = parseConfig(`vms: []\nalerts:\n  webhooks:\n    - { url: "https://hooks.example.com/x", secretEnv: S }\n    - { url: "${hookOrigin}${HOOK_PATH}?token=q5ecret", secretEnv: S, attempts: 2, retryDelay: 10ms }\n`, 'c.yaml', { host: 'hv1' });
    const channels = await alertChannels(c, { S: 'k' });
    assert.deepEqual(channels.map((ch) => ch.name), ['webhook https://hooks.example.com (alerts.webhooks[0])', `webhook ${hookOrigin} (alerts.webhooks[1])`]);
    const failures: string[] = [];
    assert.equal(await deliver(channels[1]!, ALERT, { onFailure: (n, m) => failures.push(`${channels[1]!.name}: ${n}: ${m}`) }), false);
    assert.equal(failures.length, 2);
    for (const f of failures) {
      assert.match(f, /answered 500/);
      assert.ok(!f.includes('s3cr3tPathToken') && !f.includes('T0123ABCD') && !f.includes('q5ecret'), f);
    }
    assert.equal(webhookChannel(c.alerts!.webhooks[1]!, 'k', { index: 1 }).name, `webhook ${hookOrigin} (alerts.webhooks[1])`);
  });

  const email = (smtpLine: string) => parseConfig(
    `vms: []\nalerts:\n  email: { smtp: { host: 127.0.0.1, port: ${smtpPort}, user: vmvault, passwordEnv: P${smtpLine} }, from: v@example.com, to: [o@example.com], attempts: 3, retryDelay: 10ms }\n`,
    'c.yaml', { host: 'hv1' }).alerts!.email!;

  test('a server without STARTTLS gets no password: delivery fails at once, saying why', async () => {
    const ch = emailChannel(email(''), 'smtp-password-1');
    const failures: string[] = [];
    try {
      assert.equal(await deliver(ch, ALERT, { onFailure: (n, m, final) => failures.push(`${n} ${final} ${m}`) }), false);
    } finally {
      ch.close();
    }
    assert.deepEqual(auths, [], 'no AUTH was sent');
    assert.equal(mails.length, 0);
    assert.equal(failures.length, 1, `not retried: ${failures.join('\n')}`);
    assert.match(failures[0]!, new RegExp(`^1 true 127\\.0\\.0\\.1:${smtpPort} does not offer STARTTLS \\(it answered ".*"\\), and the password is sent over TLS only: use its TLS port with secure: true \\(usually 465\\), or, for a trusted relay only, allowPlaintextAuth: true$`));
  });

  test('allowPlaintextAuth: true sends it anyway (a trusted relay)', async () => {
    const ch = emailChannel(email(', allowPlaintextAuth: true'), 'smtp-password-1');
    try {
      assert.equal(await deliver(ch, ALERT), true);
    } finally {
      ch.close();
    }
    assert.deepEqual(auths, ['vmvault:smtp-password-1']);
    assert.equal(mails.length, 1);
  });
});

/** The alerts: section: defaults, every problem with its line, secrets from files and variables. */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { ConfigFileError, parseConfig } from '../../src/config/load.js';
import { VmvaultError } from '../../src/errors.js';
import { alertChannels } from '../../src/ops/alerts/start.js';
import { signature } from '../../src/ops/alerts/deliver.js';

const base = 'vms: []\n';
const parse = (alerts: string) => parseConfig(`${base}alerts:\n${alerts}`, 'c.yaml', { host: 'hv1' });
function problems(alerts: string): string[] {
  try {
    parse(alerts);
  } catch (err) {
    assert.ok(err instanceof ConfigFileError, String(err));
    return err.message.split('\n');
  }
  return assert.fail('accepted');
}

describe('alerts configuration', () => {
  test('defaults: checks every minute, offline after 2 minutes, every event, 5 attempts from 1 s', () => {
    const c = parse('  webhooks: [{ url: "https://hooks.example.com/x", secretEnv: HOOK_SECRET }]\n  email: { smtp: { host: mail.example.com }, from: a@example.com, to: [b@example.com] }\n');
    assert.equal(c.alerts!.checkEvery, 60_000);
    assert.equal(c.alerts!.offlineAfter, 120_000);
    assert.deepEqual(c.alerts!.webhooks[0]!.events, ['job_failed', 'backup_overdue', 'worker_offline', 'verify_damage', 'backup_unreadable']);
    assert.equal(c.alerts!.webhooks[0]!.attempts, 5);
    assert.equal(c.alerts!.webhooks[0]!.retryDelay, 1000);
    assert.equal(c.alerts!.email!.smtp.port, 587);
    assert.equal(parseConfig(base, 'c.yaml', { host: 'hv1' }).alerts, undefined);
  });

  test('each mistake is reported at its line, with what to do', () => {
    assert.deepEqual(problems('  webhooks: [{ url: "https://h.example.com/x" }]\n'), [
      'c.yaml:3:14: alerts.webhooks[0]: the webhook secret is needed: set secretFile (a file holding it) or secretEnv (an environment variable); it is never written in vmvault.yaml',
    ]);
    const p = problems([
      '  checkEvery: 10 minutes',
      '  webhooks:',
      '    - { url: "ftp://h/x", secretFile: /s, events: [job_failed, disk_full] }',
      '    - { url: "https://h/y", secretFile: /s, secretEnv: S }',
      '  email: { smtp: { host: m, user: u }, from: a@b.c, to: [not-an-address] }',
      '  sms: yes',
      '',
    ].join('\n'));
    assert.ok(p.some((l) => /^c\.yaml:3:15: alerts\.checkEvery: expected a check interval: a whole number with ms, s, m or h/.test(l)), p.join('\n'));
    assert.ok(p.some((l) => /alerts\.webhooks\[0\]\.url: expected an http:\/\/ or https:\/\/ URL/.test(l)), p.join('\n'));
    assert.ok(p.some((l) => /alerts\.webhooks\[1\]\.secretEnv: the webhook secret comes from secretFile or secretEnv, not both/.test(l)), p.join('\n'));
    assert.ok(p.some((l) => /alerts\.webhooks\[0\]\.events\[1\]: expected an event: job_failed, backup_overdue, worker_offline, verify_damage/.test(l)), p.join('\n'));
    assert.ok(p.some((l) => /alerts\.email\.smtp: user "u" needs a password/.test(l)), p.join('\n'));
    assert.ok(p.some((l) => /alerts\.email\.to\[0\]: expected an e-mail address/.test(l)), p.join('\n'));
    assert.ok(p.some((l) => /^c\.yaml:8:3: alerts\.sms: unknown key/.test(l)), p.join('\n'));
  });

  test('secrets come from their file or variable; a missing one stops the start with the reason, never the value', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vmvault-alerts-cfg-'));
    try {
      const file = join(dir, 'secret');
      await writeFile(file, 'file-secret\n');
      const c = parse(`  webhooks: [{ url: "http://127.0.0.1:9/x", secretFile: ${JSON.stringify(file)} }, { url: "http://127.0.0.1:9/y", secretEnv: HOOK_SECRET }]\n`);
      const channels = await alertChannels(c, { HOOK_SECRET: 'env-secret' });
      assert.deepEqual(channels.map((ch) => ch.name), ['webhook http://127.0.0.1:9 (alerts.webhooks[0])', 'webhook http://127.0.0.1:9 (alerts.webhooks[1])']);
      await assert.rejects(alertChannels(c, {}), (err: unknown) => err instanceof VmvaultError && err.code === 'BAD_INPUT' &&
        err.message === 'the secret of alerts.webhooks[1] is to come from the environment variable HOOK_SECRET, which is not set');
      const gone = parse(`  webhooks: [{ url: "http://127.0.0.1:9/x", secretFile: ${JSON.stringify(join(dir, 'nope'))} }]\n`);
      await assert.rejects(alertChannels(gone, {}), /cannot read the secret of alerts\.webhooks\[0\] from .*nope: ENOENT/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('STARTTLS is required with a password unless allowPlaintextAuth opts out; requireTLS: false alone is refused', () => {
    const smtp = (s: string) => parse(`  email: { smtp: { host: m.example.com, ${s} }, from: a@example.com, to: [b@example.com] }\n`).alerts!.email!.smtp;
    assert.equal(smtp('user: u, passwordEnv: P').requireTLS, true);
    assert.equal(smtp('user: u, passwordEnv: P, allowPlaintextAuth: true').requireTLS, false);
    assert.equal(smtp('user: u, passwordEnv: P, allowPlaintextAuth: true, requireTLS: false').requireTLS, false);
    assert.equal(smtp('port: 465, secure: true, user: u, passwordEnv: P').requireTLS, true);
    assert.equal(smtp('port: 25').requireTLS, false, 'no password, nothing to protect: STARTTLS when offered');
    assert.equal(smtp('port: 25, requireTLS: true').requireTLS, true);
    const p = problems('  email: { smtp: { host: m, user: u, passwordEnv: P, requireTLS: false }, from: a@b.c, to: [x@y.z] }\n');
    assert.ok(p.some((l) => /alerts\.email\.smtp\.requireTLS: requireTLS: false would send the SMTP password in cleartext .*allowPlaintextAuth: true/.test(l)), p.join('\n'));
  });

  test('the signature is HMAC-SHA-256 of "timestamp.body", as documented', () => {
    // printf %s '1700000000.{"a":1}' | openssl dgst -sha256 -hmac key
    assert.equal(signature('key', 1700000000, '{"a":1}'), 'sha256=a438e398bfafc57e4396bb7fc2304422f0f768e965d073ca313cb52e22e6ad03');
  });
});

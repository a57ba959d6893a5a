/**
 * External programs get none of vmvault's secrets: the filter itself, then fake
 * qemu-img, qemu-system-x86_64 (a drill), virsh and redis-server early in PATH that
 * write down their environment, and a real qemu-nbd's /proc/PID/environ. Each sees
 * PATH and the locale, and no VMVAULT_*, AWS_*, secret-looking name, URL with a
 * password, or variable the configuration names as a secret's source.
 */
import assert from 'node:assert/strict';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseConfig } from '../src/config/load.js';
import { createImage, exportImage } from '../src/disk/qemu.js';
import { runTool } from '../src/disk/qemu-run.js';
import { startEmbeddedRedis } from '../src/queue/embedded-redis.js';
import { isSecretEnv, toolEnv } from '../src/tool-env.js';
import { runDrill } from '../src/vm/drill-run.js';
import { virsh } from '../src/vm/virsh.js';
import { tempDir, type TempDir } from './helpers/images.js';

const SECRETS: Record<string, string> = {
  VMVAULT_PASSWORD: 'repo-passphrase-1',
  VMVAULT_REDIS_PASSWORD: 'redis-password-2',
  AWS_SECRET_ACCESS_KEY: 'aws-secret-3',
  AWS_ACCESS_KEY_ID: 'aws-id-4',
  GITHUB_TOKEN: 'gh-token-5',
  SMTP_PASS: 'smtp-pass-6',
  DEPLOY_PRIVATE_KEY: 'private-7',
  CACHE_URL: 'redis://:url-password-8@cache:6379',
  // Named by the configuration below only: no pattern would catch them.
  HOOK_SIG: 'webhook-secret-9',
  MAILER_PW: 'smtp-password-10',
  BACKUP_PHRASE: 'repo-passphrase-11',
};
const KEPT: Record<string, string> = {
  LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8', XDG_RUNTIME_DIR: '/run/user/0', LIBVIRT_DEFAULT_URI: 'qemu:///system',
  SSH_AUTH_SOCK: '/tmp/agent.sock', HTTP_PROXY: 'http://proxy:3128', KEYBOARD_LAYOUT: 'us',
};
const CONFIG = `
repository: { url: /srv/repo, passwordEnv: BACKUP_PHRASE }
vms: []
alerts:
  webhooks: [{ url: "https://hooks.example.com/x", secretEnv: HOOK_SIG }]
  email: { smtp: { host: mail.example.com, user: u, passwordEnv: MAILER_PW }, from: a@example.com, to: [b@example.com] }
`;
const TOOLS = ['qemu-img', 'qemu-system-x86_64', 'virsh', 'redis-server'];

function assertClean(env: Record<string, string>, what: string): void {
  for (const [k, v] of Object.entries(SECRETS)) {
    assert.ok(!(k in env), `${what} was given ${k}`);
    assert.ok(!Object.values(env).some((x) => x.includes(v)), `${what} was given the value of ${k}`);
  }
  for (const [k, v] of Object.entries(KEPT)) assert.equal(env[k], v, `${what} keeps ${k}`);
  assert.ok(env.PATH?.includes('/usr/bin'), `${what} keeps PATH`);
}

const parseEnv = (text: string, sep: string): Record<string, string> =>
  Object.fromEntries(text.split(sep).filter(Boolean).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));

describe('the environment of external programs', () => {
  let dir: TempDir;
  let saved: NodeJS.ProcessEnv;
  before(async () => {
    dir = await tempDir('vv-toolenv-');
    saved = { ...process.env };
    parseConfig(CONFIG, join(dir.path, 'vmvault.yaml'));
    for (const tool of TOOLS) {
      const fake = join(dir.path, tool);
      // qemu-img succeeds (a drill creates its overlays with it before starting QEMU); the others fail at once.
      await writeFile(fake, `#!/bin/sh\nenv -0 > ${JSON.stringify(join(dir.path, `${tool}.env`))}\nexit ${tool === 'qemu-img' ? 0 : 1}\n`);
      await chmod(fake, 0o755);
    }
    Object.assign(process.env, SECRETS, KEPT);
  });
  after(async () => {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
    await dir.cleanup();
  });

  test('the filter: secrets by prefix, name, URL password and configuration; the rest kept', () => {
    const env = toolEnv({ ...SECRETS, ...KEPT, PATH: '/usr/bin:/bin' });
    assertClean(env, 'toolEnv');
    assert.equal(isSecretEnv('KEYBOARD', 'x'), false);
    assert.equal(isSecretEnv('S3_ACCESS_KEY', 'x'), true);
  });

  test('qemu-img, a drill\'s qemu-system-x86_64, virsh and redis-server started with the fakes first in PATH', async () => {
    const realPath = process.env.PATH;
    process.env.PATH = `${dir.path}:${realPath}`;
    try {
      assert.equal((await runTool('qemu-img', ['--version'])).exitCode, 0);
      await runDrill({
        disks: [{ uri: 'nbd+unix:///d?socket=/nonexistent', size: 1 << 20 }], probe: { kind: 'serial', text: 'login:' }, timeoutMs: 5000,
        workDir: dir.path, serialLog: join(dir.path, 'serial.log'), screenshot: join(dir.path, 'shot.ppm'),
      }).catch(() => undefined);
      await assert.rejects(virsh(['domstate', 'x'], 'x'));
      await assert.rejects(startEmbeddedRedis({ dir: join(dir.path, 'redis'), startTimeoutMs: 2000 }));
    } finally {
      process.env.PATH = realPath;
    }
    for (const tool of TOOLS) assertClean(parseEnv(await readFile(join(dir.path, `${tool}.env`), 'utf8'), '\0'), tool);
  });

  test('a real qemu-nbd (through setpriv where it is installed): /proc/PID/environ holds no secret', async () => {
    const image = join(dir.path, 'disk.raw');
    await createImage(image, 'raw', 1 << 20);
    const exp = await exportImage(image, { format: 'raw', readOnly: true });
    try {
      assertClean(parseEnv(await readFile(`/proc/${exp.pid}/environ`, 'utf8'), '\0'), 'qemu-nbd');
    } finally {
      await exp.close();
    }
  });
});

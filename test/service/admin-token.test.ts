/**
 * The admin token of a starting service is kept and shown only once the service has
 * started: a start that fails leaves no hash of a token nobody saw, and the next start
 * makes and shows one.
 *
 * What `up` and `serve` show of their secrets: a new admin token on a terminal only;
 * elsewhere (a journal, a container log) it goes to STATE_DIR/admin-token (0600) and
 * only its path is printed. The join command names the Redis password only for a
 * terminal, else the password's file, which `worker --redis-password-file` reads.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseConfig } from '../../src/config/load.js';
import { adminTokenForStart, createAdminToken, type Teller } from '../../src/service/admin-token.js';
import { defaultConfig } from '../../src/service/service.js';
import { joinCommand, joinUrlWithPassword, readRedisPasswordFile } from '../../src/service/join.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const config = (stateDir: string) => parseConfig(`stateDir: ${JSON.stringify(stateDir)}\nvms: []\n`, 'test.yaml');
const sha = (s: string) => createHash('sha256').update(s).digest('hex');

/** A start that gets as far as announcing: the hash the API accepts. */
async function start(cfg: ReturnType<typeof config>, stateDir: string, tell: Teller): Promise<string | undefined> {
  const t = await adminTokenForStart(cfg, stateDir);
  await t.announce(tell);
  return t.hash;
}

test('a new admin token is stored and shown by announce only; a later start names the stored one', async () => {
  const dir = await tempDir('vv-admin-token-');
  try {
    const cfg = defaultConfig(dir.path);
    // A start that fails before announcing: nothing kept, nothing said.
    const failed = await adminTokenForStart(cfg, dir.path);
    assert.match(failed.hash ?? '', /^[0-9a-f]{64}$/);
    assert.deepEqual(await readdir(dir.path), []);

    const started = await adminTokenForStart(cfg, dir.path);
    assert.notEqual(started.hash, failed.hash, 'a new token');
    const said: string[] = [];
    await started.announce({ say: (l) => said.push(l), terminal: true });
    const token = /admin token: (\S+)/.exec(said.join('\n'))?.[1] ?? '';
    assert.equal(sha(token), started.hash);
    assert.equal((await readFile(`${dir.path}/admin-token.sha256`, 'utf8')).trim(), started.hash);

    const again = await adminTokenForStart(cfg, dir.path);
    assert.equal(again.hash, started.hash);
    said.length = 0;
    await again.announce({ say: (l) => said.push(l), terminal: true });
    assert.doesNotMatch(said.join('\n'), /admin token: /);
    assert.match(said.join('\n'), /SHA-256 is in .*admin-token\.sha256/);
  } finally {
    await dir.cleanup();
  }
});

describe('admin token and join command off a terminal', () => {
  let dir: TempDir;
  before(async () => { dir = await tempDir('vv-admintok-'); });
  after(async () => dir.cleanup());

  test('on a terminal the new token is shown once and no file holds it', async () => {
    const stateDir = join(dir.path, 'tty');
    const lines: string[] = [];
    const hash = await start(config(stateDir), stateDir, { say: (l) => lines.push(l), terminal: true });
    const token = /admin token: (vv_\S+)/.exec(lines.join('\n'))?.[1];
    assert.ok(token, lines.join('\n'));
    assert.equal(hash, sha(token));
    assert.ok(!existsSync(join(stateDir, 'admin-token')));
  });

  test('off a terminal the token is written to a 0600 file and only its path is printed; a later start points at the file left', async () => {
    const stateDir = join(dir.path, 'journal');
    const lines: string[] = [];
    const hash = await start(config(stateDir), stateDir, { say: (l) => lines.push(l), terminal: false });
    const file = join(stateDir, 'admin-token');
    assert.equal((await stat(file)).mode & 0o777, 0o600);
    const token = (await readFile(file, 'utf8')).trim();
    assert.equal(hash, sha(token));
    const out = lines.join('\n');
    assert.ok(!out.includes(token), out);
    assert.match(out, new RegExp(`it is in ${file} \\(mode 0600\\).*\n.*read it .*and delete the file`));

    const again: string[] = [];
    assert.equal(await start(config(stateDir), stateDir, { say: (l) => again.push(l), terminal: false }), hash);
    assert.match(again.join('\n'), new RegExp(`${file} still holds the admin API token; delete it once read`));
    assert.ok(!again.join('\n').includes(token));
  });

  test('token create removes a token file left by an earlier start: it holds a token no longer accepted', async () => {
    const stateDir = join(dir.path, 'journal');
    const fresh = await createAdminToken(stateDir);
    assert.ok(!existsSync(join(stateDir, 'admin-token')));
    assert.equal((await readFile(join(stateDir, 'admin-token.sha256'), 'utf8')).trim(), sha(fresh));
  });

  test('the join command gives the password in the environment for a terminal, else names its file', async () => {
    const base = { redisUrl: 'redis://up-host:6390', repoUrl: '/var/lib/vmvault/repository', passphraseFile: '/var/lib/vmvault/passphrase' };
    assert.equal(joinCommand({ ...base, password: 'p4ssw0rd-0123456789' }),
      'VMVAULT_REDIS_PASSWORD=p4ssw0rd-0123456789 vmvault --repo /var/lib/vmvault/repository --password-file /var/lib/vmvault/passphrase worker --join redis://up-host:6390');
    assert.equal(joinCommand({ ...base, passwordFile: '/var/lib/vm vault/redis.password' }),
      "vmvault --repo /var/lib/vmvault/repository --password-file /var/lib/vmvault/passphrase worker --join redis://up-host:6390 --redis-password-file '/var/lib/vm vault/redis.password'");
  });

  test('--redis-password-file: its first line is the password, before VMVAULT_REDIS_PASSWORD; a missing or empty file is refused', async () => {
    const file = join(dir.path, 'redis.password');
    await writeFile(file, 'from-the-file_0123\n', { mode: 0o600 });
    const password = await readRedisPasswordFile(file);
    assert.equal(password, 'from-the-file_0123');
    assert.equal(joinUrlWithPassword('redis://h:6390', { VMVAULT_REDIS_PASSWORD: 'from-env' }, password), 'redis://:from-the-file_0123@h:6390');
    assert.equal(joinUrlWithPassword('redis://h:6390', { VMVAULT_REDIS_PASSWORD: 'from-env' }), 'redis://:from-env@h:6390');
    await assert.rejects(readRedisPasswordFile(join(dir.path, 'none')), /--redis-password-file .*none: .*copy the file redis\.password of up's state directory/);
    await writeFile(join(dir.path, 'empty'), '\n');
    await assert.rejects(readRedisPasswordFile(join(dir.path, 'empty')), /is empty/);
  });
});

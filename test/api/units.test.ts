/** Pure parts of the API: Range parsing, signed links, tokens, restore directory checks. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { checkRestoreDirectory, headerSafeName, qemuImgCommand, redact } from '../../src/api/app.js';
import { TokenTable, allows } from '../../src/api/auth.js';
import { Limiter } from '../../src/api/bounded.js';
import { PromiseLru } from '../../src/pipeline/lru.js';
import { ApiError, toApiError } from '../../src/api/errors.js';
import { linkKey, presentedToken, signLink, splitToken, verifyLink } from '../../src/api/links.js';
import { parseRange } from '../../src/api/range.js';
import { assertInsideRoots } from '../../src/pipeline/restore.js';
import { tempDir } from '../helpers/images.js';

describe('Range header', () => {
  test('single ranges, suffixes, open ends; unsatisfiable and ignored forms', () => {
    assert.deepEqual(parseRange('bytes=0-99', 1000), { start: 0, end: 99 });
    assert.deepEqual(parseRange('bytes=900-', 1000), { start: 900, end: 999 });
    assert.deepEqual(parseRange('bytes=-100', 1000), { start: 900, end: 999 });
    assert.deepEqual(parseRange('bytes=-5000', 1000), { start: 0, end: 999 });
    assert.deepEqual(parseRange('bytes=990-5000', 1000), { start: 990, end: 999 });
    assert.equal(parseRange('bytes=1000-', 1000), 'unsatisfiable');
    assert.equal(parseRange('bytes=-0', 1000), 'unsatisfiable');
    assert.equal(parseRange(undefined, 1000), undefined);
    assert.equal(parseRange('bytes=5-3', 1000), undefined);
    assert.equal(parseRange('bytes=0-1,5-6', 1000), undefined);
    assert.equal(parseRange('items=0-1', 1000), undefined);
    assert.equal(parseRange('bytes=-', 1000), undefined);
  });
});

describe('signed links', () => {
  const key = linkKey(new Uint8Array(32).fill(7));
  const claims = { backup: 'ab'.repeat(32), disk: 'root', expires: 2000 };
  test('round trip, expiry, and any altered byte refused', () => {
    const t = signLink(key, claims);
    assert.deepEqual(verifyLink(key, t, 1999), claims);
    assert.throws(() => verifyLink(key, t, 2000), (e: unknown) => e instanceof ApiError && e.status === 403 && /expired/.test(e.message));
    for (let i = 0; i < t.length; i += 7) {
      if (t[i] === '.') continue;
      const bad = t.slice(0, i) + (t[i] === 'A' ? 'B' : 'A') + t.slice(i + 1);
      assert.throws(() => verifyLink(key, bad, 1000), (e: unknown) => e instanceof ApiError && e.status === 403, `position ${i}`);
    }
    assert.throws(() => verifyLink(linkKey(new Uint8Array(32).fill(8)), t, 1000), /signature/);
    assert.throws(() => verifyLink(key, 'nonsense', 1000), /not a valid signed link/);
    // The signature in a cookie: the path's payload and the cookie's MAC make the token; a path with its own signature keeps it.
    const { payload, mac } = splitToken(t);
    assert.equal(`${payload}.${mac}`, t);
    assert.deepEqual(verifyLink(key, presentedToken(payload, ` ${mac} `), 1000), claims);
    assert.equal(presentedToken(t, 'A'.repeat(43)), t);
    assert.throws(() => verifyLink(key, presentedToken(payload, undefined), 1000), /this link has no signature/);
  });
});

describe('bearer tokens', () => {
  const sha = (s: string) => createHash('sha256').update(s).digest('hex');
  const table = new TokenTable([{ name: 'ci', role: 'operator', sha256: sha('secret-1') }, { name: 'dash', role: 'viewer', sha256: sha('secret-2') }]);
  test('known tokens map to their owner; anything else to nobody', () => {
    assert.deepEqual(table.authenticate('Bearer secret-1'), { name: 'ci', role: 'operator' });
    assert.deepEqual(table.authenticate('bearer  secret-2'), { name: 'dash', role: 'viewer' });
    for (const h of [undefined, '', 'Bearer', 'Bearer secret-3', 'Basic secret-1', 'Bearer secret-1 extra', 'Bearer secret-1\n']) {
      assert.equal(table.authenticate(h), undefined, String(h));
    }
  });
  test('roles are ordered', () => {
    assert.ok(allows('admin', 'operator') && allows('operator', 'viewer') && allows('viewer', 'viewer'));
    assert.ok(!allows('viewer', 'operator') && !allows('operator', 'admin'));
  });
});

describe('restore directories', () => {
  test('the API refuses anything but a clean absolute path inside the host\'s roots', () => {
    const roots = ['/srv/restore'];
    checkRestoreDirectory('/srv/restore', roots, 'b');
    checkRestoreDirectory('/srv/restore/web/1', roots, 'b');
    for (const d of ['/srv/restore/../etc', '/srv/restore/./x', '/srv/restore//x', '/srv/restore/x/', 'srv/restore', '/srv/restored', '/etc', '/srv/restore/x\0y']) {
      assert.throws(() => checkRestoreDirectory(d, roots, 'b'), (e: unknown) => e instanceof ApiError && e.status === 400, d);
    }
    assert.throws(() => checkRestoreDirectory('/srv/restore/x', [], 'b'), /no restoreRoots/);
  });

  test('the worker resolves symlinks before it writes', async () => {
    const dir = await tempDir();
    try {
      const root = join(dir.path, 'root');
      const outside = join(dir.path, 'outside');
      await mkdir(root);
      await mkdir(outside);
      await symlink(outside, join(root, 'link'));
      await symlink(root, join(dir.path, 'root-alias'));
      await assertInsideRoots(join(root, 'new', 'deeper'), [root]);
      await assertInsideRoots(join(dir.path, 'root-alias', 'x'), [root]);
      await assert.rejects(assertInsideRoots(join(root, 'link', 'x'), [root]), /resolves to .*outside/);
      await assert.rejects(assertInsideRoots(join(root, '..', 'outside'), [root]), /outside/);
    } finally {
      await dir.cleanup();
    }
  });
});

describe('secrets and errors', () => {
  test('a link token is redacted from logged paths, however the path is spelled', () => {
    for (const p of ['/v1/links/SECRET', '//v1/links/SECRET', '/V1/links/SECRET', '/v1/LINKS/SECRET/x', '/v1//links/SECRET']) {
      assert.ok(!redact(p).includes('SECRET'), p);
    }
    assert.equal(redact('/v1/links/abc.def'), '/v1/links/(redacted)');
    assert.equal(redact('/v1/vms/web'), '/v1/vms/web');
  });

  test('only a lost Redis connection is reported as Redis being down; a missing file is an internal error', () => {
    const fsErr = Object.assign(new Error("ENOENT: no such file or directory, scandir '/etc/vmvault/policies'"), { code: 'ENOENT' });
    const e = toApiError(fsErr);
    assert.equal(e.status, 500);
    assert.ok(!e.message.includes('/etc/vmvault'), e.message);
    for (const m of ['connect ECONNREFUSED 127.0.0.1:6379', 'connect ENOENT /run/redis.sock', 'Connection is closed.',
      'Reached the max retries per request limit (which is 3). Refer to "maxRetriesPerRequest" option for details.']) {
      assert.equal(toApiError(new Error(m)).status, 503, m);
    }
  });

  test('disk names in headers keep to safe characters', () => {
    assert.equal(headerSafeName('root'), 'root');
    const command = qemuImgCommand('https://h/v1/links/p', 'vmvault_link=m', '-rf *');
    assert.ok(command.includes("trap 'rm -f ./-rf__.link' EXIT; printf '%s' 'vmvault_link=m' > ./-rf__.link") && command.endsWith(`"cookie-secret":"vmvault-link"}}' ./-rf__.qcow2)`), command);
    assert.ok(command.includes('"driver":"https","url":"https://h/v1/links/p"'), 'the curl driver of the link\'s scheme');
    assert.equal(headerSafeName('a"b\u20acc d'), 'a_b_c_d');
    assert.doesNotThrow(() => new Headers({ 'content-disposition': `attachment; filename="${headerSafeName('\u20ac"\r\n')}.raw"` }));
  });
});

describe('bounds on concurrent requests', () => {
  test('a Limiter runs at most max at once and every task in turn', async () => {
    const limiter = new Limiter(3);
    let running = 0;
    let peak = 0;
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => limiter.run(async () => {
      running++;
      peak = Math.max(peak, running);
      await new Promise((r) => setTimeout(r, 1 + (i % 3)));
      running--;
      if (i === 5) throw new Error('task 5 fails');
      return i;
    }).catch(() => -1)));
    assert.equal(peak, 3);
    assert.equal(results.filter((r) => r === -1).length, 1);
    assert.equal(running, 0);
    assert.equal(await limiter.run(async () => 'free again'), 'free again');
  });

  test('a slot given back twice frees one slot, not two', async () => {
    const limiter = new Limiter(1);
    const first = await limiter.acquire();
    let second: (() => void) | undefined;
    const waiting = limiter.acquire().then((r) => { second = r; });
    const third = limiter.acquire();
    first();
    first();
    await waiting;
    let thirdGot = false;
    void third.then(() => { thirdGot = true; });
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(thirdGot, false, 'the third waits for the second');
    second!();
    (await third)();
  });

  test('a PromiseLru shares one load per key, keeps the most recent, forgets failures', async () => {
    const lru = new PromiseLru<string>(2);
    let loads = 0;
    const load = (v: string) => async () => { loads++; return v; };
    assert.deepEqual(await Promise.all([lru.get('a', load('A')), lru.get('a', load('A'))]), ['A', 'A']);
    assert.equal(loads, 1);
    await lru.get('b', load('B'));
    await lru.get('a', load('A')); // a is now the most recent
    await lru.get('c', load('C')); // evicts b
    assert.equal(loads, 3);
    await lru.get('a', load('A'));
    await lru.get('b', load('B'));
    assert.equal(loads, 4);
    await assert.rejects(lru.get('x', () => Promise.reject(new Error('gone'))));
    await new Promise((r) => setImmediate(r));
    assert.equal(await lru.get('x', load('X')), 'X');
  });
});

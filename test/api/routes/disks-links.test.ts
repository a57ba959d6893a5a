/** Disk images of a backup in-process: with a token, through signed links, ranges, expiry. */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { expectedContent } from '../../helpers/images.js';
import { assertError, backupWeb, startFixture, WEB_WRITES, type Fixture } from './fixture.js';

const MiB = 1024 * 1024;
let f: Fixture;
let id: string;
before(async () => {
  f = await startFixture({ workers: true });
  id = await backupWeb(f);
});
after(async () => { await f?.close(); });

describe('/v1/backups/{id}/disks/{disk}', () => {
  test('the whole raw disk, a range, HEAD, and a range past the end', async () => {
    const whole = await f.call('GET', `/v1/backups/${id}/disks/root`, { role: 'operator' });
    assert.equal(whole.status, 200);
    assert.ok(Buffer.compare(whole.body, expectedContent(WEB_WRITES, 0, 8 * MiB)) === 0, 'the raw disk is the image\'s content');
    assert.equal(whole.headers.get('accept-ranges'), 'bytes');
    const part = await f.call('GET', `/v1/backups/${id}/disks/root`, { role: 'operator', headers: { range: `bytes=${MiB - 2}-${MiB + 1}` } });
    assert.equal(part.status, 206);
    assert.deepEqual([...part.body], [0x5a, 0x5a, 0, 0]);
    assert.equal(part.headers.get('content-range'), `bytes ${MiB - 2}-${MiB + 1}/${8 * MiB}`);
    const head = await f.call('HEAD', `/v1/backups/${id}/disks/root`, { role: 'operator' });
    assert.deepEqual([head.status, head.headers.get('content-length')], [200, String(8 * MiB)]);
    const past = await f.call('GET', `/v1/backups/${id}/disks/root`, { role: 'operator', headers: { range: `bytes=${8 * MiB}-` } });
    assertError(past, 416, 'RANGE_NOT_SATISFIABLE');
    assert.equal(past.headers.get('content-range'), `bytes */${8 * MiB}`);
  });

  test('an unknown disk or backup is 404', async () => {
    assertError(await f.call('GET', `/v1/backups/${id}/disks/data`, { role: 'operator' }), 404, 'NOT_FOUND', /has no disk "data"; its disks are: root/);
    assertError(await f.call('GET', `/v1/backups/${'f'.repeat(64)}/disks/root`, { role: 'operator' }), 404, 'NOT_FOUND');
    assertError(await f.call('POST', `/v1/backups/${id}/disks/data/links`, { role: 'operator', body: {} }), 404, 'NOT_FOUND', /has no disk "data"/);
  });

  test('a signed link serves the disk without a token, until it expires; an altered one is refused', async () => {
    const r = await f.call('POST', `/v1/backups/${id}/disks/root/links`, { role: 'operator', body: { expiresIn: 60 } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const path = new URL(r.body.url).pathname;
    const [payload, mac] = path.slice('/v1/links/'.length).split('.') as [string, string];
    assert.equal(r.body.cookieUrl, `http://localhost/v1/links/${payload}`);
    assert.equal(r.body.cookie, `vmvault_link=${mac}`);
    assert.equal(r.body.command, "(umask 077; trap 'rm -f root.link' EXIT; printf '%s' 'vmvault_link=" + mac + "' > root.link && qemu-img convert -p -m 1 " +
      `--object secret,id=vmvault-link,file=root.link -O qcow2 'json:{"driver":"raw","file":{"driver":"http","url":"http://localhost/v1/links/${payload}","cookie-secret":"vmvault-link"}}' root.qcow2)`);
    // The signature in a cookie instead of the path: served; missing or wrong, refused.
    const viaCookie = await f.call('GET', `/v1/links/${payload}`, { headers: { range: 'bytes=0-3', cookie: `other=1; ${r.body.cookie}` } });
    assert.equal(viaCookie.status, 206);
    assert.deepEqual([...viaCookie.body], [0x5a, 0x5a, 0x5a, 0x5a]);
    assertError(await f.call('GET', `/v1/links/${payload}`), 403, 'FORBIDDEN', /this link has no signature: give it in the path \(…\/links\/PAYLOAD\.MAC\) or in a vmvault_link=MAC cookie/);
    const wrongMac = mac.slice(0, -2) + (mac.endsWith('AA') ? 'BB' : 'AA');
    assertError(await f.call('GET', `/v1/links/${payload}`, { headers: { cookie: `vmvault_link=${wrongMac}` } }), 403, 'FORBIDDEN', /signature does not match/);
    // A path that carries its own signature is judged by it, whatever the cookie says.
    assertError(await f.call('GET', `/v1/links/${payload}.${wrongMac}`, { headers: { cookie: r.body.cookie } }), 403, 'FORBIDDEN', /signature does not match/);
    assert.equal(Date.parse(r.body.expiresAt), (Math.floor(f.clock.now) + 60) * 1000);
    const got = await f.call('GET', path, { headers: { range: 'bytes=0-3' } });
    assert.equal(got.status, 206);
    assert.deepEqual([...got.body], [0x5a, 0x5a, 0x5a, 0x5a]);
    const altered = path.slice(0, -2) + (path.endsWith('AA') ? 'BB' : 'AA');
    assertError(await f.call('GET', altered), 403, 'FORBIDDEN', /signature does not match/);
    assertError(await f.call('GET', '/v1/links/garbage'), 403, 'FORBIDDEN', /not a valid signed link/);
    f.clock.now += 61;
    assertError(await f.call('GET', path), 403, 'FORBIDDEN', /this link expired at/);
    // Without a body: the default lifetime (15 minutes).
    const plain = await f.call('POST', `/v1/backups/${id}/disks/root/links`, { role: 'operator' });
    assert.equal(Date.parse(plain.body.expiresAt), (Math.floor(f.clock.now) + 900) * 1000);
  });

  test('refuses a lifetime over a day and unknown fields', async () => {
    assertError(await f.call('POST', `/v1/backups/${id}/disks/root/links`, { role: 'operator', body: { expiresIn: 86_401 } }), 400, 'BAD_REQUEST', /expiresIn/);
    assertError(await f.call('POST', `/v1/backups/${id}/disks/root/links`, { role: 'operator', body: { ttl: 5 } }), 400, 'BAD_REQUEST', /ttl/);
  });
});

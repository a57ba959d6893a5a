/** /v1/vms/{vm}/snapshots in-process, with a real host worker on a real qcow2 image. */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { snapshotList } from '../../../src/disk/qemu.js';
import { assertError, startFixture, type Fixture } from './fixture.js';

let f: Fixture;
before(async () => { f = await startFixture({ workers: true }); });
after(async () => { await f?.close(); });

async function done(r: { status: number; body: any }): Promise<any> {
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const job = await f.finished(r.body.job.id);
  assert.equal(job.state, 'completed', job.error);
  return job;
}

describe('/v1/vms/{vm}/snapshots', () => {
  test('create (label, expiry), list, revert and delete, each through the host worker', async () => {
    await done(await f.call('POST', '/v1/vms/web/snapshots', { role: 'operator', body: { name: 'before-upgrade', label: 'pre-update', expireIn: '7d' } }));
    assert.deepEqual((await snapshotList(f.webDisk)).map((s) => s.name), ['before-upgrade']);
    const list = await f.call('GET', '/v1/vms/web/snapshots', { role: 'viewer' });
    assert.equal(list.status, 200, JSON.stringify(list.body));
    assert.equal(list.body.items.length, 1);
    const s = list.body.items[0];
    assert.deepEqual([s.name, s.label, s.vm, s.disks], ['before-upgrade', 'pre-update', 'web', ['root']]);
    const days = (Date.parse(s.expiresAt) - Date.parse(s.created)) / 86_400_000;
    assert.ok(Math.abs(days - 7) < 0.01, `expires 7 days after creation, not ${days}`);
    await done(await f.call('POST', '/v1/vms/web/snapshots/before-upgrade/revert', { role: 'operator' }));
    await done(await f.call('DELETE', '/v1/vms/web/snapshots/before-upgrade', { role: 'operator' }));
    assert.deepEqual(await snapshotList(f.webDisk), []);
    const after = await f.call('GET', '/v1/vms/web/snapshots', { role: 'viewer' });
    assert.deepEqual(after.body.items, [], 'a change through the API is never answered by an older list');
  });

  test('reverting or deleting a snapshot that does not exist fails its job with the reason', async () => {
    const r = await f.call('POST', '/v1/vms/web/snapshots/never-taken/revert', { role: 'operator' });
    assert.equal(r.status, 202);
    const job = await f.finished(r.body.job.id);
    assert.equal(job.state, 'failed');
    assert.match(job.error, /never-taken/);
  });

  test('refuses bad input before any job: names, expiries, unknown fields, missing name', async () => {
    const post = (body: unknown) => f.call('POST', '/v1/vms/web/snapshots', { role: 'operator', body });
    assertError(await post({ name: '../etc' }), 400, 'BAD_INPUT', /snapshot name/);
    assertError(await post({ name: 's1', expireIn: 'soon' }), 400, 'BAD_REQUEST', /expireIn: a duration such as 7d/);
    assertError(await post({ name: 's1', expireIn: '3fortnights' }), 400, 'BAD_INPUT', /expireIn/);
    assertError(await post({ name: 's1', colour: 'red' }), 400, 'BAD_REQUEST', /colour/);
    assertError(await post({}), 400, 'BAD_REQUEST', /name/);
    assertError(await f.call('POST', '/v1/vms/web/snapshots/a%20b/revert', { role: 'operator' }), 400, 'BAD_INPUT', /snapshot name/);
  });

  test('an unknown VM is 404 for every snapshot route', async () => {
    assertError(await f.call('POST', '/v1/vms/nope/snapshots', { role: 'operator', body: { name: 's1' } }), 404, 'NOT_FOUND', /VM "nope"/);
    assertError(await f.call('GET', '/v1/vms/nope/snapshots', { role: 'viewer' }), 404, 'NOT_FOUND', /VM "nope"/);
    assertError(await f.call('POST', '/v1/vms/nope/snapshots/s1/revert', { role: 'operator' }), 404, 'NOT_FOUND');
    assertError(await f.call('DELETE', '/v1/vms/nope/snapshots/s1', { role: 'operator' }), 404, 'NOT_FOUND');
  });
});

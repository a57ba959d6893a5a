/** /v1/vms in-process, with a real host worker: the inventory, a VM's detail, on-demand backups. */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { assertError, backupWeb, listedBackups, startFixture, type Fixture } from './fixture.js';

let f: Fixture;
before(async () => { f = await startFixture({ workers: true }); });
after(async () => { await f?.close(); });

describe('/v1/vms', () => {
  test('lists the inventory in pages', async () => {
    const all = await f.call('GET', '/v1/vms', { role: 'viewer' });
    assert.equal(all.status, 200);
    assert.deepEqual(all.body.items.map((v: any) => v.name), ['web', 'db', 'gone']);
    assert.deepEqual(all.body.items[0].disks, [{ name: 'root', path: f.webDisk, format: 'qcow2' }]);
    assert.equal(all.body.nextCursor, null);
    const first = await f.call('GET', '/v1/vms?limit=2', { role: 'viewer' });
    assert.deepEqual([first.body.items.length, first.body.nextCursor], [2, '2']);
    const second = await f.call('GET', '/v1/vms?limit=2&cursor=2', { role: 'viewer' });
    assert.deepEqual([second.body.items.map((v: any) => v.name), second.body.nextCursor], [['gone'], null]);
  });

  test('refuses a bad page query', async () => {
    assertError(await f.call('GET', '/v1/vms?limit=0', { role: 'viewer' }), 400, 'BAD_REQUEST', /limit/);
    assertError(await f.call('GET', '/v1/vms?cursor=abc', { role: 'viewer' }), 400, 'BAD_REQUEST', /cursor: a cursor returned as nextCursor/);
  });

  test('an unknown VM is 404 naming the known ones, for its detail and its backups', async () => {
    assertError(await f.call('GET', '/v1/vms/nope', { role: 'viewer' }), 404, 'NOT_FOUND', /VM "nope" is not in the inventory; known VMs: web, db, gone/);
    assertError(await f.call('POST', '/v1/vms/nope/backups', { role: 'operator', body: {} }), 404, 'NOT_FOUND', /VM "nope"/);
  });

  test('a VM never backed up is idle with no last backup', async () => {
    const r = await f.call('GET', '/v1/vms/db', { role: 'viewer' });
    assert.equal(r.status, 200);
    assert.deepEqual([r.body.state, r.body.lastBackup, r.body.backups, r.body.jobs], ['idle', null, 0, []]);
  });

  test('POST …/backups enqueues a backup that the worker runs; the VM then shows it as its last backup', async () => {
    const id = await backupWeb(f, ['manual']);
    await listedBackups(f, '?vm=web', (items) => items.length === 1);
    const r = await f.call('GET', '/v1/vms/web', { role: 'viewer' });
    assert.equal(r.status, 200);
    assert.equal(r.body.lastBackup.id, id);
    assert.deepEqual(r.body.lastBackup.labels, ['manual']);
    assert.equal(r.body.backups, 1);
    assert.equal(r.body.state, 'idle');
    // No body at all is the same as {} (no labels).
    const plain = await f.call('POST', '/v1/vms/web/backups', { role: 'operator' });
    assert.equal(plain.status, 202);
    assert.deepEqual(plain.body.job.data.labels, []);
    assert.equal((await f.finished(plain.body.job.id)).state, 'completed');
  });

  test('refuses bad labels, unknown fields and a body that is not JSON', async () => {
    assertError(await f.call('POST', '/v1/vms/web/backups', { role: 'operator', body: { labels: ['no spaces'] } }), 400, 'BAD_REQUEST', /labels\.0: a label/);
    assertError(await f.call('POST', '/v1/vms/web/backups', { role: 'operator', body: { label: 'x' } }), 400, 'BAD_REQUEST', /label/);
    assertError(await f.call('POST', '/v1/vms/web/backups', { role: 'operator', body: '{not json' }), 400, 'BAD_REQUEST');
  });
});

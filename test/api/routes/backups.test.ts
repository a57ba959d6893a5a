/** /v1/backups in-process, with a real host worker: listing, filters, one backup, restores checked with qemu-img compare. */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { compareImages } from '../../../src/disk/qemu.js';
import { assertError, backupWeb, startFixture, type Fixture } from './fixture.js';

let f: Fixture;
let first: string;
let second: string;
before(async () => {
  f = await startFixture({ workers: true });
  first = await backupWeb(f, ['pre-update']);
  second = await backupWeb(f);
});
after(async () => { await f?.close(); });

describe('/v1/backups', () => {
  test('lists backups newest first with their stats and verification state, filtered and in pages', async () => {
    const all = await f.call('GET', '/v1/backups', { role: 'viewer' });
    assert.equal(all.status, 200);
    assert.deepEqual(all.body.items.map((b: any) => b.id), [second, first]);
    const b = all.body.items[1];
    assert.deepEqual([b.vm, b.host, b.labels, b.verification], ['web', 'hosta', ['pre-update'], null]);
    assert.equal(b.disks[0].virtualSize, 8 * 1024 * 1024);
    assert.equal(b.stats.bytesRead, 3 * 1024 * 1024, 'only the allocated 3 MiB is read');
    assert.deepEqual((await f.call('GET', '/v1/backups?label=pre-update', { role: 'viewer' })).body.items.map((x: any) => x.id), [first]);
    assert.deepEqual((await f.call('GET', '/v1/backups?vm=db', { role: 'viewer' })).body.items, []);
    assert.deepEqual((await f.call('GET', '/v1/backups?host=hosta&limit=1', { role: 'viewer' })).body, { items: [all.body.items[0]], nextCursor: '1', unreadable: [] });
    assert.equal((await f.call('GET', '/v1/backups?since=2000-01-01', { role: 'viewer' })).body.items.length, 2);
    assert.equal((await f.call('GET', '/v1/backups?since=2999-01-01T00:00:00Z', { role: 'viewer' })).body.items.length, 0);
    assertError(await f.call('GET', '/v1/backups?since=yesterday', { role: 'viewer' }), 400, 'BAD_REQUEST', /since/);
  });

  test('one backup by id or unique prefix; unknown is 404, malformed 400', async () => {
    const r = await f.call('GET', `/v1/backups/${first.slice(0, 12)}`, { role: 'viewer' });
    assert.equal(r.status, 200);
    assert.equal(r.body.id, first);
    assertError(await f.call('GET', `/v1/backups/${'0'.repeat(64)}`, { role: 'viewer' }), 404, 'NOT_FOUND');
    assertError(await f.call('GET', '/v1/backups/xyz1', { role: 'viewer' }), 400, 'BAD_REQUEST', /a backup id or a unique prefix/);
  });

  test('restore onto hosta in its restore root: the worker writes an image identical to the source', async () => {
    const directory = join(f.restoreRoot, 'web-1');
    const r = await f.call('POST', `/v1/backups/${first}/restore`, { role: 'operator', body: { host: 'hosta', directory, format: 'qcow2' } });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    const job = await f.finished(r.body.job.id);
    assert.equal(job.state, 'completed', job.error);
    const restored = join(directory, 'root.qcow2');
    assert.ok(existsSync(restored), JSON.stringify(job.result));
    const cmp = await compareImages(f.webDisk, restored, 'qcow2', 'qcow2');
    assert.ok(cmp.identical, cmp.output);
    // Again without overwrite: the job fails and says so, the image stays.
    const again = await f.call('POST', `/v1/backups/${first}/restore`, { role: 'operator', body: { host: 'hosta', directory, format: 'qcow2', disks: ['root'] } });
    const failed = await f.finished(again.body.job.id);
    assert.equal(failed.state, 'failed');
    assert.match(failed.error, /exists/);
    assert.ok((await compareImages(f.webDisk, restored, 'qcow2', 'qcow2')).identical);
  });

  test('restore with diskPaths puts the disk where asked inside the directory; name reaches the worker; escaping paths are refused', async () => {
    const directory = join(f.restoreRoot, 'web-paths');
    const r = await f.call('POST', `/v1/backups/${first}/restore`, { role: 'operator', body: { host: 'hosta', directory, format: 'qcow2', diskPaths: { root: 'images/moved.qcow2' } } });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    const job = await f.finished(r.body.job.id);
    assert.equal(job.state, 'completed', job.error);
    const moved = join(directory, 'images', 'moved.qcow2');
    assert.ok((await compareImages(f.webDisk, moved, 'qcow2', 'qcow2')).identical);
    // This backup has no libvirt domain XML: the worker says there is nothing to rename.
    const named = await f.call('POST', `/v1/backups/${first}/restore`, { role: 'operator', body: { host: 'hosta', directory: join(f.restoreRoot, 'web-named'), format: 'qcow2', name: 'web-clone' } });
    const failed = await f.finished(named.body.job.id);
    assert.equal(failed.state, 'failed');
    assert.match(failed.error, /has no libvirt domain XML to give the name "web-clone"/);
    const restore = (body: unknown) => f.call('POST', `/v1/backups/${first}/restore`, { role: 'operator', body: { host: 'hosta', directory, format: 'raw', ...body as object } });
    assertError(await restore({ diskPaths: { root: '../../etc/x.raw' } }), 400, 'BAD_INPUT', /must be plain: no "\." or "\.\." segments/);
    assertError(await restore({ diskPaths: { root: '/etc/x.raw' } }), 400, 'BAD_INPUT', /disk "root" cannot go to "\/etc\/x\.raw": it is outside the restore directory/);
    assertError(await restore({ diskPaths: { data: 'x.raw' } }), 404, 'NOT_FOUND', /has no disk "data"/);
    assertError(await restore({ name: 'a/b' }), 400, 'BAD_INPUT', /"a\/b" is not a VM name/);
  });

  test('refuses restores to unknown hosts, outside the restore roots, to a host with none, of unknown disks, in unknown formats', async () => {
    const restore = (body: unknown, id = first) => f.call('POST', `/v1/backups/${id}/restore`, { role: 'operator', body });
    const ok = { host: 'hosta', directory: join(f.restoreRoot, 'x'), format: 'raw' };
    assertError(await restore({ ...ok, host: 'hostz' }), 400, 'BAD_INPUT', /unknown host "hostz"; known hosts: hosta, hostb/);
    assertError(await restore({ ...ok, directory: '/etc' }), 400, 'BAD_INPUT', /outside host "hosta"'s restore roots/);
    assertError(await restore({ ...ok, directory: `${f.restoreRoot}/../x` }), 400, 'BAD_INPUT', /plain absolute path/);
    assertError(await restore({ ...ok, directory: 'relative' }), 400, 'BAD_INPUT', /must be an absolute path/);
    assertError(await restore({ ...ok, host: 'hostb' }), 400, 'BAD_INPUT', /host "hostb" has no restoreRoots/);
    assertError(await restore({ ...ok, disks: ['data'] }), 404, 'NOT_FOUND', /has no disk "data"; its disks are: root/);
    assertError(await restore({ ...ok, disks: ['../x'] }), 400, 'BAD_INPUT', /disk name/);
    assertError(await restore({ ...ok, format: 'iso' }), 400, 'BAD_REQUEST', /format/);
    assertError(await restore({ host: 'hosta' }), 400, 'BAD_REQUEST', /directory/);
    assertError(await restore(ok, '0'.repeat(64)), 404, 'NOT_FOUND');
  });
});

/** /v1/maintenance in-process, with a real maintenance worker: prune, gc, verify and copy jobs, and bad input. */
import assert from 'node:assert/strict';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Repository } from '../../../src/repo/repository.js';
import { LocalStorage } from '../../../src/storage/local.js';
import { verify } from '../../../src/pipeline/verify.js';
import { assertError, backupWeb, listedBackups, OFFSITE_PASSPHRASE, startFixture, type Fixture } from './fixture.js';

let f: Fixture;
let ids: string[];
before(async () => {
  f = await startFixture({ workers: true });
  await writeFile(join(f.policiesDir, 'keep1.yaml'), 'name: keep1\nschedule: "0 2 * * *"\nselect:\n  vms: [web]\nretention:\n  keepLast: 1\n');
  ids = [await backupWeb(f), await backupWeb(f)];
});
after(async () => { await f?.close(); });

async function run(path: string, body?: unknown): Promise<any> {
  const r = await f.call('POST', path, { role: 'admin', ...(body !== undefined ? { body } : {}) });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  assert.equal(r.body.job.queue, 'vmvault-maintenance');
  const job = await f.finished(r.body.job.id);
  assert.equal(job.state, 'completed', job.error);
  return job;
}

describe('/v1/maintenance', () => {
  test('verify checks every backup; gc (dry run) deletes nothing', async () => {
    const v = await run('/v1/maintenance/verify', { readData: true });
    assert.deepEqual([v.result.ok, v.result.backupsChecked, v.result.readData, v.result.problems], [true, 2, true, []]);
    await listedBackups(f, '', (items) => items.length === 2 && items.every((b) => b.verification?.status === 'ok'));
    await run('/v1/maintenance/gc', { dryRun: true });
    assert.equal((await f.call('GET', '/v1/backups', { role: 'viewer' })).body.items.length, 2);
  });

  test('copy copies every backup to the off-site repository, readable there with its own key; the next run copies nothing again', async () => {
    const first = await run('/v1/maintenance/copy');
    assert.deepEqual([[...first.result.copied].sort(), first.result.skipped], [[...ids].sort(), 0]);
    assert.ok(first.result.chunksUploaded > 0);
    const offsite = await Repository.open(new LocalStorage(join(f.dir, 'offsite')), OFFSITE_PASSPHRASE, { cacheDir: false });
    assert.deepEqual((await offsite.backupIds()).sort(), [...ids].sort());
    const checked = await verify(offsite, { readData: true });
    assert.deepEqual([checked.ok, checked.backupsChecked], [true, 2]);
    const again = await run('/v1/maintenance/copy');
    assert.deepEqual([again.result.copied, again.result.skipped, again.result.chunksUploaded], [[], 2, 0]);
  });

  test('the retention preview says what prune will do, with the rules that keep each backup', async () => {
    const r = await f.call('GET', '/v1/policies/keep1/preview?vm=web', { role: 'viewer' });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.policy, 'keep1');
    assert.deepEqual(r.body.items.map((i: any) => [i.id, i.keep, i.reasons]), [[ids[1], true, ['last']], [ids[0], false, []]]);
    assert.deepEqual((await f.call('GET', '/v1/policies/keep1/preview', { role: 'viewer' })).body.items.length, 2);
    assertError(await f.call('GET', '/v1/policies/nope/preview', { role: 'viewer' }), 404, 'NOT_FOUND', /no valid policy "nope" in the policies directory; valid policies: keep1/);
    assertError(await f.call('GET', '/v1/policies/keep1/preview?vm=nope', { role: 'viewer' }), 404, 'NOT_FOUND', /VM "nope"/);
    assertError(await f.call('GET', '/v1/policies/keep1/preview?vm=', { role: 'viewer' }), 400, 'BAD_REQUEST', /vm/);
  });

  test('another policy selecting the VM by tag keeps the on-demand backups it would keep, in the preview and in prune', async (t) => {
    const weekly = join(f.policiesDir, 'weekly.yaml');
    await writeFile(weekly, 'name: weekly\nschedule: "0 3 * * 0"\nselect:\n  tags: [web]\nretention:\n  keepLast: 2\n');
    t.after(() => rm(weekly));
    const r = await f.call('GET', '/v1/policies/keep1/preview?vm=web', { role: 'viewer' });
    assert.deepEqual(r.body.items.map((i: any) => [i.id, i.keep, i.reasons]), [[ids[1], true, ['last']], [ids[0], true, ['kept by policy weekly']]]);
    assert.deepEqual(r.body.warnings, []);
    const tagged = await f.call('GET', '/v1/policies/weekly/preview', { role: 'viewer' });
    assert.deepEqual(tagged.body.items.map((i: any) => [i.id, i.keep]), [[ids[1], true], [ids[0], true]], 'its tag is resolved through the inventory');
    const job = await run('/v1/maintenance/prune', { policy: 'keep1' });
    assert.deepEqual([job.result.kept, job.result.removed], [2, []]);
    await listedBackups(f, '', (items) => items.length === 2);
  });

  test('prune applies the policy: a dry run keeps everything, a real one keeps the last', async () => {
    await run('/v1/maintenance/prune', { policy: 'keep1', dryRun: true });
    assert.equal((await f.call('GET', '/v1/backups', { role: 'viewer' })).body.items.length, 2);
    await run('/v1/maintenance/prune', { policy: 'keep1' });
    await listedBackups(f, '', (items) => items.length === 1 && items[0].id === ids[1]);
  });

  test('a prune of an unknown policy fails its job and says so', async () => {
    const r = await f.call('POST', '/v1/maintenance/prune', { role: 'admin', body: { policy: 'nope' } });
    assert.equal(r.status, 202);
    const job = await f.finished(r.body.job.id);
    assert.equal(job.state, 'failed');
    assert.match(job.error, /nope/);
  });

  test('refuses bad input', async () => {
    assertError(await f.call('POST', '/v1/maintenance/prune', { role: 'admin', body: {} }), 400, 'BAD_REQUEST', /policy/);
    assertError(await f.call('POST', '/v1/maintenance/gc', { role: 'admin', body: { dryRun: 'yes' } }), 400, 'BAD_REQUEST', /dryRun/);
    assertError(await f.call('POST', '/v1/maintenance/verify', { role: 'admin', body: { everything: true } }), 400, 'BAD_REQUEST', /everything/);
  });
});

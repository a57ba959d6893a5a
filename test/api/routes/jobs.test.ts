/** /v1/jobs in-process, with a real host worker: states, a failed job's error, filters. */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { assertError, backupWeb, startFixture, type Fixture } from './fixture.js';

let f: Fixture;
let failedId: string;
before(async () => {
  f = await startFixture({ workers: true });
  await backupWeb(f);
  const r = await f.call('POST', '/v1/vms/gone/backups', { role: 'operator', body: {} });
  assert.equal(r.status, 202);
  failedId = r.body.job.id;
});
after(async () => { await f?.close(); });

describe('/v1/jobs', () => {
  test('a backup of a VM whose disk is missing fails, and its job says why', async () => {
    const job = await f.finished(failedId);
    assert.equal(job.state, 'failed');
    assert.match(job.error, /gone\.qcow2/);
    assert.equal(job.queue, 'vmvault-host-hosta');
    assert.ok(job.finishedAt && job.startedAt);
  });

  test('lists jobs newest first, filtered by state and queue, in pages', async () => {
    const all = await f.call('GET', '/v1/jobs', { role: 'viewer' });
    assert.equal(all.status, 200);
    assert.deepEqual(all.body.items.map((j: any) => j.id)[0], failedId);
    assert.equal(all.body.items.length, 2);
    const failed = await f.call('GET', '/v1/jobs?state=failed', { role: 'viewer' });
    assert.deepEqual(failed.body.items.map((j: any) => j.id), [failedId]);
    const completed = await f.call('GET', '/v1/jobs?state=completed', { role: 'viewer' });
    assert.deepEqual(completed.body.items.map((j: any) => [j.name, j.data.vm]), [['backup', 'web']]);
    assert.equal(completed.body.items[0].result.vm, 'web');
    const page = await f.call('GET', '/v1/jobs?limit=1', { role: 'viewer' });
    assert.deepEqual([page.body.items.length, page.body.nextCursor], [1, '1']);
    const none = await f.call('GET', '/v1/jobs?queue=vmvault-maintenance', { role: 'viewer' });
    assert.deepEqual(none.body.items, []);
  });

  test('refuses an unknown state and a bad cursor; an unknown job is 404', async () => {
    assertError(await f.call('GET', '/v1/jobs?state=sleeping', { role: 'viewer' }), 400, 'BAD_REQUEST', /state/);
    assertError(await f.call('GET', '/v1/jobs?cursor=-1', { role: 'viewer' }), 400, 'BAD_REQUEST', /cursor/);
    assertError(await f.call('GET', '/v1/jobs/api-backup-0000', { role: 'viewer' }), 404, 'NOT_FOUND', /no job "api-backup-0000" in any queue/);
  });

  test('a Redis that stops answering (the connection stays open) gets 503 in seconds, not a request that hangs', async () => {
    const pid = f.redis.pid!;
    process.kill(pid, 'SIGSTOP');
    try {
      const started = Date.now();
      const r = await f.call('GET', '/v1/jobs', { role: 'viewer' });
      const took = Date.now() - started;
      assert.equal(r.status, 503, JSON.stringify(r.body));
      assert.equal(r.body.error.code, 'UNAVAILABLE');
      assert.match(r.body.error.message, /did not answer within 5 s.*look at the job list before sending it again/);
      assert.ok(took < 15_000, `answered after ${took} ms`);
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    const again = await f.call('GET', '/v1/jobs', { role: 'viewer' });
    assert.equal(again.status, 200, 'answers again once Redis does');
  });
});

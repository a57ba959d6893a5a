/** Pure parts of the queue layer: names, ids, payloads, Redis URLs, the retry decision. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { UnrecoverableError } from 'bullmq';
import { assertJobId, deterministicJobId, hostQueueName, MAINTENANCE_QUEUE } from '../../src/queue/names.js';
import { parseHostJob, parseMaintenancePayload } from '../../src/queue/payloads.js';
import { redisOptionsFromUrl } from '../../src/queue/connection.js';
import { jobOptions } from '../../src/queue/enqueue.js';
import { NotFoundError, VmvaultError } from '../../src/errors.js';
import { toJobError } from '../../workers/job-errors.js';

test('queue names', () => {
  assert.equal(hostQueueName('kvm-01.example'), 'vmvault-host-kvm-01.example');
  assert.equal(MAINTENANCE_QUEUE, 'vmvault-maintenance');
  assert.throws(() => hostQueueName('a:b'), /contains ":"/);
  assert.throws(() => hostQueueName(''), /empty/);
  assert.throws(() => hostQueueName('a b'), /not a valid host name/);
});

test('job ids: no ":", no integers, deterministic ids are unambiguous', () => {
  assert.throws(() => assertJobId('a:b'), /":"/);
  assert.throws(() => assertJobId('42'), /integer/);
  assertJobId('nightly-web-1');
  const id = deterministicJobId(['nightly', 'web-01', '2025-01-01T02:00:00.000Z']);
  assert.equal(id.includes(':'), false);
  assert.equal(id, 'nightly-web%2D01-2025%2D01%2D01T02%3A00%3A00.000Z');
  assert.notEqual(deterministicJobId(['a-b', 'c']), deterministicJobId(['a', 'b-c']));
  assert.throws(() => jobOptions({ jobId: 'x:y' }), /":"/);
  const o = jobOptions();
  assert.equal(o.attempts, 5);
  assert.deepEqual(o.backoff, { type: 'exponential', delay: 30_000 });
  assert.deepEqual(o.removeOnComplete, { count: 1000, age: 604800 });
});

test('payloads: defaults, and every bad field named', () => {
  const ok = parseHostJob('backup', { vm: 'web', disks: [{ path: '/d/web.qcow2' }] });
  assert.deepEqual(ok, { name: 'backup', payload: { vm: 'web', disks: [{ path: '/d/web.qcow2' }], configs: [], labels: [] } });
  assert.throws(() => parseHostJob('backup', { vm: '', disks: [], extra: 1 }), (err: VmvaultError) => {
    assert.equal(err.code, 'BAD_INPUT');
    assert.match(err.message, /vm: /);
    assert.match(err.message, /disks: at least one disk/);
    assert.match(err.message, /extra|unrecognized/i);
    return true;
  });
  const r = parseHostJob('restore', { backupId: 'abcd1234', directory: '/srv/restore', format: 'raw' });
  assert.deepEqual(r.payload, { backupId: 'abcd1234', directory: '/srv/restore', format: 'raw', overwrite: false });
  assert.throws(() => parseHostJob('restore', { backupId: 'xyz', directory: 'rel', format: 'iso' }), /backupId: .*directory: .*format: /);
  assert.throws(() => parseHostJob('snapshot-all', {}), /unknown job "snapshot-all"/);
  assert.deepEqual(parseMaintenancePayload({ kind: 'gc' }), { kind: 'gc', dryRun: false });
  assert.throws(() => parseMaintenancePayload({ kind: 'defrag' }), /invalid maintenance job payload/);
});

test('Redis URLs', () => {
  assert.deepEqual(redisOptionsFromUrl('unix:///run/vmvault/redis.sock'), { path: '/run/vmvault/redis.sock', db: 0 });
  assert.deepEqual(redisOptionsFromUrl('unix:///tmp/r.sock?db=2'), { path: '/tmp/r.sock', db: 2 });
  assert.deepEqual(redisOptionsFromUrl('redis://:s%40cret@10.0.0.5:6380/3'), { host: '10.0.0.5', port: 6380, db: 3, password: 's@cret' });
  assert.deepEqual(redisOptionsFromUrl('redis://redis'), { host: 'redis', port: 6379, db: 0 });
  assert.equal(redisOptionsFromUrl('rediss://u:p@r.example:6390').tls !== undefined, true);
  assert.throws(() => redisOptionsFromUrl('http://x'), /unknown scheme/);
  assert.throws(() => redisOptionsFromUrl('unix://host/sock'), /three slashes/);
  assert.throws(() => redisOptionsFromUrl('redis://:pw@h/x'), (e: Error) => !e.message.includes('pw') && /database/.test(e.message));
});

test('retry decision: permanent codes fail at once, the rest is retried', () => {
  const missing = toJobError(new NotFoundError('disk image /x does not exist'));
  assert.ok(missing instanceof UnrecoverableError);
  assert.equal(missing.message, 'disk image /x does not exist');
  assert.ok(toJobError(new VmvaultError('IMAGE_LOCKED', 'in use')) instanceof UnrecoverableError);
  assert.ok(!(toJobError(new VmvaultError('STORAGE', 'slow down', { retriable: true })) instanceof UnrecoverableError));
  assert.ok(!(toJobError(new VmvaultError('QEMU', 'qemu-nbd died')) instanceof UnrecoverableError));
  assert.ok(!(toJobError(new Error('ECONNRESET')) instanceof UnrecoverableError));
});

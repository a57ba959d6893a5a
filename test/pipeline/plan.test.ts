import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dataBytes, planChunks } from '../../src/pipeline/plan.js';
import { pathInside, uniqueNames, diskNameFromPath } from '../../src/pipeline/names.js';

const MiB = 1024 * 1024;

test('all-zero extents give zero chunks, data extents land in their chunks', () => {
  const plans = planChunks([
    { offset: 0, length: 6 * MiB, zero: true },
    { offset: 6 * MiB, length: 3 * MiB, zero: false },
    { offset: 9 * MiB, length: 1 * MiB, zero: true },
  ], 0, 10 * MiB, 4 * MiB);
  assert.equal(plans.length, 3);
  assert.deepEqual(plans.map((p) => p.length), [4 * MiB, 4 * MiB, 2 * MiB]);
  assert.deepEqual(plans[0]!.data, []);
  assert.deepEqual(plans[1]!.data, [{ offset: 6 * MiB, length: 2 * MiB }]);
  assert.deepEqual(plans[2]!.data, [{ offset: 8 * MiB, length: 1 * MiB }]);
  assert.equal(plans.reduce((n, p) => n + dataBytes(p), 0), 3 * MiB);
});

test('adjacent data extents merge, windows start mid-disk', () => {
  const plans = planChunks([
    { offset: 8 * MiB, length: MiB, zero: false },
    { offset: 9 * MiB, length: MiB, zero: false },
    { offset: 10 * MiB, length: 6 * MiB, zero: true },
  ], 8 * MiB, 16 * MiB, 4 * MiB);
  assert.deepEqual(plans.map((p) => p.index), [2, 3]);
  assert.deepEqual(plans[0]!.data, [{ offset: 8 * MiB, length: 2 * MiB }]);
  assert.deepEqual(plans[1]!.data, []);
  assert.throws(() => planChunks([], 1, 2, 4 * MiB), /not aligned/);
});

test('names from manifests cannot escape the target directory', () => {
  for (const bad of ['..', '.', '', 'a/b', '../x', '/etc/passwd', 'a\\b', 'x\0y', '.hidden']) {
    assert.throws(() => pathInside('/tmp/restore', bad, 'disk name'), /not a plain file name/, JSON.stringify(bad));
  }
  assert.equal(pathInside('/tmp/restore', 'vda.qcow2', 'disk name'), '/tmp/restore/vda.qcow2');
  assert.deepEqual(uniqueNames(['vda', 'vda', 'vdb', 'vda']), ['vda', 'vda-2', 'vdb', 'vda-3']);
  assert.equal(diskNameFromPath('/var/lib/x/my disk.qcow2'), 'my_disk');
  assert.equal(diskNameFromPath('/x/.qcow2'), 'qcow2');
});

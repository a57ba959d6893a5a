import { test } from 'node:test';
import assert from 'node:assert/strict';
import { planPrune } from '../../src/pipeline/prune.js';
import { parsePolicy } from '../../src/policy/load.js';
import type { BackupSummary } from '../../src/repo/manifest.js';

const policy = parsePolicy(`
name: nightly
schedule: "30 1 * * *"
select:
  vms: [web1]
retention:
  keepLast: 2
  byLabel:
    pre-update:
      keepLast: 1
`, 'nightly.yaml');

let n = 0;
function b(vm: string, time: string, extra: Partial<BackupSummary> = {}): BackupSummary {
  return { id: (++n).toString(16).padStart(64, '0'), vm, host: 'h', time, labels: [], disks: [], configs: [], ...extra };
}

test('retention applies per VM and per label; other policies\' backups are untouched', () => {
  const backups = [
    b('web1', '2026-11-01T01:30:00Z', { policy: 'nightly' }),
    b('web1', '2026-11-02T01:30:00Z', { policy: 'nightly' }),
    b('web1', '2026-11-03T01:30:00Z', { policy: 'nightly' }),
    b('web1', '2026-11-02T12:00:00Z', { labels: ['pre-update'] }),
    b('web1', '2026-11-03T12:00:00Z', { labels: ['pre-update'] }),
    b('web1', '2026-11-01T05:00:00Z', { policy: 'hourly' }), // another policy's
    b('db1', '2026-11-01T01:30:00Z'), // a VM the policy does not select
    b('db1', '2026-11-02T01:30:00Z', { policy: 'nightly' }), // taken under this policy anyway
  ];
  const plan = planPrune(backups, policy);
  const decided = (id: string) => plan.find((d) => d.id === id);
  assert.equal(plan.length, 6);
  assert.equal(decided(backups[5]!.id), undefined);
  assert.equal(decided(backups[6]!.id), undefined);
  assert.deepEqual(plan.filter((d) => d.vm === 'web1' && !d.ruleLabel).map((d) => [d.time, d.keep]), [
    ['2026-11-03T01:30:00Z', true],
    ['2026-11-02T01:30:00Z', true],
    ['2026-11-01T01:30:00Z', false],
  ]);
  const pre = plan.filter((d) => d.ruleLabel === 'pre-update');
  assert.deepEqual(pre.map((d) => [d.time, d.keep]), [['2026-11-03T12:00:00Z', true], ['2026-11-02T12:00:00Z', false]]);
  assert.deepEqual(pre[0]!.reasons, ['last']);
  assert.deepEqual(plan.filter((d) => d.vm === 'db1').map((d) => d.keep), [true]);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { planPrune, pruneWarnings, type PruneDecision } from '../../src/pipeline/prune.js';
import { selectionOf } from '../../src/policy/select.js';
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

const keepLast1 = (name: string, select: string, extra = '') => parsePolicy(`name: ${name}\nschedule: "0 2 * * *"\nselect: ${select}\nretention:\n  keepLast: 1\n${extra}`, `${name}.yaml`);
const disk = (name: string) => ({ name, format: 'qcow2', virtualSize: 1 });
const show = (plan: PruneDecision[]) => plan.map((d) => [d.time, d.keep, d.reasons]);

test('a damaged backup is never removed and takes no retention slot: the restorable one stays', () => {
  const p = keepLast1('p1', '{ vms: [v1] }');
  const good = b('v1', '2026-11-01T01:00:00Z');
  const damaged = b('v1', '2026-11-02T01:00:00Z');
  const verification = new Map([[damaged.id, { status: 'damaged' as const, damagedDisks: ['root'] }]]);
  assert.deepEqual(show(planPrune([good, damaged], p, { verification })), [
    ['2026-11-02T01:00:00Z', true, ['damaged']],
    ['2026-11-01T01:00:00Z', true, ['last']],
  ]);
  // Once healed (no longer damaged) it counts again.
  assert.deepEqual(show(planPrune([good, damaged], p, { verification: new Map() })).map((x) => x[1]), [true, false]);
});

test('a backup dated in the future is kept without a slot, with a warning; an unreadable time does not stop the others', () => {
  const p = keepLast1('p2', '{ vms: [v1, v9] }');
  const now = new Date('2026-12-01T12:00:00Z');
  const future = b('v1', '2036-11-29T08:00:00Z', { host: 'fast' });
  const slightlyAhead = b('v1', '2026-12-01T12:03:00Z');
  const older = b('v1', '2026-12-01T01:00:00Z');
  const unreadable = b('v9', '+010027-01-31T08:19:27.002Z', { host: 'far' });
  const v9 = b('v9', '2026-12-01T02:00:00Z');
  const plan = planPrune([future, slightlyAhead, older, unreadable, v9], p, { now });
  assert.deepEqual(show(plan), [
    ['2036-11-29T08:00:00Z', true, ['future time']],
    ['2026-12-01T12:03:00Z', true, ['last']], // a clock a few minutes ahead is normal: it counts
    ['2026-12-01T01:00:00Z', false, []],
    ['2026-12-01T02:00:00Z', true, ['last']],
    ['+010027-01-31T08:19:27.002Z', true, ['unreadable time']],
  ]);
  const warnings = pruneWarnings(plan, [future, unreadable], p);
  assert.equal(warnings.length, 2);
  assert.match(warnings[0]!, new RegExp(`backup ${future.id} of VM v1 is dated 2036-11-29T08:00:00Z, in the future: the clock of host "fast" that made it is probably wrong.*keeps it without counting it`));
  assert.match(warnings[1]!, /cannot read \("\+010027-01-31T08:19:27.002Z".*host "far".*keeps it without counting it/);
});

test('every disk a governed backup holds keeps a backup that holds it undamaged', () => {
  const p = keepLast1('p1', '{ vms: [v1] }');
  const both = b('v1', '2026-11-01T01:00:00Z', { disks: [disk('root'), disk('data')] });
  const rootOnly = b('v1', '2026-11-02T01:00:00Z', { disks: [disk('root')] });
  assert.deepEqual(show(planPrune([both, rootOnly], p)), [
    ['2026-11-02T01:00:00Z', true, ['last']],
    ['2026-11-01T01:00:00Z', true, ['last of disk data']],
  ]);
  // A newer backup holding data, but damaged on it, does not count; the newest good one is kept (not an older one).
  const oldest = b('v1', '2026-10-31T01:00:00Z', { disks: [disk('root'), disk('data')] });
  const damagedData = b('v1', '2026-11-01T12:00:00Z', { disks: [disk('root'), disk('data')] });
  const verification = new Map([[damagedData.id, { status: 'damaged' as const, damagedDisks: ['data'] }]]);
  assert.deepEqual(show(planPrune([oldest, both, damagedData, rootOnly], p, { verification })), [
    ['2026-11-02T01:00:00Z', true, ['last']],
    ['2026-11-01T12:00:00Z', true, ['damaged']],
    ['2026-11-01T01:00:00Z', true, ['last of disk data']],
    ['2026-10-31T01:00:00Z', false, []],
  ]);
  // A backup this policy does not govern (another policy's) that holds data does not count:
  // that policy's prune may remove it at the same time, counting on this one's.
  const other = b('v1', '2026-11-03T01:00:00Z', { policy: 'weekly', disks: [disk('data')] });
  assert.deepEqual(show(planPrune([both, rootOnly, other], p)), [
    ['2026-11-02T01:00:00Z', true, ['last']],
    ['2026-11-01T01:00:00Z', true, ['last of disk data']],
  ]);
});

test('an on-demand backup goes only when every policy selecting its VM would remove it', () => {
  const web = parsePolicy('name: web-weekly\nschedule: "0 0 3 * * 0"\nselect: { tags: [web] }\nretention:\n  keepWeekly: 8\n  byLabel:\n    pre-update: { keepWithin: 14d, keepLast: 2 }\n', 'web.yaml');
  const nightly = keepLast1('nightly', '{ vms: [web1] }');
  const now = new Date('2026-12-04T12:00:00Z');
  const pre = [1, 2, 3].map((d) => b('web1', `2026-12-0${4 - d}T12:00:00Z`, { labels: ['pre-update'] }));
  const alone = planPrune(pre, nightly, { now });
  assert.deepEqual(alone.map((d) => d.keep), [true, false, false], 'nightly alone keeps its last one');
  const inventory = selectionOf(() => [{ name: 'web1', tags: ['web'] }]);
  const both = planPrune(pre, nightly, { now, policies: [web, nightly], selection: inventory });
  assert.deepEqual(show(both), [
    ['2026-12-03T12:00:00Z', true, ['last']],
    ['2026-12-02T12:00:00Z', true, ['kept by policy web-weekly']],
    ['2026-12-01T12:00:00Z', true, ['kept by policy web-weekly']],
  ]);
  // Without an inventory, web-weekly's tags cannot be read: it might select web1, so it keeps what it would keep.
  assert.deepEqual(planPrune(pre, nightly, { now, policies: [web] }).map((d) => d.keep), [true, true, true]);
  // An inventory where web1 lacks the tag: web-weekly does not select it.
  assert.deepEqual(planPrune(pre, nightly, { now, policies: [web], selection: selectionOf(() => [{ name: 'web1', tags: [] }]) }).map((d) => d.keep), [true, false, false]);
  // A policy file that cannot be read might select it too.
  assert.deepEqual(show(planPrune(pre, nightly, { now, policies: [], invalidPolicyFiles: ['/p/bad.yaml'] })).map((x) => x[2]), [['last'], ['invalid policy file'], ['invalid policy file']]);
  // Backups taken under a policy are that policy's alone.
  const own = [1, 2].map((d) => b('web1', `2026-12-0${4 - d}T01:00:00Z`, { policy: 'nightly', labels: ['pre-update'] }));
  assert.deepEqual(planPrune(own, nightly, { now, policies: [web], selection: inventory }).map((d) => d.keep), [true, false]);
});

test('a policy selecting by tag governs on-demand backups of the VMs the inventory gives that tag, and only those', () => {
  const web = keepLast1('web', '{ tags: [web] }');
  const backups = [b('web1', '2026-12-01T01:00:00Z'), b('web1', '2026-12-02T01:00:00Z'), b('db1', '2026-12-01T01:00:00Z')];
  assert.deepEqual(planPrune(backups, web), [], 'without an inventory its tags select nothing');
  const plan = planPrune(backups, web, { selection: selectionOf(() => [{ name: 'web1', tags: ['web'] }, { name: 'db1', tags: ['db'] }]) });
  assert.deepEqual(plan.map((d) => [d.vm, d.keep]), [['web1', true], ['web1', false]]);
});

test('equal times: the plan does not depend on the order of its input', () => {
  const p = keepLast1('p', '{ vms: [v] }');
  const x = b('v', '2026-01-01T00:00:00.000Z');
  const y = b('v', '2026-01-01T00:00:00.000Z');
  const one = planPrune([x, y], p);
  assert.deepEqual(planPrune([y, x], p), one);
  assert.deepEqual(one.map((d) => [d.id, d.keep]), [[x.id, true], [y.id, false]].sort((a, c) => String(a[0]).localeCompare(String(c[0]))));
});

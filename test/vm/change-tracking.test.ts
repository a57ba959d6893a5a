/**
 * The tracking decision for a running VM's disk (decideRunning), a pure function:
 * every reason a bitmap QEMU lists is not trusted, and the one case it is.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { NamedDisk } from '../../src/pipeline/backup.js';
import { bitmapName, decide, decideRunning, ownBitmap, withAudit, type NodeBitmap } from '../../src/vm/change-tracking.js';

const MiB = 1024 * 1024;
const P = `vmvault-${'a'.repeat(64)}`;

function disk(over: Partial<NamedDisk> = {}, prev: { bitmap?: string; virtualSize?: number } = { bitmap: P }): NamedDisk {
  return {
    path: '/vm/root.qcow2', name: 'root', format: 'qcow2', formatSource: 'declared', chain: [], virtualSize: 16 * MiB,
    actualSize: 0, references: [], bitmaps: [], snapshots: [],
    previous: {
      backupId: 'b'.repeat(64), chunkSize: 4 * MiB,
      entry: { name: 'root', format: 'qcow2', virtualSize: prev.virtualSize ?? 16 * MiB, sourcePath: '/vm/root.qcow2', chunks: [null, null, null, null], ...(prev.bitmap ? { bitmap: prev.bitmap } : {}) },
    },
    ...over,
  };
}

function withoutPrevious(d: NamedDisk): NamedDisk {
  const { previous: _, ...rest } = d;
  return rest;
}

const good: NodeBitmap = { name: P, recording: true, busy: false, persistent: true };

describe('decideRunning', () => {
  it('trusts a bitmap QEMU lists on the node, persistent, recording, consistent and not busy', () => {
    const d = decideRunning(disk(), [good], {});
    assert.deepEqual([d.mode, d.since], ['incremental', P]);
    assert.match(d.reason, /changes since backup bbbbbbbbbbbb/);
  });

  const cases: [string, NamedDisk, NodeBitmap[], { fullRead?: boolean; untrackable?: string }, RegExp][] = [
    ['a full read asked for', disk(), [good], { fullRead: true }, /full read was asked/],
    ['a raw disk', disk({ format: 'raw' }), [good], {}, /raw disks of a running VM are read in full/],
    ['a qcow2 image that cannot hold a bitmap', disk(), [good], { untrackable: 'qcow2 version 2 images cannot hold a dirty bitmap' }, /version 2/],
    ['no earlier backup', withoutPrevious(disk()), [good], {}, /no earlier backup/],
    ['a resized disk', disk({}, { bitmap: P, virtualSize: 8 * MiB }), [good], {}, /resized/],
    ['a previous backup without a bitmap', disk({}, {}), [good], {}, /left no bitmap/],
    ['a bitmap QEMU does not list', disk(), [], {}, /missing/],
    ['an inconsistent bitmap', disk(), [{ ...good, recording: false, inconsistent: true }], {}, /inconsistent/],
    ['a busy bitmap', disk(), [{ ...good, busy: true }], {}, /busy/],
    ['a disabled bitmap', disk(), [{ ...good, recording: false }], {}, /disabled/],
    ['a bitmap that is not persistent', disk(), [{ ...good, persistent: false }], {}, /not persistent/],
  ];
  for (const [what, d, onNode, opts, reason] of cases) {
    it(`reads in full after ${what}`, () => {
      const decision = decideRunning(d, onNode, opts);
      assert.equal(decision.mode, 'full');
      assert.equal(decision.since, undefined);
      assert.match(decision.reason, reason);
    });
  }
});

describe('withAudit', () => {
  const incremental = { mode: 'incremental' as const, reason: `changes since backup bbb (bitmap ${P})`, since: P };
  const at = (lastFullRead: string | undefined) => {
    const d = disk();
    return { ...d, previous: { ...d.previous!, ...(lastFullRead ? { lastFullRead } : {}) } };
  };
  const day = 86_400_000;
  const now = Date.parse('2026-11-30T12:00:00Z');

  it('turns an incremental into an audited full read when asked, or when the last full read is too old', () => {
    assert.deepEqual(withAudit(at('2026-11-29T12:00:00Z'), incremental, { fullReadEveryMs: 7 * day, now }), incremental, 'a day old: not due');
    const due = withAudit(at('2026-11-20T12:00:00Z'), incremental, { fullReadEveryMs: 7 * day, now });
    assert.deepEqual([due.mode, due.audit, due.since], ['full', true, P]);
    assert.match(due.reason, /the last full read of this disk was at 2026-11-20/);
    assert.equal(withAudit(at(undefined), incremental, { fullReadEveryMs: 7 * day, now }).audit, true, 'never read in full: due');
    assert.match(withAudit(at('2026-11-29T12:00:00Z'), incremental, { audit: true, now }).reason, /an audit was asked for/);
  });

  it('leaves a full read alone: there is nothing to compare', () => {
    const fullRead = { mode: 'full' as const, reason: 'no earlier backup of this disk' };
    assert.deepEqual(withAudit(at(undefined), fullRead, { audit: true }), fullRead);
  });
});

describe('bitmap names carry their repository', () => {
  it('each repository names, rotates and removes only its own bitmaps (and those named before names carried one)', () => {
    const repoA = '0123abcd'.repeat(4);
    const repoB = 'ffff0000'.repeat(4);
    const id = 'c'.repeat(64);
    assert.equal(bitmapName(repoA, id), `vmvault-0123abcd-${id}`);
    assert.ok(ownBitmap(repoA, bitmapName(repoA, id)));
    assert.ok(!ownBitmap(repoB, bitmapName(repoA, id)), 'another repository\'s bitmap is left alone');
    assert.ok(ownBitmap(repoB, `vmvault-${id}`), 'a bitmap named before the repository tag is taken as one\'s own');
    for (const other of ['vmvault-export-1', 'vmvault-0123abcd', 'backup-nightly', `vmvault-${id}x`]) assert.ok(!ownBitmap(repoA, other), other);
  });
});

describe('a linked clone (a disk with a backing chain)', () => {
  const stamp = (mtimeNs: string) => ({ dev: 1, ino: 2, size: 3, mtimeNs, ctimeNs: mtimeNs });
  const clone = (prevStamps?: ReturnType<typeof stamp>[], prevChain = ['/vm/base.qcow2']): NamedDisk => {
    const d = disk({ chain: ['/vm/base.qcow2'], bitmaps: [{ name: P, flags: ['auto'] }] });
    return { ...d, previous: { ...d.previous!, entry: { ...d.previous!.entry, chain: prevChain, ...(prevStamps ? { chainStamps: prevStamps } : {}) } } };
  };
  it('is incremental only while every backing file is the one the previous backup recorded, unchanged', () => {
    assert.equal(decide(clone([stamp('1')]), { chainStamps: [stamp('1')] }).mode, 'incremental');
    const changed = decide(clone([stamp('1')]), { chainStamps: [stamp('2')] });
    assert.deepEqual([changed.mode, changed.since], ['full', undefined]);
    assert.match(changed.reason, /a file of the image's backing chain changed since backup bbbbbbbbbbbb \(its bitmap counts writes to the image only\)/);
    assert.match(decide(clone(), { chainStamps: [stamp('1')] }).reason, /recorded no identity of its files/, 'an older backup recorded none');
    assert.equal(decide(clone([stamp('1')]), {}).mode, 'full', 'a driver that gives none');
    assert.equal(decide(clone([stamp('1')], ['/vm/other.qcow2']), { chainStamps: [stamp('1')] }).mode, 'full', 'another backing file');
    assert.equal(decideRunning(clone([stamp('1')]), [good], { chainStamps: [stamp('1')] }).mode, 'incremental');
    assert.equal(decideRunning(clone([stamp('1')]), [good], { chainStamps: [stamp('9')] }).mode, 'full');
  });
});

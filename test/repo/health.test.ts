/**
 * Repository health: the pure decisions (read-data subsets, verification records and
 * states, repair verdicts), then verify against a real directory repository and real
 * qcow2 images: concurrent verifies, and a repository that cannot be written.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { VmvaultError } from '../../src/errors.js';
import { parseSubset, selectSubset, formatSubset } from '../../src/pipeline/subset.js';
import { chunksToRead, verify } from '../../src/pipeline/verify.js';
import { planRepair, repair } from '../../src/pipeline/repair.js';
import { collectGarbage } from '../../src/repo/gc.js';
import { UnreadableManifestError, backupName } from '../../src/repo/manifest.js';
import { additionalData, seal } from '../../src/crypto/seal.js';
import { compress } from 'zstd-napi';
import { backupVm } from '../../src/vm/drivers.js';
import { nextRecord, readRecords, verificationState, verificationStates, type QuarantineEntry, type VerificationRecord } from '../../src/repo/health.js';
import { chunkName } from '../../src/repo/chunk.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import type { Storage } from '../../src/storage/storage.js';
import { makeImage, tempDir } from '../helpers/images.js';

const ids = (n: number) => Array.from({ length: n }, () => randomBytes(32).toString('hex'));
/** A seeded generator (mulberry32), so percentage samples are reproducible. */
function seeded(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('read-data subsets', () => {
  test('parsing: k/n and percentages; anything else is refused with what to write', () => {
    assert.deepEqual(parseSubset('1/5'), { kind: 'slice', k: 1, n: 5 });
    assert.deepEqual(parseSubset(' 7/7 '), { kind: 'slice', k: 7, n: 7 });
    assert.deepEqual(parseSubset('10%'), { kind: 'percent', percent: 10 });
    assert.deepEqual(parseSubset('2.5%'), { kind: 'percent', percent: 2.5 });
    assert.equal(formatSubset(parseSubset('3/9')), '3/9');
    for (const bad of ['0/5', '6/5', '1/0', '0%', '101%', '1/5%', 'abc', '', '-1/5', '1.5/5']) {
      assert.throws(() => parseSubset(bad), (e: unknown) => e instanceof VmvaultError && e.code === 'BAD_INPUT' && /k\/n|percentage/.test(e.message), bad);
    }
  });

  test('n runs of k/n cover every chunk exactly once, in slices of about equal size', () => {
    const all = ids(2000);
    for (const n of [1, 2, 3, 5, 7, 10]) {
      const seen = new Map<string, number>();
      for (let k = 1; k <= n; k++) {
        const slice = selectSubset(all, { kind: 'slice', k, n });
        assert.ok(Math.abs(slice.length - all.length / n) < (all.length / n) * 0.25 + 10, `n=${n} k=${k}: ${slice.length}`);
        for (const id of slice) seen.set(id, (seen.get(id) ?? 0) + 1);
      }
      assert.equal(seen.size, all.length, `n=${n}: every chunk is read`);
      assert.ok([...seen.values()].every((c) => c === 1), `n=${n}: no chunk twice`);
    }
    // The same slice of a grown repository keeps its old members: slices are by id, not position.
    const more = [...all, ...ids(100)];
    const before = new Set(selectSubset(all, { kind: 'slice', k: 2, n: 7 }));
    const after = new Set(selectSubset(more, { kind: 'slice', k: 2, n: 7 }));
    assert.ok([...before].every((id) => after.has(id)));
  });

  test('a percentage reads ⌈p·N/100⌉ distinct chunks, a different sample each run', () => {
    const all = ids(1000);
    const set = new Set(all);
    for (const [p, want] of [[10, 100], [0.1, 1], [33.3, 333], [100, 1000]] as const) {
      const pick = selectSubset(all, { kind: 'percent', percent: p }, seeded(1));
      assert.equal(pick.length, want, `${p}%`);
      assert.equal(new Set(pick).size, want, `${p}%: distinct`);
      assert.ok(pick.every((id) => set.has(id)));
    }
    assert.deepEqual(selectSubset(all, { kind: 'percent', percent: 10 }, seeded(7)), selectSubset(all, { kind: 'percent', percent: 10 }, seeded(7)));
    assert.notDeepEqual(selectSubset(all, { kind: 'percent', percent: 10 }, seeded(7)), selectSubset(all, { kind: 'percent', percent: 10 }, seeded(8)));
    assert.deepEqual(selectSubset(ids(3), { kind: 'percent', percent: 50 }).length, 2);
    assert.deepEqual(selectSubset([], { kind: 'percent', percent: 50 }), []);
  });

  test('quarantined chunks are read in every mode; readData reads all', () => {
    const all = ids(50);
    const q = new Set([all[3]!, all[40]!]);
    assert.deepEqual([...chunksToRead(all, q, {})].sort(), [...q].sort());
    assert.equal(chunksToRead(all, q, { readData: true }).size, 50);
    const sub = chunksToRead(all, q, { readDataSubset: { kind: 'slice', k: 1, n: 5 } });
    assert.ok([...q].every((id) => sub.has(id)));
    assert.deepEqual([...sub].filter((id) => !q.has(id)).sort(), selectSubset(all, { kind: 'slice', k: 1, n: 5 }).filter((id) => !q.has(id)).sort());
  });
});

describe('verification records and states', () => {
  const [b, x, y, z] = ids(4) as [string, string, string, string];
  const rec = (run: string, time: string, damaged: Record<string, string[]>, readData = 'all'): VerificationRecord => ({
    backup: b, run, time, host: 'h', readData, disks: Object.entries(damaged).map(([name, d]) => ({ name, damaged: d })),
  });

  test('a run carries forward earlier findings still quarantined, and drops healed ones', () => {
    const prev = [rec('r1', '2025-01-01T00:00:00Z', { root: [x, y], data: [] })];
    const next = nextRecord({
      backup: b, run: 'r2', time: '2025-01-02T00:00:00Z', host: 'h', readData: '1/7', disks: ['root', 'data'],
      found: new Map([['data', new Set([z])]]), previous: prev.map((p) => p), quarantined: (c) => c !== y,
    });
    assert.deepEqual(next.disks, [{ name: 'root', damaged: [x] }, { name: 'data', damaged: [z] }]);
    assert.equal(next.readData, '1/7');
  });

  test('state: newest run says when and what; damage counts only while quarantined; concurrent records merge', () => {
    assert.equal(verificationState([], new Set()), undefined);
    const r1 = rec('r1', '2025-01-01T00:00:00Z', { root: [x], data: [] }, 'none');
    const r2 = rec('r2', '2025-01-02T00:00:00Z', { root: [], data: [z] }, '2/7');
    assert.deepEqual(verificationState([r1, r2], new Set([x, z])), {
      lastVerified: '2025-01-02T00:00:00Z', readData: '2/7', status: 'damaged', damagedDisks: ['root', 'data'], damagedChunks: 2,
    });
    assert.deepEqual(verificationState([r2, r1], new Set([x])), {
      lastVerified: '2025-01-02T00:00:00Z', readData: '2/7', status: 'damaged', damagedDisks: ['root'], damagedChunks: 1,
    });
    const healed = verificationState([r1, r2], new Set());
    assert.equal(healed?.status, 'ok');
    assert.deepEqual(healed?.damagedDisks, []);
  });
});

describe('repair verdicts', () => {
  const [c1, c2, c3] = ids(3) as [string, string, string];
  const q = (chunk: string, found: string): QuarantineEntry => ({ chunk, found, problem: 'damaged', detail: 'failed authentication', host: 'h' });
  const bk = (id: string, vm: string, time: string, chunks: (string | null)[]) => ({ id, vm, time, disks: [{ name: 'root', chunks }] });

  test('beyond healing once every VM using the chunk was backed up since without producing it; unreadable manifests too', () => {
    const [a1, a2, b1, c] = ids(4) as [string, string, string, string];
    const plan = planRepair(
      [
        bk(a1, 'vm-a', '2025-01-01T00:00:00Z', [c1, null]),
        bk(a2, 'vm-a', '2025-01-05T00:00:00Z', [c3]), // after c1 was quarantined: vm-a no longer has it
        bk(b1, 'vm-b', '2025-01-01T00:00:00Z', [c2, c1]), // vm-b also used c1, and has no backup since
        bk(c, 'vm-c', '2025-01-01T00:00:00Z', [c3]),
      ],
      [{ id: 'ff'.repeat(32), problem: 'failed authentication' }],
      [q(c1, '2025-01-03T00:00:00Z'), q(c2, '2025-01-03T00:00:00Z')],
    );
    const verdicts = new Map(plan.map((p) => [p.id, p]));
    // c1 is used by vm-a and vm-b; vm-b has no backup since: it may still heal.
    assert.equal(verdicts.get(a1)?.healable, true);
    assert.equal(verdicts.get(b1)?.healable, true);
    assert.equal(verdicts.has(a2) || verdicts.has(c), false, 'undamaged backups are not listed');
    assert.equal(verdicts.get('ff'.repeat(32))?.healable, false);

    // Once vm-b is backed up again without c1, c1 cannot come back.
    const later = planRepair(
      [bk(a1, 'vm-a', '2025-01-01T00:00:00Z', [c1]), bk(a2, 'vm-a', '2025-01-05T00:00:00Z', [c3]),
        bk(b1, 'vm-b', '2025-01-01T00:00:00Z', [c2, c1]), bk(ids(1)[0]!, 'vm-b', '2025-01-06T00:00:00Z', [c3])],
      [], [q(c1, '2025-01-03T00:00:00Z')],
    );
    assert.deepEqual(later.map((p) => [p.id, p.healable]).sort(), [[a1, false], [b1, false]].sort());
    assert.match(later[0]!.reason, /not produced again by the backups of disk root of vm-a, disk root of vm-b/);
    // A backup that started before the chunk was quarantined proves nothing.
    const early = planRepair([bk(a1, 'vm-a', '2025-01-01T00:00:00Z', [c1]), bk(a2, 'vm-a', '2025-01-02T00:00:00Z', [c3])], [], [q(c1, '2025-01-03T00:00:00Z')]);
    assert.deepEqual(early.map((p) => p.healable), [true]);
  });

  test("by disk: a later backup of a VM's other disk says nothing of the damaged disk's chunks", () => {
    const [d1, r1, d2] = ids(3) as [string, string, string];
    const disk = (name: string, chunks: string[]) => ({ name, chunks });
    const data = { id: d1, vm: 'vm-a', time: '2025-01-01T00:00:00Z', disks: [disk('data', [c1, c2])] };
    const rootOnly = { id: r1, vm: 'vm-a', time: '2025-01-05T00:00:00Z', disks: [disk('root', [c3])] };
    const plan = planRepair([data, rootOnly], [], [q(c1, '2025-01-03T00:00:00Z')]);
    assert.deepEqual(plan.map((p) => [p.id, p.healable]), [[d1, true]], 'disk data was not backed up since: its chunk may come back');
    assert.match(plan[0]!.reason, /may come back with the next backup of disk data of vm-a/);
    // A backup of disk data since, without the chunk: now it cannot.
    const dataAgain = { id: d2, vm: 'vm-a', time: '2025-01-06T00:00:00Z', disks: [disk('data', [c3, c2])] };
    assert.deepEqual(planRepair([data, rootOnly, dataAgain], [], [q(c1, '2025-01-03T00:00:00Z')]).map((p) => [p.id, p.healable]), [[d1, false]]);
  });
});

describe('verify against a real repository', () => {
  const PASSWORD = 'health test passphrase';
  const MiB = 1024 * 1024;

  async function setup() {
    const dir = await tempDir('vmvault-health-');
    const storage = new LocalStorage(`${dir.path}/repo`);
    const repo = await Repository.init(storage, PASSWORD, { kdf: 'weak', chunkSize: MiB });
    const img = await makeImage(dir.path, 'vm', 'qcow2', 8 * MiB, [0, 1, 2, 3].map((i) => ({ offset: i * MiB, length: MiB, pattern: 0x20 + i })));
    const made = await backupVm(repo, { vm: 'vm', driver: 'image', disks: [{ path: img }] });
    const chunks = made.manifest.disks[0]!.chunks.filter((c): c is string => c !== null);
    const bytes = Buffer.from(await storage.get(chunkName(chunks[1]!)));
    bytes[bytes.length - 1]! ^= 1;
    await storage.put(chunkName(chunks[1]!), bytes);
    return { dir, storage, repo, id: made.manifest.id, chunks };
  }

  test('two verifies at once both record; the state merges their records and says damaged', async () => {
    const { dir, repo, id, chunks } = await setup();
    try {
      const [r1, r2] = await Promise.all([verify(repo, { readData: true }), verify(repo, { readDataSubset: { kind: 'slice', k: 1, n: 3 } })]);
      assert.equal(r1.ok, false);
      assert.equal(r1.recorded && r2.recorded, true);
      // Both started before either recorded: the subset run finds the damage only in its own slice.
      assert.equal(r2.ok, selectSubset([chunks[1]!], { kind: 'slice', k: 1, n: 3 }).length === 0);
      const state = (await verificationStates(repo)).get(id);
      assert.equal(state?.status, 'damaged');
      assert.equal(state?.damagedChunks, 1);
      assert.ok((await readRecords(repo)).get(id)!.length >= 1);
      // A later subset run that does not read the chunk's slice keeps the finding.
      const other = [1, 2, 3].find((k) => !selectSubset([chunks[1]!], { kind: 'slice', k, n: 3 }).length)!;
      await verify(repo, { readDataSubset: { kind: 'slice', k: other, n: 3 } });
      assert.equal((await verificationStates(repo)).get(id)?.status, 'damaged');
      assert.equal((await readRecords(repo)).get(id)!.length, 1, 'older records are replaced');
    } finally {
      await dir.cleanup();
    }
  });

  test('a manifest that authenticates but this version cannot read (a newer format) is never removed by repair, and gc deletes no chunk meanwhile', async () => {
    const { dir, storage, repo, id } = await setup();
    try {
      // As a newer vmvault would write it: sealed with the repository's key, in a format this one does not know.
      const m = await repo.loadManifest(id);
      const newer = { ...m, version: 2, disks: m.disks.map((d) => ({ ...d, extents: [{ at: 0 }] })) };
      await storage.put(backupName(id), seal(repo.keys.encKey, 'manifest', compress(Buffer.from(JSON.stringify(newer))), additionalData(repo.id, 'manifest', id)));
      await assert.rejects(repo.loadManifest(id), (e: Error) => e instanceof UnreadableManifestError &&
        /authenticates with this repository's key, but this vmvault cannot read it \(manifest format 2, this vmvault reads 1\).*do not delete it/.test(e.message));
      const report = await repair(repo, { remove: true });
      assert.deepEqual(report.removed, []);
      assert.deepEqual(report.backups.map((b) => [b.id, b.otherVersion]), [[id, true]]);
      assert.ok(await storage.stat(backupName(id)), 'still there');
      const gc = await collectGarbage(repo);
      assert.equal(gc.chunksDeleted, 0);
      assert.equal(gc.damagedManifests.length, 1);
      // Random bytes do not authenticate: that is damage, and repair removes it.
      await storage.put(backupName(id), randomBytes(200));
      assert.deepEqual((await repair(repo, { remove: true })).removed, [id]);
    } finally {
      await dir.cleanup();
    }
  });

  test('repair reads quarantined chunks again: one put back intact since verify decides nothing, and --remove takes it out of quarantine', async () => {
    const { dir, storage, repo, id, chunks } = await setup();
    try {
      // The damaged chunk's intact bytes are kept aside, as if it were on a mount that came back.
      const name = chunkName(chunks[1]!);
      const damaged = Buffer.from(await storage.get(name));
      const intactBytes = Buffer.from(damaged);
      intactBytes[intactBytes.length - 1]! ^= 1;
      assert.equal((await verify(repo, { readData: true })).ok, false);
      // A newer backup of the same disk that does not produce the chunk: the entry alone would make the first backup hopeless.
      const img2 = await makeImage(dir.path, 'vm2', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x77 }]);
      const diskName = (await repo.loadManifest(id)).disks[0]!.name;
      await backupVm(repo, { vm: 'vm', driver: 'image', disks: [{ path: img2, name: diskName }] });
      const listed = await repair(repo);
      assert.deepEqual(listed.backups.map((b) => [b.id, b.healable]), [[id, false]], 'still damaged: beyond healing');
      await storage.put(name, intactBytes);
      const listing = await repair(repo);
      assert.deepEqual(listing.backups, [], 'read again, the chunk is intact: no backup is damaged');
      assert.equal(listing.intactAgain, 1);
      assert.equal(listing.quarantinedChunks, 0);
      assert.equal((await verificationStates(repo)).get(id)?.status, 'damaged', 'listing writes nothing');
      const report = await repair(repo, { remove: true });
      assert.deepEqual(report.removed, []);
      assert.equal(report.released, 1);
      assert.ok(await storage.stat(backupName(id)), 'the backup is kept');
      assert.equal((await verificationStates(repo)).get(id)?.status, 'ok', 'out of quarantine');
    } finally {
      await dir.cleanup();
    }
  });

  test('a repository that cannot be written: verify reports everything and warns that nothing was recorded', async () => {
    const { dir, storage, id } = await setup();
    try {
      // Writable for locks only (the lock fallback for read-only repositories is locks.ts's business).
      const refuse = async (name: string) => {
        if (!name.startsWith('locks/')) throw new VmvaultError('STORAGE', `cannot write object "${name}": the file system is read-only (EROFS)`);
      };
      const readOnly: Storage = {
        location: storage.location,
        get: (n, o) => storage.get(n, o), stat: (n) => storage.stat(n), list: (p) => storage.list(p), close: () => storage.close(),
        put: async (n, d) => { await refuse(n); await storage.put(n, d); },
        delete: async (n) => { await refuse(n); await storage.delete(n); },
      };
      const ro = await Repository.open(readOnly, PASSWORD);
      const report = await verify(ro, { readData: true });
      assert.equal(report.ok, false);
      assert.equal(report.problems.length, 1);
      assert.equal(report.recorded, false);
      assert.equal(report.warnings.length, 1);
      assert.match(report.warnings[0]!, /could not be recorded.*read-only/);
      assert.ok(!report.warnings[0]!.includes(PASSWORD));
      const rw = await Repository.open(storage, PASSWORD);
      assert.equal((await verificationStates(rw)).get(id), undefined, 'nothing was written');
    } finally {
      await dir.cleanup();
    }
  });
});

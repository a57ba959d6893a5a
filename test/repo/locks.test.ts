import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Repository } from '../../src/repo/repository.js';
import { acquireLock, readLocks } from '../../src/repo/locks.js';
import { LocalStorage } from '../../src/storage/local.js';

async function repo(): Promise<{ repo: Repository; cleanup(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-locks-'));
  return { repo: await Repository.init(new LocalStorage(dir), 'pw', { kdf: 'weak' }), cleanup: () => rm(dir, { recursive: true, force: true }) };
}

test('shared locks coexist; the exclusive lock excludes them and they exclude it', async () => {
  const { repo: r, cleanup } = await repo();
  try {
    const a = await acquireLock(r, 'shared', { purpose: 'backup a' });
    const b = await acquireLock(r, 'shared', { purpose: 'backup b' });
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc' }), (e: any) => e.code === 'LOCKED' && /shared lock for backup a/.test(e.message));
    assert.equal((await readLocks(r)).length, 2, 'the refused exclusive lock removed itself');
    await a.release();
    await b.release();
    const gc = await acquireLock(r, 'exclusive', { purpose: 'gc' });
    await assert.rejects(acquireLock(r, 'shared', { purpose: 'backup c' }), /exclusive lock for gc/);
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc 2' }), /LOCKED|locked/);
    await gc.release();
    assert.deepEqual(await readLocks(r), []);
  } finally {
    await cleanup();
  }
});

test('a lock whose holder stopped refreshing expires, and the next acquirer removes it', async () => {
  const { repo: r, cleanup } = await repo();
  try {
    let clock = Date.now();
    const crashed = await acquireLock(r, 'shared', { purpose: 'crashed backup', ttlMs: 60_000, now: () => clock });
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc', now: () => clock }), /crashed backup/);
    clock += 61_000;
    const gc = await acquireLock(r, 'exclusive', { purpose: 'gc', now: () => clock });
    const left = await readLocks(r, clock);
    assert.deepEqual(left.map((l) => l.id), [gc.id], 'the stale lock was removed');
    await gc.release();
    await crashed.release(); // idempotent even though it was removed
  } finally {
    await cleanup();
  }
});

test('refresh extends a lock', async () => {
  const { repo: r, cleanup } = await repo();
  try {
    let clock = Date.now();
    const held = await acquireLock(r, 'shared', { purpose: 'long backup', ttlMs: 60_000, now: () => clock });
    clock += 50_000;
    await held.refresh();
    clock += 50_000;
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc', now: () => clock }), /long backup/);
    await held.release();
  } finally {
    await cleanup();
  }
});

test('confirm() passes for a live lock, and fails when it lapsed or was removed as stale', async () => {
  const { repo: r, cleanup } = await repo();
  try {
    let clock = Date.now();
    const held = await acquireLock(r, 'shared', { purpose: 'backup x', ttlMs: 60_000, now: () => clock });
    await held.confirm();
    clock += 61_000; // no refresh for longer than the lock lives: gc may have run
    await assert.rejects(held.confirm(), (e: any) => e.code === 'LOCKED' && e.retriable && /backup x was lost \(not refreshed/.test(e.message));
    await held.refresh();
    await held.confirm();
    await r.storage.delete(`locks/${held.id}`); // as the next acquirer does with a stale lock
    await assert.rejects(held.confirm(), /removed it as stale/);
    await held.release();
  } finally {
    await cleanup();
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Repository } from '../../src/repo/repository.js';
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { additionalData, seal } from '../../src/crypto/seal.js';
import { execa } from 'execa';
import { VmvaultError } from '../../src/errors.js';
import { acquireLock, heldByDeadProcess, readLocks, readLocksNow, withLock, withReadLock } from '../../src/repo/locks.js';
import { collectGarbage } from '../../src/repo/gc.js';
import { LocalStorage } from '../../src/storage/local.js';
import { faulty, httpError, networkError, type FaultyStorage } from '../../src/storage/faulty.js';
import { readOnly } from '../../src/storage/read-only.js';
import { writeRefusal } from '../../src/storage/refusal.js';
import type { Storage } from '../../src/storage/storage.js';
import { waitFor } from '../helpers/procs.js';

async function repo(): Promise<{ repo: Repository; dir: string; cleanup(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-locks-'));
  return { repo: await Repository.init(new LocalStorage(dir), 'pw', { kdf: 'weak' }), dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Makes lock `id`'s last write `ms` older on the storage's clock (its file's mtime), as time passing without a refresh does. */
async function age(dir: string, id: string, ms: number): Promise<void> {
  const file = join(dir, 'locks', id);
  const { mtimeMs } = await stat(file);
  await utimes(file, new Date(), new Date(mtimeMs - ms));
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
  const { repo: r, dir, cleanup } = await repo();
  try {
    const crashed = await acquireLock(r, 'shared', { purpose: 'crashed backup', ttlMs: 60_000 });
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc' }), /crashed backup/);
    await age(dir, crashed.id, 50_000);
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc' }), /crashed backup/, 'within its lifetime on the storage clock');
    await age(dir, crashed.id, 11_000);
    const gc = await acquireLock(r, 'exclusive', { purpose: 'gc' });
    const left = await readLocks(r);
    assert.deepEqual(left.map((l) => l.id), [gc.id], 'the stale lock was removed');
    await gc.release();
    await crashed.release(); // idempotent even though it was removed
  } finally {
    await cleanup();
  }
});

test('refresh extends a lock', async () => {
  const { repo: r, dir, cleanup } = await repo();
  try {
    let clock = Date.now();
    const held = await acquireLock(r, 'shared', { purpose: 'long backup', ttlMs: 60_000, now: () => clock });
    clock += 50_000;
    await age(dir, held.id, 50_000);
    await held.refresh();
    clock += 50_000;
    await age(dir, held.id, 50_000);
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc', now: () => clock }), /long backup/);
    await held.release();
  } finally {
    await cleanup();
  }
});

test("hosts' clocks that disagree by an hour make no live lock stale: expiry is judged on the storage's clock", async () => {
  const { repo: r, dir, cleanup } = await repo();
  const hour = 60 * 60 * 1000;
  try {
    // A gc on a host whose clock is an hour behind: the expiry it writes has passed on every other host's clock.
    const gc = await acquireLock(r, 'exclusive', { purpose: 'gc behind', now: () => Date.now() - hour });
    await assert.rejects(acquireLock(r, 'shared', { purpose: 'backup' }), (e: any) => e.code === 'LOCKED' && /exclusive lock for gc behind/.test(e.message));
    assert.equal(await r.storage.stat(`locks/${gc.id}`).then((s) => s !== undefined), true, 'the live lock was not removed');
    // The other way round: a backup on a host whose clock is an hour ahead sees a correct host's lock expired.
    await assert.rejects(acquireLock(r, 'shared', { purpose: 'backup ahead', now: () => Date.now() + hour }), /exclusive lock for gc behind/);
    // A full repository's gc reads locks without writing one: one wrong clock (the holder's) does not make it stale there either.
    const found = await readLocks(r);
    assert.equal(found.find((l) => l.id === gc.id)?.stale, false);
    // unlock learns the storage's time by writing a lock of its own for one listing, removed after.
    const now = await readLocksNow(r, 'unlock');
    assert.deepEqual(now.map((l) => [l.id, l.stale]), [[gc.id, false]]);
    assert.deepEqual((await readLocks(r)).map((l) => l.id), [gc.id], 'the probe is gone');
    await age(dir, gc.id, 61 * 60 * 1000);
    assert.deepEqual((await readLocksNow(r, 'unlock')).map((l) => [l.id, l.stale]), [[gc.id, true]], 'stale once not written for its lifetime on the storage clock');
    await gc.release();
    // A lock of an earlier version (no lifetime recorded), written by a host an hour behind:
    // it lives the default 30 minutes, also on the storage's clock.
    const old = { id: randomBytes(16).toString('hex') };
    const body = { kind: 'shared', host: 'elsewhere', pid: 1, purpose: 'old backup', created: new Date(Date.now() - hour).toISOString(), expires: new Date(Date.now() - hour + 60_000).toISOString() };
    await r.storage.put(`locks/${old.id}`, seal(r.keys.encKey, 'lock', Buffer.from(JSON.stringify(body)), additionalData(r.id, 'lock', old.id)));
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc' }), /old backup/);
    await age(dir, old.id, 29 * 60 * 1000);
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc' }), /old backup/, 'within the default lifetime');
    await age(dir, old.id, 2 * 60 * 1000);
    const next = await acquireLock(r, 'exclusive', { purpose: 'gc' });
    assert.deepEqual((await readLocks(r)).map((l) => l.id), [next.id], 'stale once not written for its lifetime');
    await next.release();
  } finally {
    await cleanup();
  }
});

test('confirm() passes for a live lock, and fails when it lapsed or was removed as stale; a lost lock stays lost', async () => {
  const { repo: r, cleanup } = await repo();
  try {
    let clock = Date.now();
    const held = await acquireLock(r, 'shared', { purpose: 'backup x', ttlMs: 60_000, now: () => clock });
    await held.confirm();
    await held.check();
    clock += 61_000; // no refresh for longer than the lock lives: gc may have run
    await assert.rejects(held.confirm(), (e: any) => e.code === 'LOCKED' && e.retriable && /backup x was lost \(not refreshed/.test(e.message));
    // A refresh after the lapse (a suspended process waking up) must not write it back: another process may have removed it and gone on.
    await r.storage.delete(`locks/${held.id}`);
    await assert.rejects(held.refresh(), /backup x was lost \(not refreshed/);
    assert.equal(await r.storage.stat(`locks/${held.id}`), undefined, 'not written back');
    await assert.rejects(held.check(), /was lost/);
    await held.release();

    const other = await acquireLock(r, 'shared', { purpose: 'backup y', ttlMs: 60_000, now: () => clock });
    await r.storage.delete(`locks/${other.id}`); // as the next acquirer does with a lock it takes for stale (clocks of two hosts disagree)
    await assert.rejects(other.check(), /backup y was lost \(another process removed it as stale\)/);
    await assert.rejects(other.refresh(), /removed it as stale/);
    assert.equal(await r.storage.stat(`locks/${other.id}`), undefined, 'not written back');
    await other.release();
  } finally {
    await cleanup();
  }
});

async function repoOn(wrap: (s: LocalStorage) => Storage, warnings: string[]): Promise<{ repo: Repository; storage: Storage; cleanup(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-locks-'));
  await Repository.init(new LocalStorage(dir), 'pw', { kdf: 'weak' });
  const storage = wrap(new LocalStorage(dir));
  const repo = await Repository.open(storage, 'pw', { onWarning: (m) => warnings.push(m) });
  return { repo, storage, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

test('writeRefusal: read-only and full, along the cause chain; anything else is not a refusal', () => {
  const wrapped = (cause: unknown) => new VmvaultError('STORAGE', 'wrapped', { cause });
  assert.equal(writeRefusal(wrapped(networkError('EROFS'))), 'read-only');
  assert.equal(writeRefusal(wrapped(networkError('EACCES'))), 'read-only');
  assert.equal(writeRefusal(networkError('EPERM')), 'read-only');
  assert.equal(writeRefusal(wrapped(networkError('ENOSPC'))), 'full');
  assert.equal(writeRefusal(wrapped(networkError('EDQUOT'))), 'full');
  assert.equal(writeRefusal(wrapped(httpError(403, 'AccessDenied'))), 'read-only');
  assert.equal(writeRefusal(wrapped(httpError(403, 'Http403'))), 'read-only');
  for (const e of [networkError('ECONNRESET'), httpError(500, 'InternalError'), httpError(404, 'NoSuchKey'), new Error('x'), undefined, 'EROFS']) {
    assert.equal(writeRefusal(wrapped(e)), undefined, String(e));
  }
});

test('withReadLock goes on without a lock, with a warning, when the storage refuses writes; writers and other errors do not', async () => {
  for (const [what, wrap] of [
    ['read-only wrapper', (s: LocalStorage) => readOnly(s, 'test')],
    ['EACCES', (s: LocalStorage) => faulty(s, { put: [{ error: networkError('EACCES'), times: Infinity }] })],
    ['S3 AccessDenied', (s: LocalStorage) => faulty(s, { put: [{ error: httpError(403, 'AccessDenied'), times: Infinity }] })],
    ['full', (s: LocalStorage) => faulty(s, { put: [{ error: networkError('ENOSPC'), times: Infinity }] })],
  ] as const) {
    const warnings: string[] = [];
    const { repo: r, cleanup } = await repoOn(wrap, warnings);
    try {
      assert.equal(await withReadLock(r, 'restore', async () => 'read'), 'read', what);
      assert.equal(warnings.length, 1, what);
      assert.match(warnings[0]!, /no lock was taken for restore: .* refuses writes/, what);
      // gc --dry-run only reads: it runs as a reader does; gc itself needs its lock.
      const dry = await collectGarbage(r, { dryRun: true });
      assert.equal(dry.dryRun, true, what);
      assert.match(warnings[1]!, /no lock was taken for garbage collection \(dry run\)/, what);
      // (A full repository's gc first frees what it can without its lock: gc's own tests.)
      if (what !== 'full') await assert.rejects(collectGarbage(r), (e: any) => e.code === 'STORAGE' && /garbage collection cannot run/.test(e.message), what);
      await assert.rejects(withLock(r, 'shared', { purpose: 'backup of x' }, async () => 'never'),
        (e: any) => e.code === 'STORAGE' && /^backup of x cannot run: the repository at .* (is read-only for this process|is full)/.test(e.message), what);
    } finally {
      await cleanup();
    }
  }
  const warnings: string[] = [];
  const { repo: r, cleanup } = await repoOn((s) => faulty(s, { put: [{ error: httpError(400, 'BadRequest'), times: Infinity }] }), warnings);
  try {
    let ran = false;
    await assert.rejects(withReadLock(r, 'restore', async () => { ran = true; }), /BadRequest/);
    assert.equal(ran, false, 'an error that is not a refusal stops the read: it may be a broken lock check');
  } finally {
    await cleanup();
  }
});

test('withReadLock takes no lock and warns of nothing with --no-lock; the storage then refuses every write', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-locks-'));
  try {
    await Repository.init(new LocalStorage(dir), 'pw', { kdf: 'weak' });
    const warnings: string[] = [];
    const r = await Repository.open(new LocalStorage(dir), 'pw', { noLock: true, onWarning: (m) => warnings.push(m) });
    assert.equal(await withReadLock(r, 'verify', async () => (await readLocks(r)).length), 0);
    assert.deepEqual(warnings, []);
    await assert.rejects(r.addKey('other', 'weak'), /read-only for this process \(opened with --no-lock/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test("withLock: when the work fails and so does the release, the work's error is thrown and the lock left behind is a warning", async () => {
  const warnings: string[] = [];
  const { repo: r, storage, cleanup } = await repoOn((s) => faulty(s), warnings);
  const f = storage as FaultyStorage;
  try {
    const upload = new VmvaultError('STORAGE', 'put of object "chunks/ab/x" failed: the storage may be down');
    await assert.rejects(withLock(r, 'shared', { purpose: 'backup of vm' }, async (lock) => {
      f.inject('delete', { error: new VmvaultError('STORAGE', `delete of object "locks/${lock.id}" failed`), times: Infinity });
      throw upload;
    }), (e) => e === upload);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /the lock locks\/[0-9a-f]+ of backup of vm could not be removed \(delete of object .*\): it expires by itself within 30 minutes/);
    // The same when the work succeeded: its result stands.
    assert.equal(await withLock(r, 'shared', { purpose: 'backup of vm' }, async () => 'committed'), 'committed');
    assert.equal(warnings.length, 2);
  } finally {
    await cleanup();
  }
});

test('an unreadable lock: shared lockers go on with a warning, the exclusive one refuses until unlock; a dead local process is recognised', async () => {
  const warnings: string[] = [];
  const { repo: r, cleanup } = await repoOn((s) => s, warnings);
  try {
    await r.storage.put('locks/0123456789abcdef0123456789abcdef', Buffer.from('garbage'));
    const found = await readLocks(r);
    assert.equal(found.length, 1);
    assert.match(found[0]!.damaged ?? '', /not a vmvault object/);
    const shared = await acquireLock(r, 'shared', { purpose: 'backup a' });
    await shared.release();
    assert.match(warnings.join('\n'), /lock locks\/0123456789abcdef0123456789abcdef cannot be read .*vmvault unlock.*backup a goes on/);
    await assert.rejects(acquireLock(r, 'exclusive', { purpose: 'gc' }), (e: any) => e.code === 'LOCKED' && /gc needs the exclusive lock, and lock locks\/0123/.test(e.message));
    assert.equal((await readLocks(r)).length, 1, 'the refused lock removed itself');

    const child = await execa(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    const body = { kind: 'shared' as const, host: hostname(), purpose: 'x', created: '', expires: '' };
    assert.equal(heldByDeadProcess({ ...body, pid: Number(child.stdout) }), true);
    assert.equal(heldByDeadProcess({ ...body, pid: process.pid }), false, 'our own');
    assert.equal(heldByDeadProcess({ ...body, pid: 1 }), false, 'alive');
    assert.equal(heldByDeadProcess({ ...body, host: 'another-host', pid: Number(child.stdout) }), false, 'another host: cannot tell');
  } finally {
    await cleanup();
  }
});

test('a lock whose holder is gone from this host (a gc killed) refuses with the way out: the process is named gone, and "vmvault unlock" is what to run', async () => {
  const { repo: r, cleanup } = await repo();
  try {
    // A process that takes the exclusive lock and dies without releasing it, as a killed gc does.
    const src = (m: string) => new URL(`../../src/${m}`, import.meta.url).href;
    const script = `const { Repository } = await import(${JSON.stringify(src('repo/repository.js'))});
      const { LocalStorage } = await import(${JSON.stringify(src('storage/local.js'))});
      const { acquireLock } = await import(${JSON.stringify(src('repo/locks.js'))});
      const r = await Repository.open(new LocalStorage(${JSON.stringify(r.storage.location)}), 'pw', { cacheDir: false });
      await acquireLock(r, 'exclusive', { purpose: 'garbage collection' });
      process.stdout.write(String(process.pid));
      process.exit(0);`;
    const file = join(tmpdir(), `vmvault-lock-holder-${process.pid}.mjs`);
    await writeFile(file, script);
    const child = await execa(process.execPath, [file]).finally(() => rm(file, { force: true }));
    await assert.rejects(acquireLock(r, 'shared', { purpose: 'backup of web' }), (e: VmvaultError) => e.code === 'LOCKED' &&
      e.message.includes(`exclusive lock for garbage collection by ${hostname()} pid ${child.stdout}`) &&
      e.message.includes(`process ${child.stdout} is gone from this host (killed or crashed): run "vmvault unlock" to remove its lock, then try again`));
    // Nothing removes it behind the operator's back: it stands until unlock (or its expiry).
    const held = await acquireLock(r, 'shared', { purpose: 'restore' }).catch(() => undefined);
    assert.equal(held, undefined, 'the dead exclusive lock still stands until unlock');
    // Not worth waiting for (--retry-lock): refused at once, with the way out.
    const at = Date.now();
    await assert.rejects(acquireLock(r, 'shared', { purpose: 'backup of web', wait: { ms: 600_000 } }), (e: VmvaultError) => e.code === 'LOCKED' && /run "vmvault unlock"/.test(e.message));
    assert.ok(Date.now() - at < 60_000, 'not waited for');
  } finally {
    await cleanup();
  }
});

test('a lock wait (--retry-lock): a backup waits for gc to finish and gc for the backups, trying again; no wait fails at once', async () => {
  const { repo: r, dir, cleanup } = await repo();
  try {
    const warnings: string[] = [];
    const waiting = await Repository.open(new LocalStorage(dir), 'pw', { cacheDir: false, onWarning: (m) => warnings.push(m), lockWait: { ms: 30_000 } });
    const gc = await acquireLock(r, 'exclusive', { purpose: 'garbage collection' });
    await assert.rejects(acquireLock(r, 'shared', { purpose: 'backup of web' }), (e: VmvaultError) => e.code === 'LOCKED' && !/waited/.test(e.message), 'no wait: at once');
    const backup = acquireLock(waiting, 'shared', { purpose: 'backup of web' });
    // The waiter says once what it waits for, and leaves no lock of its own while it waits.
    await waitFor('the waiter\'s notice', () => warnings.length > 0, 20_000, undefined, 10);
    assert.match(warnings[0]!, /^backup of web is waiting for the repository's lock \(exclusive lock for garbage collection by .* pid \d+ since .*\), up to \d+ s more$/);
    await new Promise((res) => setTimeout(res, 700)); // at least one more try (the first delay is 0.25-0.75 s)
    assert.equal(warnings.length, 1, 'said once while the holder stays the same');
    // Between its tries the waiter holds no lock (each try writes one, finds gc's, and removes it).
    await waitFor('only the holder\'s lock', async () => JSON.stringify((await readLocks(r)).map((l) => l.lock?.purpose)) === '["garbage collection"]', 20_000, undefined, 20);
    await gc.release();
    const held = await backup;
    assert.deepEqual((await readLocks(r)).map((l) => l.lock?.purpose), ['backup of web']);
    // The other way round: gc waits for the backup.
    const gcWaits = acquireLock(waiting, 'exclusive', { purpose: 'garbage collection' });
    await waitFor('gc\'s notice', () => warnings.length > 1, 20_000, undefined, 10);
    assert.match(warnings[1]!, /^garbage collection is waiting for the repository's lock \(shared lock for backup of web by /);
    await held.release();
    await (await gcWaits).release();
    assert.deepEqual(await readLocks(r), []);
  } finally {
    await cleanup();
  }
});

test('a lock wait ends: LOCKED saying how long it waited; its signal (Ctrl-C) ends it at once with its reason; a damaged lock is never waited for', async () => {
  const { repo: r, dir, cleanup } = await repo();
  try {
    const open = (lockWait: { ms: number; signal?: AbortSignal }) => Repository.open(new LocalStorage(dir), 'pw', { cacheDir: false, onWarning: () => {}, lockWait });
    const gc = await acquireLock(r, 'exclusive', { purpose: 'garbage collection' });
    const began = Date.now();
    await assert.rejects(acquireLock(await open({ ms: 1500 }), 'shared', { purpose: 'backup of web' }),
      (e: VmvaultError) => e.code === 'LOCKED' && e.retriable && /exclusive lock for garbage collection.*\(waited \d+ s for it, as --retry-lock allows: a longer wait may be enough\)$/.test(e.message));
    assert.ok(Date.now() - began >= 1500, 'waited the whole wait');
    const stop = new AbortController();
    const reason = new VmvaultError('BAD_INPUT', 'the backup was interrupted (SIGINT): nothing was saved');
    const interrupted = acquireLock(await open({ ms: 600_000, signal: stop.signal }), 'shared', { purpose: 'backup of web' });
    setTimeout(() => stop.abort(reason), 300);
    await assert.rejects(interrupted, (e) => e === reason, 'the signal\'s reason, not a ten-minute wait');
    assert.deepEqual((await readLocks(r)).map((l) => l.lock?.purpose), ['garbage collection'], 'nothing left by the waiters');
    await gc.release();
    // A lock that cannot be read needs "vmvault unlock": gc's refusal comes at once, however long the wait.
    await writeFile(join(dir, 'locks', '0123456789abcdef0123456789abcdef'), 'not a lock');
    const at = Date.now();
    await assert.rejects(acquireLock(await open({ ms: 600_000 }), 'exclusive', { purpose: 'gc' }), (e: VmvaultError) => e.code === 'LOCKED' && /cannot be read/.test(e.message));
    assert.ok(Date.now() - at < 60_000, 'not waited for');
  } finally {
    await cleanup();
  }
});

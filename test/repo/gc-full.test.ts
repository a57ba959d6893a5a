/**
 * gc on a full repository, before it can take its lock: a live lock of another process
 * means waiting for that work to fail; a lock whose holder this host's process table
 * proves gone (a backup killed with kill -9) is never released, and gc says to run
 * "vmvault unlock" instead of waiting.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { VmvaultError } from '../../src/errors.js';
import { collectGarbage } from '../../src/repo/gc.js';
import { acquireLock } from '../../src/repo/locks.js';
import { Repository } from '../../src/repo/repository.js';
import { faulty, networkError } from '../../src/storage/faulty.js';
import { LocalStorage } from '../../src/storage/local.js';

/** Takes a shared lock in a child process that exits without releasing it, as a killed backup does; returns its pid. */
async function lockOfGoneProcess(dir: string): Promise<string> {
  const src = (m: string) => new URL(`../../src/${m}`, import.meta.url).href;
  const script = `const { Repository } = await import(${JSON.stringify(src('repo/repository.js'))});
    const { LocalStorage } = await import(${JSON.stringify(src('storage/local.js'))});
    const { acquireLock } = await import(${JSON.stringify(src('repo/locks.js'))});
    const r = await Repository.open(new LocalStorage(${JSON.stringify(dir)}), 'pw', { cacheDir: false });
    await acquireLock(r, 'shared', { purpose: 'backup of web' });
    process.stdout.write(String(process.pid));
    process.exit(0);`;
  const file = join(tmpdir(), `vmvault-gc-lock-holder-${process.pid}.mjs`);
  await writeFile(file, script);
  return (await execa(process.execPath, [file]).finally(() => rm(file, { force: true }))).stdout;
}

test('gc on a full repository: a lock of a process gone from this host is named, with "vmvault unlock" as the way out; a live one is waited for', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-gc-full-'));
  try {
    await Repository.init(new LocalStorage(dir), 'pw', { kdf: 'weak' });
    const pid = await lockOfGoneProcess(dir);
    // Every write fails for want of space: gc's own lock does not fit.
    const full = faulty(new LocalStorage(dir), { put: [{ error: networkError('ENOSPC'), times: Infinity }] });
    const repo = await Repository.open(full, 'pw', { cacheDir: false });
    await assert.rejects(collectGarbage(repo), (e: VmvaultError) => {
      assert.equal(e.code, 'LOCKED');
      assert.ok(e.message.includes(`shared lock for backup of web by ${hostname()} pid ${pid}`), e.message);
      assert.ok(e.message.includes(`process ${pid} is gone from this host (killed or crashed): run "vmvault unlock" to remove its lock, then run gc again`), e.message);
      assert.ok(!e.message.includes('will fail for want of space'), e.message);
      return true;
    });

    // A holder still running (this process, through another session): its work will fail and release it.
    const writer = await Repository.open(new LocalStorage(dir), 'pw', { cacheDir: false });
    const live = await acquireLock(writer, 'shared', { purpose: 'backup of db' });
    try {
      await assert.rejects(collectGarbage(repo), (e: VmvaultError) => {
        assert.equal(e.code, 'LOCKED');
        assert.ok(e.message.includes(`process ${pid} is gone from this host`), e.message);
        assert.ok(e.message.includes('once the other work has failed for want of space and released its lock'), e.message);
        return true;
      });
    } finally {
      await live.release();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

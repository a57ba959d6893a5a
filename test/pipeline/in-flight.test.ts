/**
 * How many chunks a backup keeps in flight comes from the repository's storage
 * (Storage.chunksInFlight): a directory asks for fewer than S3, and every wrapper
 * openStorage puts around a backend passes the figure on. Checked on real backups of
 * a real image through a storage whose chunk writes are slow, so that chunks pile up
 * behind them as far as the backup lets them.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { openStorage } from '../../src/storage/open.js';
import { readOnly } from '../../src/storage/read-only.js';
import { withAdaptiveConcurrency } from '../../src/storage/throttle.js';
import { DEFAULT_CHUNKS_IN_FLIGHT, type GetOptions, type Storage } from '../../src/storage/storage.js';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { compareImages } from '../../src/disk/qemu.js';
import { makeImage, tempDir } from '../helpers/images.js';

const PASSWORD = 'in-flight test passphrase';
const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A directory storage that asks for `chunksInFlight` and records how many chunk writes ran at once. */
class SlowChunkWrites implements Storage {
  private running = 0;
  maxRunning = 0;
  constructor(private readonly inner: Storage, readonly chunksInFlight: number) {}
  get location() { return this.inner.location; }
  get(name: string, opts?: GetOptions) { return this.inner.get(name, opts); }
  async put(name: string, data: Uint8Array) {
    if (!name.startsWith('chunks/')) return this.inner.put(name, data);
    this.maxRunning = Math.max(this.maxRunning, ++this.running);
    try {
      await sleep(40);
      await this.inner.put(name, data);
    } finally {
      this.running--;
    }
  }
  stat(name: string) { return this.inner.stat(name); }
  delete(name: string) { return this.inner.delete(name); }
  list(prefix: string) { return this.inner.list(prefix); }
  close() { return this.inner.close(); }
}

describe('chunks in flight', () => {
  test('a directory asks for 6, S3 for the default; openStorage and the wrappers pass the figure on', () => {
    assert.equal(new LocalStorage('/nonexistent').chunksInFlight, 6);
    assert.equal(openStorage('/nonexistent/repo').chunksInFlight, 6);
    assert.equal(readOnly(withAdaptiveConcurrency(new LocalStorage('/nonexistent')), 'test').chunksInFlight, 6);
    const s3 = openStorage('s3://bucket/prefix?endpoint=http://127.0.0.1:1');
    assert.equal(s3.chunksInFlight ?? DEFAULT_CHUNKS_IN_FLIGHT, 10);
  });

  test('a backup keeps at most what the storage asks for in flight, and restores identical', async () => {
    const dir = await tempDir('vmvault-inflight-');
    try {
      // 16 chunks of 1 MiB, each different: every one is new and written.
      const src = await makeImage(dir.path, 'src.qcow2', 'qcow2', 16 * MiB,
        Array.from({ length: 16 }, (_, i) => ({ offset: i * MiB, length: MiB, pattern: 0x11 + i * 13 })));
      const seen: number[] = [];
      for (const asked of [2, 7]) {
        const storage = new SlowChunkWrites(new LocalStorage(join(dir.path, `repo-${asked}`)), asked);
        await Repository.init(storage, PASSWORD, { kdf: 'weak', chunkSize: MiB });
        const repo = await Repository.open(storage, PASSWORD, { cacheDir: false, onWarning: () => {} });
        const made = await backupVm(repo, { vm: 'vm', driver: 'image', disks: [{ path: src, format: 'qcow2' }] });
        assert.equal(made.stats.chunksNew, 16);
        assert.ok(storage.maxRunning <= asked, `at most ${asked} chunk writes at once, saw ${storage.maxRunning}`);
        seen.push(storage.maxRunning);
        const out = await restore(repo, { backupId: made.manifest.id, to: join(dir.path, `out-${asked}`), format: 'qcow2' });
        const disk = out.files.find((f) => f.kind === 'disk')!.path;
        assert.ok((await compareImages(src, disk, 'qcow2', 'qcow2')).identical, 'restored identical');
      }
      // The window is what limits them: with more asked for, more chunks wait on the slow writes together.
      assert.ok(seen[1]! > seen[0]!, `more writes at once with 7 in flight than with 2 (${seen.join(' vs ')})`);
    } finally {
      await dir.cleanup();
    }
  });
});

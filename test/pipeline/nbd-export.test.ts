/**
 * A backup's disk served over NBD, read by stock qemu tools: qemu-img convert gives
 * back the source byte for byte, qemu-img map sees the zero chunks as holes, qemu-nbd
 * lists the export and its base:allocation context, writes are refused, a tampered
 * chunk is an I/O error for the client (never wrong bytes), and ten concurrent
 * readers of a `vmvault export` process keep its memory bounded.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { backupVm } from '../../src/vm/drivers.js';
import { exportBackupDisk, parseListen } from '../../src/pipeline/nbd-export.js';
import { NbdClient } from '../../src/disk/nbd.js';
import { VmvaultError } from '../../src/errors.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type PatternWrite, type TempDir } from '../helpers/images.js';
import { start, stopProc, waitFor } from '../helpers/procs.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
/** Data in chunks 0, 2-3 and 10; chunks 1, 4-9 and 11-15 are zero (the default 4 MiB chunks). */
const WRITES: PatternWrite[] = [
  { offset: 64 * KiB, length: 1 * MiB, pattern: 0x11 },
  { offset: 9 * MiB, length: 6 * MiB, pattern: 0x22 },
  { offset: 40 * MiB + 4 * KiB, length: 4 * KiB, pattern: 0x33 },
];

let dir: TempDir;
let repo: Repository;
let src: string;
let backupId: string;
const repoPath = () => join(dir.path, 'repo');

before(async () => {
  dir = await tempDir('vmvault-nbd-export-');
  repo = await Repository.init(new LocalStorage(repoPath()), 'export test', { kdf: 'weak' });
  src = await makeImage(dir.path, 'src.raw', 'raw', SIZE, WRITES);
  const { manifest } = await backupVm(repo, { vm: 'vm1', driver: 'image', disks: [{ path: src, name: 'root', format: 'raw' }] });
  backupId = manifest.id;
});

after(async () => {
  await dir?.cleanup();
});

describe('NBD export read by qemu tools', () => {
  test('qemu-img convert from the export equals the source; map shows the zero chunks as holes; qemu-nbd lists it', async () => {
    const sock = join(dir.path, 'a.sock');
    const exp = await exportBackupDisk({ repo, backupId, disk: 'root', listen: `unix:${sock}` });
    try {
      assert.equal(exp.uri, `nbd+unix:///root?socket=${sock}`);
      assert.equal(exp.size, SIZE);
      const out = join(dir.path, 'out.raw');
      await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', exp.uri, out]);
      await execa('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, out]);

      const map = JSON.parse((await execa('qemu-img', ['map', '--output=json', '-f', 'raw', exp.uri])).stdout) as { start: number; length: number; data: boolean; zero: boolean }[];
      const data = map.filter((e) => e.data).map((e) => [e.start, e.length]);
      assert.deepEqual(data, [[0, 4 * MiB], [8 * MiB, 8 * MiB], [40 * MiB, 4 * MiB]]);
      assert.ok(map.filter((e) => !e.data).every((e) => e.zero), 'every hole reads as zeros');

      const list = (await execa('qemu-nbd', ['-L', '-k', sock])).stdout;
      assert.match(list, /export: 'root'/);
      assert.match(list, /size:\s+67108864/);
      assert.match(list, /readonly/);
      assert.match(list, /base:allocation/);
    } finally {
      await exp.close();
    }
  });

  test('over TCP on loopback, with a port chosen by the system; only the name with its secret reaches the disk, and no reply or log tells it', async () => {
    const logged: string[] = [];
    const log = { info: (o: object, m: string) => logged.push(`${m} ${JSON.stringify(o)}`), warn: (o: object, m: string) => logged.push(`${m} ${JSON.stringify(o)}`) };
    const exp = await exportBackupDisk({ repo, backupId, disk: 'root', listen: '127.0.0.1:0', log });
    try {
      const m = /^nbd:\/\/127\.0\.0\.1:(\d+)\/root\.([0-9a-f]{32})$/.exec(exp.uri);
      assert.ok(m, exp.uri);
      assert.doesNotMatch(exp.uri, /:0\//);
      await execa('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, exp.uri]);
      const [, port, secret] = m;
      // Anyone who can reach the port: the disk's name, the default (empty) name, a guess, and the list of exports.
      for (const guess of [`nbd://127.0.0.1:${port}/root`, `nbd://127.0.0.1:${port}`, `nbd://127.0.0.1:${port}/root.${'0'.repeat(32)}`]) {
        const r = await execa('qemu-img', ['info', '-f', 'raw', guess], { reject: false });
        assert.notEqual(r.exitCode, 0, `${guess} was refused`);
        assert.doesNotMatch(r.stderr, new RegExp(secret!), 'the refusal does not tell the name');
      }
      const list = await execa('qemu-nbd', ['--list', '-b', '127.0.0.1', '-p', port!], { reject: false });
      assert.doesNotMatch(`${list.stdout}${list.stderr}`, new RegExp(secret!), 'NBD_OPT_LIST names nothing');
      assert.ok(logged.some((l) => l.includes('NBD export listening')), logged.join('\n'));
      assert.ok(!logged.some((l) => l.includes(secret!)), 'logs show the URI without its secret');
      assert.equal(exp.shownUri, `nbd://127.0.0.1:${port}/root.…`);
    } finally {
      await exp.close();
    }
  });

  test('writes are refused with EPERM; reads of the same connection go on; holes and data read right', async () => {
    const sock = join(dir.path, 'w.sock');
    const exp = await exportBackupDisk({ repo, backupId, disk: 'root', listen: `unix:${sock}` });
    const client = await NbdClient.connect(sock, { exportName: 'root' });
    try {
      assert.equal(client.readOnly, true);
      await assert.rejects(client.write(0, Buffer.alloc(4096, 1)), (err: unknown) => err instanceof VmvaultError && /EPERM/.test(err.message));
      await assert.rejects(client.writeZeroes(0, 4096), (err: unknown) => err instanceof VmvaultError && /EPERM/.test(err.message));
      const piece = await client.read(9 * MiB - 4 * KiB, 8 * KiB); // zeros then data, inside chunk 2
      assert.deepEqual(piece, Buffer.concat([Buffer.alloc(4 * KiB), Buffer.alloc(4 * KiB, 0x22)]));
      const across = await client.read(4 * MiB - 4 * KiB, 8 * KiB); // chunk 0 (data) into chunk 1 (zero)
      assert.deepEqual(across, Buffer.alloc(8 * KiB));
      const ext = await client.extents(0, SIZE);
      assert.deepEqual(ext.filter((e) => !e.hole).map((e) => [e.offset, e.length]), [[0, 4 * MiB], [8 * MiB, 8 * MiB], [40 * MiB, 4 * MiB]]);
    } finally {
      await client.close();
      await exp.close();
    }
  });

  test('an unknown disk or a bad address is refused with what to do', async () => {
    await assert.rejects(exportBackupDisk({ repo, backupId, disk: 'nope', listen: `unix:${join(dir.path, 'n.sock')}` }), /has no disk "nope"; its disks are: root/);
    assert.throws(() => parseListen('localhost'), /expected unix:\/PATH or HOST:PORT/);
    assert.throws(() => parseListen('unix:rel.sock'), /absolute socket path/);
    await writeFile(join(dir.path, 'plain'), 'x');
    await assert.rejects(exportBackupDisk({ repo, backupId, disk: 'root', listen: `unix:${join(dir.path, 'plain')}` }), /exists and is not a socket/);
  });

  test('a tampered chunk is an I/O error for the client, never wrong data; other chunks still read', async () => {
    const tamperDir = await tempDir('vmvault-nbd-tamper-');
    try {
      const r2 = await Repository.init(new LocalStorage(join(tamperDir.path, 'repo')), 'tamper', { kdf: 'weak' });
      const { manifest } = await backupVm(r2, { vm: 'vm1', driver: 'image', disks: [{ path: src, name: 'root', format: 'raw' }] });
      const id = manifest.disks[0]!.chunks[10]!; // the chunk holding 0x33 at 40 MiB
      const file = join(tamperDir.path, 'repo', 'chunks', id.slice(0, 2), id);
      const bytes = await readFile(file);
      bytes[bytes.length - 40] = bytes[bytes.length - 40]! ^ 0x01;
      await writeFile(file, bytes);
      const sock = join(tamperDir.path, 't.sock');
      const exp = await exportBackupDisk({ repo: r2, backupId: manifest.id, disk: 'root', listen: `unix:${sock}` });
      try {
        const out = join(tamperDir.path, 'out.raw');
        const r = await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', exp.uri, out], { reject: false });
        assert.notEqual(r.exitCode, 0, 'qemu-img convert must fail');
        assert.match(r.stderr, /Input\/output error/);
        const client = await NbdClient.connect(sock, { exportName: 'root' });
        try {
          await assert.rejects(client.read(40 * MiB, 64 * KiB), (err: unknown) => err instanceof VmvaultError && /EIO/.test(err.message));
          assert.deepEqual(await client.read(9 * MiB, 4 * KiB), Buffer.alloc(4 * KiB, 0x22));
        } finally {
          await client.close();
        }
      } finally {
        await exp.close();
      }
    } finally {
      await tamperDir.cleanup();
    }
  });
});

function rssKiB(pid: number): Promise<number> {
  return readFile(`/proc/${pid}/status`, 'utf8').then((s) => Number(/VmRSS:\s+(\d+)/.exec(s)?.[1] ?? 0));
}

describe('vmvault export under ten concurrent readers', () => {
  test('all ten read the disk right, and the exporter stays within bounded memory', { timeout: 300_000 }, async () => {
    // 160 MiB of random data (40 distinct chunks, 2.5 times the cache) in a 256 MiB disk.
    const big = join(dir.path, 'big.raw');
    await execa('qemu-img', ['create', '-q', '-f', 'raw', big, String(256 * MiB)]);
    await execa('dd', ['if=/dev/urandom', `of=${big}`, 'bs=1M', 'count=160', 'seek=48', 'conv=notrunc', 'status=none']);
    const { manifest } = await backupVm(repo, { vm: 'big', driver: 'image', disks: [{ path: big, name: 'data', format: 'raw' }] });
    const sock = join(dir.path, 'big.sock');
    const env = { VMVAULT_REPOSITORY: repoPath(), VMVAULT_PASSWORD: 'export test' };
    const proc = start(['export', manifest.id.slice(0, 12), '--disk', 'data', '--listen', `unix:${sock}`, '--json'], env);
    try {
      await waitFor('the export to listen', () => proc.output().includes('"uri"'), 20_000, () => proc.output());
      const uri = `nbd+unix:///data?socket=${sock}`;
      const idle = await rssKiB(proc.pid!);
      let peak = idle;
      const sampler = setInterval(() => void rssKiB(proc.pid!).then((v) => { peak = Math.max(peak, v); }, () => undefined), 100);
      try {
        const readers = Array.from({ length: 10 }, () => execa('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, big], { reject: false }));
        const results = await Promise.all(readers);
        for (const r of results) assert.equal(r.exitCode, 0, `a reader failed: ${r.stderr}${r.stdout}`);
      } finally {
        clearInterval(sampler);
      }
      process.stdout.write(`# exporter RSS: ${Math.round(idle / 1024)} MiB idle, ${Math.round(peak / 1024)} MiB peak under 10 readers of 160 MiB of data each (1.6 GiB served)\n`);
      // Bounded: the 64 MiB cache, a few chunks per connection in flight and two worker threads; far below what was served.
      assert.ok(peak < 450 * 1024, `exporter RSS peaked at ${Math.round(peak / 1024)} MiB`);
    } finally {
      assert.equal(await stopProc(proc), 0, proc.output());
    }
  });
});

/**
 * Clients that stop reading a disk answer: the API, in-process on a real port over a
 * real backup, must hold a bounded amount for each of them. Measured directly: the
 * bytes the server has queued in user space for each connection (its socket's
 * writableLength), which is where an answer's buffers stay while the client does not
 * read; the process's arrayBuffers as a cross-check.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { serve, type ServerType } from '@hono/node-server';
import { execa } from 'execa';
import { pino } from 'pino';
import { createApi, type Api } from '../../src/api/app.js';
import { linkKey, signLink } from '../../src/api/links.js';
import { parseConfig } from '../../src/config/load.js';
import { STREAM_PIECE_BYTES } from '../../src/pipeline/disk-reader.js';
import { backupVm } from '../../src/vm/drivers.js';
import { createRedis } from '../../src/queue/connection.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { tempDir, type TempDir } from '../helpers/images.js';
import { readFile } from 'node:fs/promises';

const MiB = 1024 * 1024;
const DISK_BYTES = 64 * MiB;
const CHUNK = 4 * MiB; // the repository's default chunk size
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

let dir: TempDir;
let repo: Repository;
let backupId: string;
let sourceSha: string;

before(async () => {
  dir = await tempDir('vmvault-slow-');
  const raw = `${dir.path}/disk.raw`;
  await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${DISK_BYTES / MiB}`, 'status=none']);
  sourceSha = createHash('sha256').update(await readFile(raw)).digest('hex');
  repo = await Repository.init(new LocalStorage(`${dir.path}/repo`), 'slow readers', { kdf: 'weak' });
  backupId = (await backupVm(repo, { vm: 'slow', driver: 'image', disks: [{ path: raw, name: 'root' }] })).manifest.id;
  assert.equal(repo.chunkSize, CHUNK);
});

after(async () => {
  await dir?.cleanup();
});

interface Running { api: Api; server: ServerType; port: number; path: string; serverSockets: Socket[]; stop(): Promise<void> }

async function startApi(opts: { wholeResponseHoldMs?: number } = {}): Promise<Running> {
  // The disk routes never touch Redis.
  const redis = createRedis('redis://127.0.0.1:1', 'producer', { lazyConnect: true });
  redis.on('error', () => {});
  const api = createApi({ config: parseConfig('vms: []\n', 'test.yaml', { host: 'test' }), repo, redis, log: pino({ level: 'silent' }), ...opts });
  const serverSockets: Socket[] = [];
  const server = serve({ fetch: api.app.fetch, hostname: '127.0.0.1', port: 0 });
  server.on('connection', (s: Socket) => serverSockets.push(s));
  await new Promise((r) => server.once('listening', r));
  const port = (server.address() as AddressInfo).port;
  const path = `/v1/links/${signLink(linkKey(repo.keys.macKey), { backup: backupId, disk: 'root', expires: Math.floor(Date.now() / 1000) + 3600 })}`;
  return {
    api, server, port, path, serverSockets,
    stop: async () => {
      for (const s of serverSockets) s.destroy();
      await new Promise((r) => server.close(r));
      await api.close();
      redis.disconnect();
    },
  };
}

/** A client that sends one GET and never reads the answer. */
function pausedClient(port: number, path: string, range?: [number, number]): Socket {
  const s = connect(port, '127.0.0.1');
  s.pause();
  s.on('error', () => {});
  s.write(`GET ${path} HTTP/1.1\r\nHost: test\r\n${range ? `Range: bytes=${range[0]}-${range[1]}\r\n` : ''}\r\n`);
  return s;
}

const queued = (sockets: Socket[]) => sockets.filter((s) => !s.destroyed).map((s) => s.writableLength);
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

/** Waits until what the server has queued stops changing (or `ms` passes). */
async function settle(sockets: Socket[], ms = 8000): Promise<void> {
  let last = -1;
  const end = Date.now() + ms;
  while (Date.now() < end) {
    await new Promise((r) => setTimeout(r, 500));
    const now = sum(queued(sockets));
    if (now === last && now > 0) return;
    last = now;
  }
}

function arrayBuffers(): number {
  gc();
  return process.memoryUsage().arrayBuffers;
}

describe('slow readers of a disk answer', () => {
  test('40 paused readers of the streamed disk each hold a few pieces, not a chunk; a resumed one gets every byte', async () => {
    const N = 40;
    const api = await startApi();
    try {
      const base = arrayBuffers();
      const clients = Array.from({ length: N }, () => pausedClient(api.port, api.path));
      await settle(api.serverSockets);
      // Per connection, @hono/node-server writes up to 3 pieces it read ahead before
      // heeding back-pressure, and one more read may be in flight: 4 pieces, 1 MiB.
      // (Before: a whole 4 MiB chunk copy per connection.)
      const perClient = 4 * STREAM_PIECE_BYTES + 4096;
      const q = queued(api.serverSockets);
      assert.equal(q.length, N);
      assert.ok(Math.max(...q) <= perClient, `bytes queued per paused connection: max ${Math.max(...q)} > ${perClient}`);
      // The process as a whole: those pieces, plus the decrypted chunks cached (paused
      // clients get at most ~1 MiB each through the kernel's buffers, so only the first
      // chunk or two are read), plus 16 MiB for anything else the test process holds.
      const grown = arrayBuffers() - base;
      const limit = N * perClient + 2 * CHUNK + 16 * MiB;
      assert.ok(grown <= limit, `arrayBuffers grew by ${(grown / MiB).toFixed(1)} MiB for ${N} paused readers; limit ${(limit / MiB).toFixed(1)} MiB`);

      // Back-pressure delays, never drops: a paused client that resumes reads the whole disk.
      const one = clients[0]!;
      const hash = createHash('sha256');
      let head = Buffer.alloc(0);
      let body = 0;
      await new Promise<void>((resolve, reject) => {
        one.on('data', (d: Buffer) => {
          if (body === 0 && head.indexOf('\r\n\r\n') < 0) {
            head = Buffer.concat([head, d]);
            const at = head.indexOf('\r\n\r\n');
            if (at < 0) return;
            assert.match(head.subarray(0, at).toString(), /^HTTP\/1\.1 200 /);
            d = head.subarray(at + 4);
          }
          hash.update(d);
          body += d.length;
          if (body >= DISK_BYTES) resolve();
        });
        one.on('close', () => reject(new Error(`connection closed after ${body} bytes`)));
        one.resume();
      });
      assert.equal(body, DISK_BYTES);
      assert.equal(hash.digest('hex'), sourceSha);
      for (const c of clients) c.destroy();
    } finally {
      await api.stop();
    }
  });

  test('paused readers of whole (Range) answers hold at most the 8 slots; past the hold time one that blocks a waiter is cut off', async () => {
    const SLOTS = 8; // WHOLE_RESPONSES_AT_ONCE
    const RANGE = 8 * MiB;
    const N = SLOTS + 4;
    const api = await startApi({ wholeResponseHoldMs: 500 });
    try {
      const clients = Array.from({ length: N }, (_, i) => {
        const start = (i % (DISK_BYTES / RANGE)) * RANGE;
        return pausedClient(api.port, api.path, [start, start + RANGE - 1]);
      });
      // 8 answers assembled and held, 4 waiting; after 500 ms, 4 of the 8 are cut off so
      // the 4 waiters get their turn; then nobody waits and nothing more is cut.
      await new Promise((r) => setTimeout(r, 3000));
      await settle(api.serverSockets, 4000);
      // (Counted on the server's side: a paused client does not read the close.)
      const cut = api.serverSockets.filter((s) => s.destroyed).length;
      assert.equal(cut, N - SLOTS, `connections cut: ${cut}`);
      const q = sum(queued(api.serverSockets));
      // Before: each slot passed on after the hold time while its buffer stayed, so
      // 12 answers (96 MiB) were held, and more with every new request.
      const limit = SLOTS * (RANGE + 4096); // 4 KiB for each answer's headers
      assert.ok(q <= limit, `bytes queued for paused whole answers: ${q} > ${limit}`);
      for (const c of clients) c.destroy();
    } finally {
      await api.stop();
    }
  });
});

/**
 * The NBD server on its own, over an in-memory source with a region that cannot be
 * produced: vmvault's NBD client (structured replies, block status), raw sockets for
 * what the client never does (no structured replies, NBD_OPT_EXPORT_NAME, unknown
 * options, NBD_OPT_LIST, NBD_CMD_DISC), and qemu-io for a read that must fail.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { networkInterfaces } from 'node:os';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { NbdClient } from '../../src/disk/nbd.js';
import { ExactReader } from '../../src/disk/nbd-handshake.js';
import { NbdServer, type NbdSource, type SourceRun } from '../../src/disk/nbd-server.js';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_EINVAL, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_LIST, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
  NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_SERVER, NBD_SIMPLE_REPLY_MAGIC, encodeOption, encodeRequest, lengthPrefixed, readU64,
} from '../../src/disk/nbd-protocol.js';
import { VmvaultError } from '../../src/errors.js';
import { tempDir, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { BLOCK, BROKEN, SIZE, ZERO, expected, source } from '../helpers/nbd-source.js';

const KiB = 1024;

let dir: TempDir;
let server: NbdServer;
let sock: string;

before(async () => {
  dir = await tempDir('vmvault-nbd-server-');
  sock = join(dir.path, 's.sock');
  server = await NbdServer.listen({ path: sock }, { source, name: 'disk' });
});

after(async () => {
  await server?.close();
  await dir?.cleanup();
});

/** A raw connection past the greeting, with the client flags sent. */
async function raw(): Promise<{ socket: net.Socket; reader: ExactReader }> {
  const socket = net.createConnection(sock);
  const reader = new ExactReader();
  socket.on('data', (d) => reader.push(d));
  socket.on('close', () => reader.fail(new Error('closed')));
  const greeting = await reader.read(18);
  assert.equal(greeting.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0);
  socket.write(flags);
  return { socket, reader };
}

/** A raw connection to the export `disk` of the server on `path`, in transmission (structured replies and base:allocation when `structured`). */
async function transmission(path: string, structured: boolean): Promise<{ socket: net.Socket; reader: ExactReader }> {
  const socket = net.createConnection(path);
  const reader = new ExactReader();
  socket.on('data', (d) => reader.push(d));
  socket.on('close', () => reader.fail(new Error('closed')));
  socket.on('error', () => {});
  await reader.read(18);
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0);
  socket.write(flags);
  const until = async () => {
    let r;
    do r = await optionReply(reader); while (r.type !== NBD_REP_ACK);
  };
  if (structured) {
    socket.write(encodeOption(NBD_OPT_STRUCTURED_REPLY));
    await until();
    socket.write(encodeOption(NBD_OPT_SET_META_CONTEXT, Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0, 0, 1]), lengthPrefixed('base:allocation')])));
    await until();
  }
  socket.write(encodeOption(NBD_OPT_GO, Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0])])));
  await until();
  return { socket, reader };
}

async function optionReply(reader: ExactReader): Promise<{ option: number; type: number; data: Buffer }> {
  const head = await reader.read(20);
  const length = head.readUInt32BE(16);
  return { option: head.readUInt32BE(8), type: head.readUInt32BE(12), data: length ? Buffer.from(await reader.read(length)) : Buffer.alloc(0) };
}

describe('NBD server', () => {
  test('reads, holes and block status through vmvault\'s client; a failing run is EIO for that read only', async () => {
    const client = await NbdClient.connect(sock, { exportName: 'disk' });
    try {
      assert.equal(client.size, SIZE);
      assert.equal(client.readOnly, true);
      assert.deepEqual(await client.read(BLOCK - 100, 4 * BLOCK), expected(BLOCK - 100, 4 * BLOCK));
      assert.deepEqual(await client.read(0, 12 * BLOCK), expected(0, 12 * BLOCK));
      const ext = await client.extents(0, SIZE);
      assert.deepEqual(ext.filter((e) => e.hole).map((e) => [e.offset, e.length]), [[2 * BLOCK, 2 * BLOCK], [9 * BLOCK, BLOCK]]);
      await assert.rejects(client.read(11 * BLOCK, 2 * BLOCK), (err: unknown) => err instanceof VmvaultError && /EIO/.test(err.message) && /failed verification/.test(err.message));
      assert.deepEqual(await client.read(13 * BLOCK, BLOCK), expected(13 * BLOCK, BLOCK), 'the connection goes on');
    } finally {
      await client.close();
    }
  });

  test('qemu-io sees an I/O error for the failing block, and the right bytes elsewhere', async () => {
    const uri = `nbd+unix:///disk?socket=${sock}`;
    const bad = await execa('qemu-io', ['-r', '-f', 'raw', '-c', `read ${BROKEN * BLOCK} 4096`, uri], { reject: false });
    assert.match(bad.stdout + bad.stderr, /Input\/output error/);
    await execa('qemu-io', ['-r', '-f', 'raw', '-c', `read -P 0x0b ${10 * BLOCK} ${BLOCK}`, '-c', `read -P 0 ${2 * BLOCK} ${2 * BLOCK}`, uri]);
  });

  test('without structured replies: simple replies carry the data, or EIO and no data', async () => {
    const { socket, reader } = await raw();
    try {
      const go = Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0])]);
      socket.write(encodeOption(NBD_OPT_GO, go));
      let r;
      do r = await optionReply(reader); while (r.type !== NBD_REP_ACK);
      socket.write(encodeRequest(0, NBD_CMD_READ, 7, 3 * BLOCK - 10, 20));
      const head = await reader.read(16);
      assert.equal(head.readUInt32BE(0), NBD_SIMPLE_REPLY_MAGIC);
      assert.equal(head.readUInt32BE(4), 0);
      assert.equal(readU64(head, 8), 7);
      assert.deepEqual(Buffer.from(await reader.read(20)), expected(3 * BLOCK - 10, 20));
      socket.write(encodeRequest(0, NBD_CMD_READ, 8, BROKEN * BLOCK, 512));
      const err = await reader.read(16);
      assert.equal(err.readUInt32BE(4), 5, 'EIO');
      assert.equal(readU64(err, 8), 8);
      socket.write(encodeRequest(0, NBD_CMD_READ, 9, 0, 4));
      const ok = await reader.read(16);
      assert.equal(ok.readUInt32BE(4), 0);
      assert.deepEqual(Buffer.from(await reader.read(4)), expected(0, 4));
      socket.write(encodeRequest(0, NBD_CMD_DISC, 10, 0, 0));
      await new Promise<void>((resolve) => socket.once('close', () => resolve()));
    } finally {
      socket.destroy();
    }
  });

  test('a client that sends requests without reading the replies is read no further: the replies the server holds stay bounded, and the client gets every one once it reads', async () => {
    /** The most reply bytes any of the server's connections holds unwritten. */
    const serverBacklog = () => Math.max(0, ...[...(server['connections'] as Map<net.Socket, unknown>).keys()].map((c) => c.writableLength));
    /**
     * Writes `data`, and waits until the server's reply backlog stops growing (client
     * and server share this event loop): it must stay near its 1 MiB bound, where it
     * would hold every reply if the server went on reading.
     */
    const flood = async (socket: net.Socket, data: Buffer) => {
      socket.write(data);
      let last = -1;
      for (let still = 0; still < 3;) {
        await new Promise((r) => setTimeout(r, 150));
        still = serverBacklog() === last ? still + 1 : 0;
        last = serverBacklog();
      }
      assert.ok(serverBacklog() < 2 * 1024 * KiB, `the server holds ${serverBacklog()} bytes of replies`);
    };
    const { socket, reader } = await raw();
    try {
      // In the handshake: 100,000 NBD_OPT_LIST, 5.6 MB of replies.
      socket.pause();
      const lists = Buffer.concat(Array.from({ length: 100_000 }, () => encodeOption(NBD_OPT_LIST)));
      await flood(socket, lists);
      socket.resume();
      for (let i = 0; i < 100_000; i++) {
        assert.equal((await optionReply(reader)).type, NBD_REP_SERVER);
        assert.equal((await optionReply(reader)).type, NBD_REP_ACK);
      }
      socket.write(encodeOption(NBD_OPT_GO, Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0])])));
      let r;
      do r = await optionReply(reader); while (r.type !== NBD_REP_ACK);
      // In transmission: 200,000 flushes (answered at once, never queued), 3.2 MB of replies.
      socket.pause();
      const flushes = Buffer.concat(Array.from({ length: 200_000 }, (_, i) => encodeRequest(0, NBD_CMD_FLUSH, i, 0, 0)));
      await flood(socket, flushes);
      socket.resume();
      for (let i = 0; i < 200_000; i++) {
        const head = await reader.read(16);
        assert.equal(head.readUInt32BE(4), 0);
        assert.equal(readU64(head, 8), i);
      }
      // Still in step: a read after them all.
      socket.write(encodeRequest(0, NBD_CMD_READ, 7, 0, 4));
      const ok = await reader.read(16);
      assert.equal(readU64(ok, 8), 7);
      assert.deepEqual(Buffer.from(await reader.read(4)), expected(0, 4));
    } finally {
      socket.destroy();
    }
  });

  test('a client that never reads its replies is disconnected: in the handshake at its timeout, in transmission after the stall limit', async () => {
    // The handshake's timeout is what ends the first (the stall limit is a minute there); the stall limit ends the second.
    const p = join(dir.path, 'stall.sock');
    const q = join(dir.path, 'stall2.sock');
    const s = await NbdServer.listen({ path: p }, { source, name: 'disk', handshakeTimeoutMs: 1000, stallMs: 60_000 });
    const s2 = await NbdServer.listen({ path: q }, { source, name: 'disk', stallMs: 1500 });
    /** A raw client on `p`; resolves how long after `start` the server closed it. */
    const closedAfter = (socket: net.Socket, start: number) => new Promise<number>((resolve) => socket.once('close', () => resolve(Date.now() - start)));
    try {
      // Handshake: options it never reads the replies of, until the timeout.
      const a = net.createConnection(p);
      const aClosed = closedAfter(a, Date.now());
      const flags = Buffer.alloc(4);
      flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0);
      a.pause();
      a.write(Buffer.concat([flags, ...Array.from({ length: 100_000 }, () => encodeOption(NBD_OPT_LIST))]));
      a.on('error', () => {});
      const t1 = await aClosed;
      assert.ok(t1 >= 900 && t1 < 5000, `closed after ${t1} ms`);
      // Transmission: flushes it never reads the replies of.
      const b = net.createConnection(q);
      const reader = new ExactReader();
      b.on('data', (d) => reader.push(d));
      b.on('error', () => {});
      await reader.read(18);
      b.write(flags);
      b.write(encodeOption(NBD_OPT_GO, Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0])])));
      let r;
      do r = await optionReply(reader); while (r.type !== NBD_REP_ACK);
      b.pause();
      const bClosed = closedAfter(b, Date.now());
      b.write(Buffer.concat(Array.from({ length: 200_000 }, (_, i) => encodeRequest(0, NBD_CMD_FLUSH, i, 0, 0))));
      const t2 = await bClosed;
      assert.ok(t2 >= 1400 && t2 < 15_000, `closed after ${t2} ms`);
      await waitFor('the servers to drop them', async () => s.connectionCount + s2.connectionCount === 0, 5000);
    } finally {
      await s.close();
      await s2.close();
    }
  });

  test('errors accepting connections (EMFILE) are logged, and the server goes on serving', async () => {
    const p = join(dir.path, 'accept-errors.sock');
    const warned: string[] = [];
    const s = await NbdServer.listen({ path: p }, { source, name: 'disk', log: { info: () => {}, warn: (_o: object, msg: string) => { warned.push(msg); } } });
    try {
      const inner = (s as unknown as { server: net.Server }).server;
      for (let i = 0; i < 3; i++) inner.emit('error', Object.assign(new Error('accept EMFILE'), { code: 'EMFILE' }));
      assert.equal(warned.filter((m) => m === 'NBD server could not accept a connection').length, 3);
      const greeted = await new Promise<boolean>((resolve) => {
        const c = net.createConnection(p);
        c.once('data', () => { c.destroy(); resolve(true); });
        c.once('close', () => resolve(false));
      });
      assert.equal(greeted, true, 'a new client is still served');
    } finally {
      await s.close();
    }
  });

  test('its unix socket is the owner\'s only, whatever the umask', async () => {
    const old = process.umask(0o002);
    try {
      const p = join(dir.path, 'private.sock');
      const s = await NbdServer.listen({ path: p }, { source, name: 'disk' });
      try {
        assert.equal(((await stat(p)).mode & 0o777).toString(8), '600');
      } finally {
        await s.close();
      }
    } finally {
      process.umask(old);
    }
  });

  test('one TCP address gets 16 connections at once, not every one the server has', async () => {
    // Connections held in their handshake here: none gives way to a newcomer however slow this machine is.
    const tcp = await NbdServer.listen({ host: '127.0.0.1', port: 0 }, { source, name: 'disk', handshakeYieldMs: 600_000 });
    const port = 'port' in tcp.address ? tcp.address.port : 0;
    const open: net.Socket[] = [];
    /** A connection, and whether the server greets it (a refused one is closed at once). */
    const connect = () => new Promise<boolean>((resolve) => {
      const s = net.createConnection(port, '127.0.0.1');
      open.push(s);
      s.once('data', () => resolve(true));
      s.once('close', () => resolve(false));
    });
    try {
      for (let i = 0; i < 16; i++) assert.equal(await connect(), true, `connection ${i + 1}`);
      assert.equal(await connect(), false, 'the 17th from the same address is refused');
      open[0]!.destroy();
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(await connect(), true, 'one closed: room for another');
    } finally {
      for (const s of open) s.destroy();
      await tcp.close();
    }
  });

  test('an IPv4 client on a dual-stack socket counts by its IPv4 address, and refusals are a few log lines a minute, then one summary', async () => {
    const warned: { obj: Record<string, unknown>; msg: string }[] = [];
    const log = { info: () => {}, warn: (obj: object, msg: string) => { warned.push({ obj: obj as Record<string, unknown>, msg }); } };
    // Dual-stack where the machine has IPv6 (an IPv4 client then shows as ::ffff:127.0.0.1).
    const dualStack = Object.values(networkInterfaces()).flat().some((i) => i?.family === 'IPv6' && i.internal);
    const tcp = await NbdServer.listen({ host: dualStack ? '::' : '127.0.0.1', port: 0 }, { source, name: 'disk', log, handshakeYieldMs: 600_000 });
    const port = 'port' in tcp.address ? tcp.address.port : 0;
    const open: net.Socket[] = [];
    const connect = () => new Promise<boolean>((resolve) => {
      const s = net.createConnection(port, '127.0.0.1');
      open.push(s);
      s.on('error', () => {});
      s.once('data', () => resolve(true));
      s.once('close', () => resolve(false));
    });
    try {
      for (let i = 0; i < 16; i++) assert.equal(await connect(), true, `connection ${i + 1}`);
      for (let i = 0; i < 40; i++) assert.equal(await connect(), false, `refused connection ${i + 1}`);
      const refused = warned.filter((w) => w.msg === 'NBD connection refused: too many connections');
      assert.equal(refused.length, 10, 'ten lines, not forty');
      assert.equal(refused[0]!.obj.peer, '127.0.0.1', 'the mapped address counted as the IPv4 one');
      await tcp.close();
      const summary = warned.find((w) => /refused and not logged one by one/.test(w.msg));
      assert.ok(summary, 'closing the server tells what it held back');
      assert.equal(summary.obj.refused, 30);
    } finally {
      for (const s of open) s.destroy();
      await tcp.close();
    }
  });

  test('connections that stall in their handshake make room for a new client once the server is full', async () => {
    const p = join(dir.path, 'stalled-handshakes.sock');
    const s = await NbdServer.listen({ path: p }, { source, name: 'disk', maxConnections: 4, handshakeYieldMs: 300 });
    const stalled: net.Socket[] = [];
    try {
      // Four clients take every slot and never answer the greeting.
      const closed: Promise<void>[] = [];
      for (let i = 0; i < 4; i++) {
        const c = net.createConnection(p);
        c.on('error', () => {});
        closed.push(new Promise((resolve) => c.once('close', () => resolve())));
        await new Promise((resolve) => c.once('data', resolve));
        stalled.push(c);
      }
      assert.equal(s.connectionCount, 4);
      // Right away, a newcomer is refused: a handshake just begun is not taken for a stalled one.
      await assert.rejects(NbdClient.connect(p, { exportName: 'disk' }));
      await new Promise((r) => setTimeout(r, 400));
      const client = await NbdClient.connect(p, { exportName: 'disk' });
      try {
        assert.deepEqual(await client.read(0, BLOCK), expected(0, BLOCK), 'the newcomer is served');
        // The oldest stalled one made room; the others still hold their slots until their timeout.
        await Promise.race([closed[0], new Promise((_, reject) => setTimeout(() => reject(new Error('the oldest stalled client was not closed')), 5000))]);
        assert.equal(s.connectionCount, 4);
      } finally {
        await client.close();
      }
    } finally {
      for (const c of stalled) c.destroy();
      await s.close();
    }
  });

  test('NBD_OPT_LIST names the export; unknown names and options are refused; NBD_OPT_EXPORT_NAME still works', async () => {
    const { socket, reader } = await raw();
    try {
      socket.write(encodeOption(NBD_OPT_LIST));
      const server = await optionReply(reader);
      assert.equal(server.type, NBD_REP_SERVER);
      assert.equal(server.data.toString('utf8', 4), 'disk');
      assert.equal((await optionReply(reader)).type, NBD_REP_ACK);
      socket.write(encodeOption(NBD_OPT_GO, Buffer.concat([lengthPrefixed('other'), Buffer.from([0, 0])])));
      const unknown = await optionReply(reader);
      assert.equal(unknown.type, NBD_REP_ERR_UNKNOWN);
      assert.match(unknown.data.toString(), /no export named "other"/);
      socket.write(encodeOption(99));
      assert.equal((await optionReply(reader)).type, NBD_REP_ERR_UNSUP);
      socket.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
      const info = await reader.read(10);
      assert.equal(readU64(info, 0), SIZE);
      socket.write(encodeRequest(0, NBD_CMD_READ, 1, 5 * BLOCK, 8));
      assert.equal((await reader.read(16)).readUInt32BE(4), 0);
      assert.deepEqual(Buffer.from(await reader.read(8)), expected(5 * BLOCK, 8));
    } finally {
      socket.destroy();
    }
  });
});

describe('NBD server against hostile clients', () => {
  test('NBD_CMD_CACHE is a hint inside the export and EINVAL outside it; NBD_CMD_FLUSH succeeds', async () => {
    const p = join(dir.path, 'cache.sock');
    const s = await NbdServer.listen({ path: p }, { source, name: 'disk' });
    try {
      const { socket, reader } = await transmission(p, false);
      const reply = async (type: number, handle: number, offset: number, length: number) => {
        socket.write(encodeRequest(0, type, handle, offset, length));
        const r = await reader.read(16);
        assert.equal(r.readUInt32BE(0), NBD_SIMPLE_REPLY_MAGIC);
        assert.equal(Number(readU64(r, 8)), handle);
        return r.readUInt32BE(4);
      };
      assert.equal(await reply(NBD_CMD_CACHE, 1, 0, BLOCK), 0);
      assert.equal(await reply(NBD_CMD_CACHE, 2, SIZE - BLOCK, 2 * BLOCK), NBD_EINVAL);
      assert.equal(await reply(NBD_CMD_FLUSH, 3, 0, 0), 0);
      socket.destroy();
    } finally {
      await s.close();
    }
  });

  test('a client whose handshake ended without an export, and that keeps its side open, is dropped all the same', async () => {
    // Without the secret name, a client could otherwise hold connection slots for good.
    const ends: [string, number, (s: net.Socket) => void][] = [
      ['NBD_OPT_ABORT', NBD_FLAG_C_FIXED_NEWSTYLE, (s) => s.write(encodeOption(NBD_OPT_ABORT))],
      ['unknown client flags', 0x80, () => {}],
      ['NBD_OPT_EXPORT_NAME of another export', NBD_FLAG_C_FIXED_NEWSTYLE, (s) => s.write(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('other')))],
    ];
    const p = join(dir.path, 'half-open.sock');
    const s = await NbdServer.listen({ path: p }, { source, name: 'disk' });
    const open: net.Socket[] = [];
    try {
      await Promise.all(ends.map(async ([what, flags, end]) => {
        const c = net.createConnection({ path: p, allowHalfOpen: true });
        open.push(c);
        c.on('error', () => {});
        const finned = new Promise<void>((resolve) => c.once('end', () => resolve())); // The server's FIN: this client ignores it.
        await new Promise((resolve) => c.once('data', resolve));
        const f = Buffer.alloc(4);
        f.writeUInt32BE(flags, 0);
        c.write(f);
        end(c);
        await waitFor(`the server to end its side after ${what}`, () => finned.then(() => true), 10_000);
      }));
      assert.equal(s.connectionCount, ends.length, 'each still open on the server once it ended its side');
      await waitFor('the server to drop them', () => s.connectionCount === 0, 20_000, () => `${s.connectionCount} still open`);
    } finally {
      for (const c of open) c.destroy();
      await s.close();
    }
  });

  test('a client without structured replies that leaves mid-read takes no more loads: the rest of its read is not produced', async () => {
    let reads = 0;
    let open!: () => void;
    const gate = new Promise<void>((resolve) => { open = resolve; });
    const gated: NbdSource = { size: SIZE, layout: (o, l) => source.layout(o, l), read: async (o, l) => { reads++; await gate; return source.read(o, l); } };
    const p = join(dir.path, 'gated.sock');
    const s = await NbdServer.listen({ path: p }, { source: gated, name: 'disk' });
    try {
      const { socket } = await transmission(p, false);
      // Blocks 4 to 8: five data runs, produced one after another before anything is sent.
      socket.write(encodeRequest(0, NBD_CMD_READ, 1, 4 * BLOCK, 5 * BLOCK));
      await waitFor('the first run to be asked for', () => reads === 1, 10_000);
      socket.destroy();
      await waitFor('the server to see it gone', () => s.connectionCount === 0, 10_000);
      open();
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(reads, 1, 'no run produced after the client left');
    } finally {
      open();
      await s.close();
    }
  });

  test('holes read without structured replies keep no memory per connection once sent', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const HOLE = 32 * 1024 * KiB;
    const holes: NbdSource = { size: 2 * HOLE, layout: (offset, length) => [{ offset, length, zero: true }], read: () => Promise.reject(new Error('no data here')) };
    const p = join(dir.path, 'holes.sock');
    const s = await NbdServer.listen({ path: p }, { source: holes, name: 'disk' });
    const open: net.Socket[] = [];
    try {
      gc();
      const before = process.memoryUsage().arrayBuffers;
      /** One read of the hole on a connection of its own, left open; nothing of what it read is kept. */
      const readHole = async (i: number): Promise<void> => {
        const { socket, reader } = await transmission(p, false);
        open.push(socket);
        socket.write(encodeRequest(0, NBD_CMD_READ, i, HOLE / 2, HOLE));
        assert.equal((await reader.read(16)).readUInt32BE(4), 0);
        assert.ok((await reader.read(HOLE)).every((b) => b === 0));
      };
      for (let i = 0; i < 4; i++) await readHole(i);
      // The connections stay open: what each kept of its read would still be held.
      // Four kept zero buffers would be 128 MiB; what the reads leave to collect, far less.
      for (let i = 0; i < 3; i++) {
        await new Promise((r) => setTimeout(r, 50));
        gc();
      }
      const grown = process.memoryUsage().arrayBuffers - before;
      assert.ok(grown < 64 * 1024 * KiB, `${grown} bytes more are held after four reads of a 32 MiB hole`);
    } finally {
      for (const c of open) c.destroy();
      await s.close();
    }
  });

  test('a client that pipelines thousands of requests does not keep the event loop: requests start a few per turn', async () => {
    let layouts = 0;
    const counted: NbdSource = { size: SIZE, layout: (o, l) => { layouts++; return source.layout(o, l); }, read: (o, l) => source.read(o, l) };
    const p = join(dir.path, 'pipelined.sock');
    const s = await NbdServer.listen({ path: p }, { source: counted, name: 'disk' });
    const { socket, reader } = await transmission(p, true);
    /** Requests started on each turn of the event loop, while the test runs. */
    const perTurn: number[] = [];
    let seen = 0;
    let probing = true;
    const probe = (): void => {
      perTurn.push(layouts - seen);
      seen = layouts;
      if (probing) setImmediate(probe);
    };
    try {
      const N = 2000;
      // One write; each reply (REQ_ONE: one descriptor) is 32 bytes, so no write ever waits on the client.
      socket.write(Buffer.concat(Array.from({ length: N }, (_, i) => encodeRequest(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, i, 0, SIZE))));
      setImmediate(probe);
      for (let i = 0; i < N; i++) {
        const head = await reader.read(20);
        assert.equal(head.readUInt16BE(6), 5, 'a block status chunk');
        await reader.read(head.readUInt32BE(16));
      }
      probing = false;
      assert.equal(layouts, N);
      assert.ok(Math.max(...perTurn) <= 16, `up to ${Math.max(...perTurn)} requests were served on one turn of the event loop`);
    } finally {
      probing = false;
      socket.destroy();
      await s.close();
    }
  });

  test('block status looks at most 256 MiB ahead at once; vmvault\'s client and qemu-img map still see the whole disk', async () => {
    const MiB = 1024 * KiB;
    const DATA = 700 * MiB;
    /** 1 GiB, all hole but one 64 KiB block at 700 MiB. */
    let longest = 0;
    const sparse: NbdSource = {
      size: 1024 * MiB,
      layout(offset, length) {
        longest = Math.max(longest, length);
        const end = offset + length;
        const runs: SourceRun[] = [];
        if (offset < DATA) runs.push({ offset, length: Math.min(end, DATA) - offset, zero: true });
        if (offset < DATA + BLOCK && end > DATA) runs.push({ offset: Math.max(offset, DATA), length: Math.min(end, DATA + BLOCK) - Math.max(offset, DATA), zero: false });
        if (end > DATA + BLOCK) runs.push({ offset: Math.max(offset, DATA + BLOCK), length: end - Math.max(offset, DATA + BLOCK), zero: true });
        return runs;
      },
      read: async (o, l) => Buffer.alloc(l, 0x5a),
    };
    const p = join(dir.path, 'sparse.sock');
    const s = await NbdServer.listen({ path: p }, { source: sparse, name: 'disk' });
    try {
      const client = await NbdClient.connect(p, { exportName: 'disk' });
      try {
        const ext = await client.extents(0, 1024 * MiB);
        assert.deepEqual(ext.filter((e) => !e.hole).map((e) => [e.offset, e.length]), [[DATA, BLOCK]]);
        assert.equal(ext.reduce((n, e) => n + e.length, 0), 1024 * MiB);
      } finally {
        await client.close();
      }
      assert.ok(longest <= 256 * MiB, `the source was asked for the layout of ${longest} bytes at once`);
      const map = await execa('qemu-img', ['map', '--output=json', '-f', 'raw', `nbd+unix:///disk?socket=${p}`]);
      const data = (JSON.parse(map.stdout) as { start: number; length: number; data: boolean }[]).filter((e) => e.data);
      assert.deepEqual(data.map((e) => [e.start, e.length]), [[DATA, BLOCK]]);
    } finally {
      await s.close();
    }
  });
});

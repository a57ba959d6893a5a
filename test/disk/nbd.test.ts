/**
 * NbdClient against real qemu-nbd exports of real images in every format.
 * The images are filled by qemu-io, so the expected bytes come from qemu's own
 * format drivers, not from our client.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import path from 'node:path';
import net from 'node:net';
import { NbdClient, abortWith, type Extent, type NbdConnectOptions } from '../../src/disk/nbd.js';
import { compareImages, exportImage, IMAGE_FORMATS, type ImageFormat, type NbdExport } from '../../src/disk/qemu.js';
import { VmvaultError } from '../../src/errors.js';
import { expectedContent, makeImage, tempDir, verifyPatterns, waitForExit, type PatternWrite, type TempDir } from '../helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 80 * MiB;

/** Aligned to 64 KiB so qcow2/vmdk clusters match them exactly; one is larger than qemu-nbd's 32 MiB request limit. */
const WRITES: PatternWrite[] = [
  { offset: 1 * MiB, length: 256 * KiB, pattern: 0x11 },
  { offset: 5 * MiB, length: 40 * MiB, pattern: 0x22 },
  { offset: 5 * MiB + 64 * KiB, length: 64 * KiB, pattern: 0x33 },
  { offset: 60 * MiB, length: 64 * KiB, pattern: 0x44 },
  { offset: SIZE - 64 * KiB, length: 64 * KiB, pattern: 0x55 },
];

/** The unit each format allocates in: the data extents qemu reports are the writes rounded out to it. */
const ALLOCATION_UNIT: Record<ImageFormat, number> = { qcow2: 64 * KiB, vmdk: 64 * KiB, vdi: 1 * MiB, raw: 4 * KiB };

function isNbdError(pattern: RegExp) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof VmvaultError, `expected a VmvaultError, got ${String(err)}`);
    assert.equal(err.code, 'NBD');
    assert.match(err.message, pattern);
    return true;
  };
}

/** Byte ranges (as [start, end) pairs) that the writes touch, rounded out to `unit`. */
function roundedRanges(writes: PatternWrite[], unit: number): [number, number][] {
  return writes.map((w) => [Math.floor(w.offset / unit) * unit, Math.ceil((w.offset + w.length) / unit) * unit]);
}

const inAny = (ranges: [number, number][], start: number, end: number): boolean => ranges.some(([s, e]) => start >= s && end <= e);

function checkTiling(extents: Extent[], offset: number, length: number): void {
  assert.ok(extents.length > 0);
  let cur = offset;
  extents.forEach((e, i) => {
    assert.equal(e.offset, cur, `extent ${i} starts where the previous ended`);
    assert.ok(e.length > 0);
    const prev = extents[i - 1];
    if (prev) assert.ok(prev.zero !== e.zero || prev.hole !== e.hole, `extents ${i - 1} and ${i} have the same flags but were not merged`);
    cur += e.length;
  });
  assert.equal(cur, offset + length, 'extents cover exactly the range asked for');
}

/** Deterministic pseudo-random numbers, so a failure reproduces. */
function lcg(seed: number): () => number {
  let s = seed;
  return () => (s = (s * 1103515245 + 12345) % 2147483648) / 2147483648;
}

for (const format of IMAGE_FORMATS) {
  describe(`NbdClient on a read-only ${format} export`, { timeout: 120_000 }, () => {
    let dir: TempDir;
    let exp: NbdExport;
    let client: NbdClient;
    before(async () => {
      dir = await tempDir();
      const image = await makeImage(dir.path, `disk.${format}`, format, SIZE, WRITES);
      exp = await exportImage(image, { format, readOnly: true });
      client = exp.client;
    });
    after(async () => {
      await exp?.close();
      await dir?.cleanup();
    });

    test('reports the export size, read-only, and a request limit', () => {
      assert.equal(client.size, SIZE);
      assert.equal(client.readOnly, true);
      assert.ok(client.maxRequest > 0 && client.maxRequest <= 32 * MiB, `maxRequest ${client.maxRequest}`);
    });

    test('extents show the written ranges as data and the rest as zero holes', async () => {
      const extents = await client.extents(0, SIZE);
      checkTiling(extents, 0, SIZE);
      const written = roundedRanges(WRITES, 1);
      const allocated = roundedRanges(WRITES, ALLOCATION_UNIT[format]);
      // A new raw file has its first 4 KiB allocated by qemu-img create (for O_DIRECT alignment probing).
      if (format === 'raw') allocated.push([0, 4 * KiB]);
      for (const e of extents) {
        const end = e.offset + e.length;
        if (e.zero) {
          assert.equal(e.hole, true, `zero extent at ${e.offset} is a hole in a sparse image`);
          for (const [s, we] of written) assert.ok(end <= s || e.offset >= we, `zero extent [${e.offset}, ${end}) overlaps written data at ${s}`);
        } else {
          assert.equal(e.hole, false);
          // Data extents may span several writes; check each allocation unit inside.
          const unit = format === 'raw' ? 4 * KiB : ALLOCATION_UNIT[format];
          for (let at = e.offset; at < end; at += unit) {
            assert.ok(inAny(allocated, at, Math.min(at + unit, end)), `data extent at ${at} lies outside what was written`);
          }
        }
      }
      for (const [s, we] of written) {
        const covering = extents.filter((e) => e.offset < we && e.offset + e.length > s);
        assert.ok(covering.every((e) => !e.zero && !e.hole), `written range [${s}, ${we}) is reported as data`);
      }
    });

    test('extents of an unaligned sub-range cover exactly that range', async () => {
      const offset = 1 * MiB + 1000;
      const length = 5 * MiB;
      const extents = await client.extents(offset, length);
      checkTiling(extents, offset, length);
      assert.equal(extents[0]!.zero, false, 'starts inside the 0x11 write');
      assert.deepEqual(await client.extents(offset, 0), []);
    });

    test('read returns the written bytes, zeros in holes, in one call larger than maxRequest', async () => {
      const all = await client.read(0, SIZE);
      assert.ok(SIZE > client.maxRequest);
      assert.ok(all.equals(expectedContent(WRITES, 0, SIZE)), 'whole-image read matches what qemu-io wrote');
    });

    test('zero extents really read as zeros', async () => {
      const zeroExtents = (await client.extents(0, SIZE)).filter((e) => e.zero);
      assert.ok(zeroExtents.length > 0);
      for (const e of zeroExtents) {
        assert.ok((await client.read(e.offset, e.length)).equals(Buffer.alloc(e.length)), `zero extent at ${e.offset}`);
      }
    });

    test('64 concurrent reads at odd offsets all return the right bytes', async () => {
      const rand = lcg(42);
      const reads = Array.from({ length: 64 }, () => {
        const length = 1 + Math.floor(rand() * 3 * MiB);
        const offset = Math.floor(rand() * (SIZE - length));
        return { offset, length };
      });
      const results = await Promise.all(reads.map((r) => client.read(r.offset, r.length)));
      results.forEach((data, i) => {
        const r = reads[i]!;
        assert.ok(data.equals(expectedContent(WRITES, r.offset, r.length)), `read ${i} [${r.offset}, +${r.length})`);
      });
    });

    test('readInto fills a caller buffer across request boundaries', async () => {
      const target = new Uint8Array(client.maxRequest * 2 + 12345);
      await client.readInto(4 * MiB + 7, target);
      assert.ok(Buffer.from(target).equals(expectedContent(WRITES, 4 * MiB + 7, target.length)));
    });

    test('holes overwrite whatever the caller\'s buffer held with zeros', async () => {
      const offset = 44 * MiB; // 1 MiB of the 0x22 write, then a hole in every format.
      const target = new Uint8Array(8 * MiB).fill(0xee);
      await client.readInto(offset, target);
      assert.ok(Buffer.from(target).equals(expectedContent(WRITES, offset, target.length)));
    });

    test('reading past the end fails clearly, and the connection stays usable', async () => {
      await assert.rejects(client.read(SIZE - 512, 1024), isNbdError(/past the end of the export \(83886080 bytes\)/));
      await assert.rejects(client.read(SIZE, 1), isNbdError(/past the end/));
      await assert.rejects(client.extents(SIZE - 512, 1024), isNbdError(/past the end/));
      const tail = await client.read(SIZE - 512, 512);
      assert.ok(tail.equals(Buffer.alloc(512, 0x55)));
    });

    test('a write to a read-only export is refused by the server, and the connection stays usable', async () => {
      await assert.rejects(client.write(0, Buffer.alloc(4096, 1)), isNbdError(/^NBD write of 4096 bytes at offset 0 failed: .*read-only/));
      assert.ok((await client.read(1 * MiB, 4096)).equals(Buffer.alloc(4096, 0x11)));
    });
  });

  describe(`NbdClient on a writable ${format} export`, { timeout: 120_000 }, () => {
    let dir: TempDir;
    before(async () => { dir = await tempDir(); });
    after(async () => { await dir?.cleanup(); });

    test('write, writeZeroes and flush land in the image as qemu sees it', async () => {
      const image = await makeImage(dir.path, `target.${format}`, format, SIZE);
      const exp = await exportImage(image, { format, readOnly: false });
      try {
        assert.equal(exp.client.readOnly, false);
        // All in flight at once; later writes overlap earlier ones, so order them as WRITES does.
        await Promise.all(WRITES.slice(0, 2).map((w) => exp.client.write(w.offset, Buffer.alloc(w.length, w.pattern))));
        await Promise.all(WRITES.slice(2).map((w) => exp.client.write(w.offset, Buffer.alloc(w.length, w.pattern))));
        await exp.client.writeZeroes(20 * MiB, 2 * MiB);
        await exp.client.flush();
        const back = await exp.client.read(0, SIZE);
        const expected: PatternWrite[] = [...WRITES, { offset: 20 * MiB, length: 2 * MiB, pattern: 0 }];
        assert.ok(back.equals(expectedContent(expected, 0, SIZE)), 'reads back what was written');
      } finally {
        await exp.close();
      }
      // Independent checks through qemu itself.
      await verifyPatterns(image, format, [...WRITES.slice(2), { offset: 20 * MiB, length: 2 * MiB, pattern: 0 }]);
      const reference = await makeImage(dir.path, `reference.${format}`, 'qcow2', SIZE, [...WRITES, { offset: 20 * MiB, length: 2 * MiB, pattern: 0 }]);
      const cmp = await compareImages(image, reference, format, 'qcow2');
      assert.equal(cmp.identical, true, cmp.output);
    });
  });
}

describe('NbdClient failures', { timeout: 120_000 }, () => {
  let dir: TempDir;
  let image: string;
  before(async () => {
    dir = await tempDir();
    image = await makeImage(dir.path, 'disk.qcow2', 'qcow2', 256 * MiB, [{ offset: 0, length: 256 * MiB, pattern: 0x77 }]);
  });
  after(async () => { await dir?.cleanup(); });

  test('qemu-nbd dying mid-transfer rejects every request in flight, and later ones', async () => {
    const exp = await exportImage(image, { format: 'qcow2', readOnly: true });
    try {
      const reads = Array.from({ length: 8 }, (_, i) => exp.client.read(i * 32 * MiB, 32 * MiB));
      process.kill(exp.pid, 'SIGKILL');
      const settled = await Promise.allSettled(reads);
      let rejected = 0;
      for (const s of settled) {
        if (s.status === 'fulfilled') {
          assert.ok(s.value.equals(Buffer.alloc(32 * MiB, 0x77))); // Finished before the kill: still correct.
        } else {
          rejected++;
          isNbdError(/closed the connection|ECONNRESET/)(s.reason);
        }
      }
      assert.ok(rejected > 0, 'some reads were cut off');
      await assert.rejects(exp.client.read(0, 512), isNbdError(/closed the connection|ECONNRESET/));
    } finally {
      await exp.close().catch(() => undefined); // qemu-nbd was killed: close reports nothing useful.
    }
  });

  test('close() waits for requests in flight, then later calls fail', async () => {
    const exp = await exportImage(image, { format: 'qcow2', readOnly: true });
    const read = exp.client.read(0, 8 * MiB);
    const closed = exp.close();
    assert.ok((await read).equals(Buffer.alloc(8 * MiB, 0x77)));
    await closed;
    await assert.rejects(exp.client.read(0, 512), isNbdError(/is closed/));
    assert.equal(await waitForExit(exp.pid, 1000), true);
  });

  test('an unknown export name is refused with the server\'s reason', async () => {
    const sock = path.join(dir.path, 'multi.sock');
    const server = execa('qemu-nbd', ['--read-only', '-f', 'qcow2', '--persistent', '--shared=2', '-k', sock, image], { reject: false });
    try {
      let client: NbdClient | undefined;
      for (let i = 0; i < 200 && !client; i++) {
        client = await NbdClient.connect(sock).catch(async () => { await new Promise((r) => setTimeout(r, 20)); return undefined; });
      }
      assert.ok(client, 'qemu-nbd started');
      await client.close();
      await assert.rejects(NbdClient.connect(sock, { exportName: 'no-such-export' }), isNbdError(/refused export "no-such-export": NBD_REP_ERR_UNKNOWN/));
    } finally {
      server.kill('SIGTERM');
      await server;
    }
  });

  test('a connection to a missing socket fails with NBD', async () => {
    await assert.rejects(NbdClient.connect(path.join(dir.path, 'none.sock')), isNbdError(/cannot connect.*ENOENT/));
  });
});

describe('NbdClient over more than one block-status request', { timeout: 60_000 }, () => {
  test('extents of a 5 GiB image are merged where 2 GiB requests meet', async () => {
    const dir = await tempDir();
    const GiB = 1024 * MiB;
    const writes: PatternWrite[] = [{ offset: 2 * GiB - 64 * KiB, length: 128 * KiB, pattern: 1 }, { offset: 4 * GiB + 64 * KiB, length: 64 * KiB, pattern: 2 }];
    const exp = await exportImage(await makeImage(dir.path, 'big.qcow2', 'qcow2', 5 * GiB, writes), { format: 'qcow2', readOnly: true });
    try {
      const flags = (e: Extent) => ({ offset: e.offset, length: e.length, zero: e.zero });
      assert.deepEqual((await exp.client.extents(0, 5 * GiB)).map(flags), [
        { offset: 0, length: 2 * GiB - 64 * KiB, zero: true },
        { offset: 2 * GiB - 64 * KiB, length: 128 * KiB, zero: false }, // Spans the first seam.
        { offset: 2 * GiB + 64 * KiB, length: 2 * GiB, zero: true }, // Spans the second.
        { offset: 4 * GiB + 64 * KiB, length: 64 * KiB, zero: false },
        { offset: 4 * GiB + 128 * KiB, length: GiB - 128 * KiB, zero: true },
      ]);
    } finally {
      await exp.close();
      await dir.cleanup();
    }
  });
});

/**
 * Replies qemu-nbd never sends (out-of-order chunks, error chunks, oversized block
 * status, garbage) come from a scripted peer: a correct handshake, then `respond`
 * answers each request.
 */
describe('NbdClient against a scripted server', { timeout: 60_000 }, () => {
  let dir: TempDir;
  before(async () => { dir = await tempDir(); });
  after(async () => { await dir?.cleanup(); });

  async function withServer(respond: Responder, body: (client: NbdClient) => Promise<void>, structured = true, opts: NbdConnectOptions = {}): Promise<void> {
    const sock = path.join(dir.path, `scripted-${Math.random().toString(36).slice(2)}.sock`);
    const server = net.createServer((s) => scriptedServer(s, respond, structured)).listen(sock);
    await new Promise((r) => server.once('listening', r));
    const client = await NbdClient.connect(sock, opts);
    try {
      await body(client);
    } finally {
      await client.close();
      server.close();
    }
  }

  test('read chunks in any order are reassembled, holes zeroed', () => withServer((req, send) => {
    const q = req.length / 4;
    send(chunk(0, 1, req.handle, Buffer.concat([u64(req.offset + 2 * q), Buffer.alloc(2 * q, 0xbb)])));
    send(chunk(0, 2, req.handle, Buffer.concat([u64(req.offset), u32(q)])));
    send(chunk(0, 1, req.handle, Buffer.concat([u64(req.offset + q), Buffer.alloc(q, 0xaa)])));
    send(chunk(1, 0, req.handle));
  }, async (client) => {
    const target = new Uint8Array(4096).fill(0xee);
    await client.readInto(8192, target);
    assert.ok(Buffer.from(target).equals(Buffer.concat([Buffer.alloc(1024), Buffer.alloc(1024, 0xaa), Buffer.alloc(2048, 0xbb)])));
  }));

  test('an error chunk fails only its request, with the server\'s message', () => withServer((req, send) => {
    if (req.offset === 0) {
      const msg = Buffer.from('disk on fire');
      send(chunk(1, 0x8002, req.handle, Buffer.concat([u32(5), u16(msg.length), msg, u64(512)])));
    } else {
      send(chunk(1, 1, req.handle, Buffer.concat([u64(req.offset), Buffer.alloc(req.length, 7)])));
    }
  }, async (client) => {
    await assert.rejects(client.read(0, 4096), isNbdError(/^NBD read of 4096 bytes at offset 0 failed: EIO \(input\/output error\): disk on fire \(at offset 512\)$/));
    assert.ok((await client.read(4096, 100)).equals(Buffer.alloc(100, 7)));
  }));

  test('block status: same flags merged, a descriptor past the request clipped, short replies continued', () => withServer((req, send) => {
    const descriptors = req.offset === 0 && req.length === 4096
      ? [[300, 3], [212, 3], [1_000_000, 0]] // The last runs far past the request.
      : [[Math.min(req.length, 4096), 0]]; // Short replies: the client must ask again.
    send(chunk(1, 5, req.handle, Buffer.concat([u32(1), ...descriptors.map(([l, f]) => Buffer.concat([u32(l!), u32(f!)]))])));
  }, async (client) => {
    assert.deepEqual(await client.extents(0, 4096), [{ offset: 0, length: 512, zero: true, hole: true }, { offset: 512, length: 3584, zero: false, hole: false }]);
    assert.deepEqual(await client.extents(8192, 100_000), [{ offset: 8192, length: 100_000, zero: false, hole: false }]);
  }));

  test('a server without structured replies: simple replies carry reads and errors, extents say all data', () => withServer((req, send) => {
    const simple = (errno: number) => Buffer.concat([u32(0x67446698), u32(errno), req.handle]);
    if (req.offset === 0) send(simple(22));
    else send(Buffer.concat([simple(0), Buffer.alloc(req.length, 9)]));
  }, async (client) => {
    await assert.rejects(client.read(0, 512), isNbdError(/EINVAL/));
    const reads = await Promise.all([client.read(512, 1000), client.read(4096, 3 * 4096)]);
    assert.ok(reads[0].equals(Buffer.alloc(1000, 9)) && reads[1].equals(Buffer.alloc(3 * 4096, 9)));
    assert.deepEqual(await client.extents(0, 1 * MiB), [{ offset: 0, length: 1 * MiB, zero: false, hole: false }]);
  }, false));

  test('a server that stops answering fails every request waiting, and later ones, after the reply timeout', () => withServer(() => {
    // Never answers: a stopped qemu-nbd.
  }, async (client) => {
    const started = Date.now();
    const reads = [client.read(0, 4096), client.read(4096, 4096), client.write(8192, Buffer.alloc(512))];
    for (const r of reads) await assert.rejects(r, isNbdError(/^qemu-nbd for \/images\/a\.qcow2 did not answer for 0\.3 s \(3 requests waiting\): .*VMVAULT_NBD_REPLY_TIMEOUT_MS/));
    const took = Date.now() - started;
    assert.ok(took >= 290 && took < 5000, `failed after ${took} ms`);
    await assert.rejects(client.read(0, 512), isNbdError(/did not answer/));
    const closing = Date.now();
    await client.close();
    assert.ok(Date.now() - closing < 1000, 'close() does not wait for the silent server');
  }, true, { replyTimeoutMs: 300, server: 'qemu-nbd for /images/a.qcow2' }));

  test('a slow server that keeps sending is waited for, however long the whole takes', () => withServer((req, send) => {
    // One reply every 150 ms, each well within the 400 ms timeout; 8 of them take 1.2 s.
    const at = req.offset / 4096;
    setTimeout(() => send(chunk(1, 1, req.handle, Buffer.concat([u64(req.offset), Buffer.alloc(req.length, at)]))), 150 * (at + 1));
  }, async (client) => {
    const reads = await Promise.all(Array.from({ length: 8 }, (_, i) => client.read(i * 4096, 4096)));
    reads.forEach((r, i) => assert.ok(r.equals(Buffer.alloc(4096, i))));
    // Idle between requests is not silence: the clock starts with the next request.
    await new Promise((r) => setTimeout(r, 600));
    assert.ok((await client.read(0, 4096)).equals(Buffer.alloc(4096, 0)));
  }, true, { replyTimeoutMs: 400 }));

  test('abort() fails every request in flight at once, with its reason', () => withServer(() => undefined, async (client) => {
    const reads = [client.read(0, 4096), client.read(4096, 4096)];
    const stop = new AbortController();
    const off = abortWith(client, stop.signal);
    stop.abort(new VmvaultError('BAD_INPUT', 'the backup was interrupted (SIGINT): nothing was saved'));
    for (const r of reads) await assert.rejects(r, /the backup was interrupted/);
    await assert.rejects(client.read(0, 512), /the backup was interrupted/);
    off();
  }, true, { replyTimeoutMs: 60_000 }));

  for (const [what, respond, message] of [
    ['garbage instead of a reply', (_req: Request, send: (b: Buffer) => void) => send(Buffer.from('this is not an NBD reply header')), /bad reply magic/],
    ['overlapping read chunks', (req: Request, send: (b: Buffer) => void) => {
      send(chunk(0, 1, req.handle, Buffer.concat([u64(req.offset), Buffer.alloc(req.length / 2)])));
      send(chunk(1, 1, req.handle, Buffer.concat([u64(req.offset + req.length / 4), Buffer.alloc(req.length / 2)])));
    }, /overlapping/],
    ['a read reply missing data', (req: Request, send: (b: Buffer) => void) => {
      send(chunk(1, 1, req.handle, Buffer.concat([u64(req.offset), Buffer.alloc(req.length / 2)])));
    }, /ended with 2048 of 4096 bytes/],
    ['a reply to a handle never sent', (req: Request, send: (b: Buffer) => void) => send(chunk(1, 0, Buffer.from('ffffffffffffffff', 'hex'))), /no request in flight/],
  ] as const) {
    test(`${what} is a protocol violation that fails every pending request`, () => withServer(respond, async (client) => {
      const reads = [client.read(0, 4096), client.read(4096, 4096)];
      for (const r of reads) await assert.rejects(r, isNbdError(new RegExp(`protocol violation.*${message.source}`)));
      await assert.rejects(client.read(0, 512), isNbdError(/protocol violation/));
    }));
  }
});

interface Request { type: number; handle: Buffer; offset: number; length: number }
type Responder = (req: Request, send: (b: Buffer) => void) => void;

const u16 = (n: number) => { const b = Buffer.alloc(2); b.writeUInt16BE(n); return b; };
const u32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
const u64 = (n: number) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; };
/** A structured reply chunk: magic, flags (1 = DONE), type, handle, length, payload. */
const chunk = (flags: number, type: number, handle: Buffer, payload = Buffer.alloc(0)) =>
  Buffer.concat([u32(0x668e33ef), u16(flags), u16(type), handle, u32(payload.length), payload]);

/** Just enough of an NBD server: the fixed newstyle handshake as qemu-nbd does it (1 MiB export), then `respond`. */
function scriptedServer(s: net.Socket, respond: Responder, structured: boolean): void {
  const optionReply = (opt: number, type: number, data = Buffer.alloc(0)) =>
    Buffer.concat([Buffer.from('0003e889045565a9', 'hex'), u32(opt), u32(type), u32(data.length), data]);
  s.write(Buffer.concat([Buffer.from('NBDMAGICIHAVEOPT'), u16(3)]));
  let buf = Buffer.alloc(0);
  let phase: 'flags' | 'options' | 'transmission' = 'flags';
  s.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    if (phase === 'flags' && buf.length >= 4) { buf = buf.subarray(4); phase = 'options'; }
    while (phase === 'options' && buf.length >= 16 && buf.length >= 16 + buf.readUInt32BE(12)) {
      const opt = buf.readUInt32BE(8);
      buf = buf.subarray(16 + buf.readUInt32BE(12));
      if (opt === 8 && !structured) s.write(optionReply(opt, 0x80000001)); // NBD_REP_ERR_UNSUP
      else if (opt === 10) s.write(Buffer.concat([optionReply(opt, 4, Buffer.concat([u32(1), Buffer.from('base:allocation')])), optionReply(opt, 1)]));
      else if (opt === 7) {
        s.write(Buffer.concat([optionReply(opt, 3, Buffer.concat([u16(0), u64(1 * MiB), u16(0b11)])), optionReply(opt, 1)]));
        phase = 'transmission';
      } else s.write(optionReply(opt, 1));
    }
    while (phase === 'transmission' && buf.length >= 28) {
      const req = { type: buf.readUInt16BE(6), handle: Buffer.from(buf.subarray(8, 16)), offset: Number(buf.readBigUInt64BE(16)), length: buf.readUInt32BE(24) };
      buf = buf.subarray(28);
      if (req.type === 2) s.end(); // NBD_CMD_DISC
      else respond(req, (b) => s.write(b));
    }
  });
  s.on('error', () => undefined);
}

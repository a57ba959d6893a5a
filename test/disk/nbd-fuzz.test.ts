/**
 * The NBD server against hostile clients, generated: a valid session's bytes (the
 * handshake, options, reads, block status, cache, flush, a disconnect) mutated at random
 * (bits flipped, fields set to extreme values, bytes inserted, segments dropped,
 * repeated or cut short), sent in random pieces, with the client's side then closed,
 * dropped at once, or kept open. An export listens on the network for as long as its TTL: anyone who can reach
 * the port can send it anything.
 *
 * Invariants, for every session:
 * - F1 the server answers with its greeting first, and closes the connection within a
 *   bound once the client has closed its side (no half-open connection is kept), or at
 *   its handshake timeout when a client went quiet before transmission;
 * - F2 every data chunk it sends (a structured reply's NBD_REPLY_TYPE_OFFSET_DATA,
 *   found by parsing what it sent) lies inside the export and holds the export's bytes;
 * - F3 nothing throws out of the server (an uncaught exception fails the test);
 * and, every 50 sessions and at the end, F4: no connection is left, and a well-behaved
 * client reads the whole export right.
 *
 * Deterministic: session n of seed s is the same on every run (VMVAULT_FUZZ_SEED,
 * VMVAULT_FUZZ_ITERATIONS for a longer run, VMVAULT_FUZZ_ONLY=n to run one).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { NbdClient } from '../../src/disk/nbd.js';
import { NbdServer } from '../../src/disk/nbd-server.js';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
  NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK, NBD_REP_MAGIC, NBD_REPLY_TYPE_OFFSET_DATA, NBD_SIMPLE_REPLY_MAGIC, NBD_SIMPLE_REPLY_SIZE, NBD_STRUCTURED_REPLY_MAGIC, encodeOption, encodeRequest, lengthPrefixed,
} from '../../src/disk/nbd-protocol.js';
import { tempDir, type TempDir } from '../helpers/images.js';
import { BLOCK, BROKEN, SIZE, expected, source } from '../helpers/nbd-source.js';
import { waitFor } from '../helpers/procs.js';
import { Rng, fuzzRun } from '../helpers/rng.js';

const { iterations: ITERATIONS, seed: SEED, only: ONLY } = fuzzRun({ iterations: 400, seed: 0x0bd5 });
/** How long the server may take to close a connection whose client closed its side. */
const CLOSE_BOUND_MS = 3000;

let dir: TempDir;
let server: NbdServer;
let sock: string;
const logged: string[] = [];

before(async () => {
  dir = await tempDir('vmvault-nbd-fuzz-');
  sock = join(dir.path, 's.sock');
  const log = { info: (_o: object, msg: string) => logged.push(msg), warn: (_o: object, msg: string) => logged.push(msg) };
  // Short stall and handshake bounds: a session that stops mid-way is cut in time.
  server = await NbdServer.listen({ path: sock }, { source, name: 'disk', log, stallMs: 2000, handshakeTimeoutMs: 2000 });
});

after(async () => {
  await server?.close();
  await dir?.cleanup();
});

/** A session's client bytes, as segments (each a message), before mutation. */
function validSession(r: Rng): Buffer[] {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (r.chance(0.8) ? NBD_FLAG_C_NO_ZEROES : 0), 0);
  const segments: Buffer[] = [flags];
  const structured = r.chance(0.7);
  if (r.chance(0.2)) segments.push(encodeOption(NBD_OPT_LIST));
  if (r.chance(0.1)) segments.push(encodeOption(NBD_OPT_INFO, Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0])])));
  if (structured) {
    segments.push(encodeOption(NBD_OPT_STRUCTURED_REPLY));
    const query = Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0, 0, 1]), lengthPrefixed('base:allocation')]);
    if (r.chance(0.2)) segments.push(encodeOption(NBD_OPT_LIST_META_CONTEXT, query));
    segments.push(encodeOption(NBD_OPT_SET_META_CONTEXT, query));
  }
  if (r.chance(0.05)) segments.push(encodeOption(NBD_OPT_ABORT));
  if (r.chance(0.15)) segments.push(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  else segments.push(encodeOption(NBD_OPT_GO, Buffer.concat([lengthPrefixed('disk'), Buffer.from([0, 0])])));
  for (let i = 0, n = r.int(12); i < n; i++) {
    const type = r.pick([NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_FLUSH]);
    const offset = r.chance(0.8) ? r.int(SIZE) : r.pick([0, SIZE - 1, SIZE, SIZE + 1, 2 ** 40, Number.MAX_SAFE_INTEGER]);
    const length = r.chance(0.8) ? 1 + r.int(Math.max(1, Math.min(4 * BLOCK, SIZE - Math.min(offset, SIZE - 1)))) : r.pick([0, 1, SIZE, 2 ** 25, 2 ** 32 - 1]);
    segments.push(encodeRequest(type === NBD_CMD_BLOCK_STATUS && r.chance(0.5) ? NBD_CMD_FLAG_REQ_ONE : 0, type, 1 + i, offset, length));
  }
  if (r.chance(0.7)) segments.push(encodeRequest(0, NBD_CMD_DISC, 99, 0, 0));
  return segments;
}

const EXTREMES = [0, 1, 0x7fffffff, 0x80000000, 0xffffffff];

/** The session's bytes after 1 to 4 mutations, and how the client ends it. */
function mutant(index: number): { bytes: Buffer; pieces: number[]; end: 'close' | 'reset' | 'wait'; steps: string[] } {
  const r = new Rng((SEED ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
  const segments = validSession(r);
  const steps: string[] = [];
  for (let m = 0, n = r.chance(0.1) ? 0 : 1 + r.int(4); m < n; m++) {
    const at = r.int(segments.length);
    const seg = Buffer.from(segments[at]!);
    switch (r.int(7)) {
      case 0: {
        const bit = r.int(seg.length * 8);
        seg[bit >> 3]! ^= 1 << (bit & 7);
        segments[at] = seg;
        steps.push(`flip bit ${bit} of segment ${at}`);
        break;
      }
      case 1: {
        if (seg.length < 4) break;
        const pos = r.int(seg.length - 3);
        const v = r.pick(EXTREMES);
        seg.writeUInt32BE(v, pos);
        segments[at] = seg;
        steps.push(`u32 ${v} at ${pos} of segment ${at}`);
        break;
      }
      case 2: {
        const junk = Buffer.alloc(1 + r.int(64));
        for (let i = 0; i < junk.length; i++) junk[i] = r.int(256);
        segments.splice(at, 0, junk);
        steps.push(`insert ${junk.length} random bytes before segment ${at}`);
        break;
      }
      case 3:
        segments.splice(at, 1);
        steps.push(`drop segment ${at}`);
        break;
      case 4:
        segments.splice(at, 0, seg);
        steps.push(`repeat segment ${at}`);
        break;
      case 5: {
        const keep = r.int(seg.length);
        segments[at] = seg.subarray(0, keep);
        steps.push(`cut segment ${at} to ${keep} bytes`);
        break;
      }
      default: {
        // A length field that promises more than follows (or a huge one).
        if (seg.length < 16) break;
        seg.writeUInt32BE(r.pick([seg.length, 4096, 65_536, 0xffffffff]), 12);
        segments[at] = seg;
        steps.push(`length field of segment ${at} changed`);
      }
    }
  }
  const bytes = Buffer.concat(segments);
  const pieces: number[] = [];
  for (let left = bytes.length; left > 0;) {
    const p = Math.min(left, r.chance(0.5) ? left : 1 + r.int(64));
    pieces.push(p);
    left -= p;
  }
  const end = r.chance(0.1) ? 'wait' : r.chance(0.3) ? 'reset' : 'close';
  steps.push(`${pieces.length} piece(s), then ${end}`);
  return { bytes, pieces, end, steps };
}

/** How long a client that went quiet waits for the server: past its handshake timeout. */
const QUIET_WAIT_MS = 2500;

/** Runs one session; returns everything the server sent, and whether the connection was still open at the end of the wait. */
async function session(m: ReturnType<typeof mutant>): Promise<{ got: Buffer; serverClosed: boolean; open: boolean }> {
  const socket = net.createConnection(sock);
  const received: Buffer[] = [];
  let closed = false;
  let serverClosed = false;
  socket.on('data', (d) => received.push(d));
  socket.on('error', () => {});
  socket.on('end', () => { serverClosed = true; });
  const done = new Promise<void>((resolve) => socket.on('close', () => { closed = true; resolve(); }));
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  let at = 0;
  for (const p of m.pieces) {
    if (closed) break;
    socket.write(m.bytes.subarray(at, at + p));
    at += p;
    if (m.pieces.length > 1) await new Promise((r) => setImmediate(r));
  }
  if (m.end === 'reset') {
    await new Promise((r) => setTimeout(r, 20));
    socket.destroy(); // a unix socket has no reset: closed at once, without a half-close first
  } else if (m.end === 'close') {
    socket.end();
  }
  // 'wait' keeps its side open: the server's own bounds must end a handshake that went nowhere.
  const bound = m.end === 'wait' ? QUIET_WAIT_MS : CLOSE_BOUND_MS;
  const timer = new Promise<'late'>((resolve) => setTimeout(() => resolve('late'), bound).unref());
  const open = (await Promise.race([done.then(() => 'closed' as const), timer])) === 'late';
  if (open) socket.destroy();
  return { got: Buffer.concat(received), serverClosed, open };
}

/**
 * F1's greeting and F2: parses what the server sent, option replies and structured
 * replies, checking every data chunk against the export; stops at the first message it
 * cannot frame (a simple reply, whose length depends on the request, or NBD_OPT_EXPORT_NAME's answer).
 */
function checkReplies(got: Buffer): { bad?: string; transmission: boolean } {
  if (got.length === 0) return { transmission: false };
  const greeting = Buffer.from('NBDMAGICIHAVEOPT', 'latin1');
  if (!got.subarray(0, Math.min(16, got.length)).equals(greeting.subarray(0, Math.min(16, got.length)))) return { bad: 'F1 the first bytes are not the greeting', transmission: false };
  let at = 18;
  let transmission = false;
  let structured = false;
  while (at + 8 <= got.length) {
    if (got.readBigUInt64BE(at) === NBD_REP_MAGIC) {
      if (at + 20 > got.length) break;
      // NBD_REP_ACK to NBD_OPT_GO: the connection is in transmission; to NBD_OPT_STRUCTURED_REPLY: with structured replies.
      const option = got.readUInt32BE(at + 8);
      if (got.readUInt32BE(at + 12) === NBD_REP_ACK) {
        if (option === NBD_OPT_GO) transmission = true;
        if (option === NBD_OPT_STRUCTURED_REPLY) structured = true;
      }
      at += 20 + got.readUInt32BE(at + 16);
      continue;
    }
    // Anything else past the option replies is transmission (or NBD_OPT_EXPORT_NAME's answer, which begins it).
    transmission = true;
    if (structured && got.readUInt32BE(at) === NBD_SIMPLE_REPLY_MAGIC) {
      // With structured replies a simple reply answers a command other than a read, or is an error: no data follows.
      at += NBD_SIMPLE_REPLY_SIZE;
      continue;
    }
    if (got.readUInt32BE(at) === NBD_STRUCTURED_REPLY_MAGIC) {
      if (at + 20 > got.length) break;
      const type = got.readUInt16BE(at + 6);
      const length = got.readUInt32BE(at + 16);
      const body = got.subarray(at + 20, at + 20 + length);
      if (type === NBD_REPLY_TYPE_OFFSET_DATA && body.length === length) {
        const bad = checkData(body);
        if (bad) return { bad, transmission };
      }
      at += 20 + length;
      continue;
    }
    break;
  }
  return { transmission };
}

/** Data chunks F2 checked. */
let dataChunks = 0;

/** F2 for one NBD_REPLY_TYPE_OFFSET_DATA chunk's body (its offset, then its data). */
function checkData(body: Buffer): string | undefined {
  dataChunks++;
  if (body.length < 8) return `F2 a data chunk of ${body.length} bytes has no offset`;
  const offset = Number(body.readBigUInt64BE(0));
  const data = body.subarray(8);
  if (offset + data.length > SIZE) return `F2 a data chunk at ${offset} of ${data.length} bytes ends past the export (${SIZE})`;
  if (Math.floor(offset / BLOCK) <= BROKEN && Math.floor((offset + data.length - 1) / BLOCK) >= BROKEN) return `F2 a data chunk at ${offset} covers the block that cannot be produced`;
  if (!data.equals(expected(offset, data.length))) return `F2 the data chunk at ${offset} (${data.length} bytes) is not the export's bytes`;
  return undefined;
}

/** F4: no connection left, and a plain client reads the whole export (but the block that cannot be produced) right. */
async function healthy(): Promise<void> {
  // The client saw each connection close; the server forgets it as its own socket closes, a moment later.
  await waitFor('F4: the server to hold no connection', () => server.connectionCount === 0, 2000, () => `${server.connectionCount} connection(s) left`, 20);
  const client = await NbdClient.connect(sock, { exportName: 'disk' });
  try {
    assert.deepEqual(await client.read(0, BROKEN * BLOCK), expected(0, BROKEN * BLOCK), 'F4 the export reads right');
    assert.deepEqual(await client.read((BROKEN + 1) * BLOCK, SIZE - (BROKEN + 1) * BLOCK), expected((BROKEN + 1) * BLOCK, SIZE - (BROKEN + 1) * BLOCK));
  } finally {
    await client.close();
  }
}

test(`NBD sessions mutated at random never crash the server, leak a connection or serve wrong bytes (seed ${SEED}, ${ONLY === undefined ? ITERATIONS : `session ${ONLY}`})`, { timeout: 30 * 60_000 }, async () => {
  const first = ONLY ?? 0;
  const last = ONLY === undefined ? ITERATIONS : ONLY + 1;
  const violations: string[] = [];
  const crashes: unknown[] = [];
  const onCrash = (err: unknown) => crashes.push(err);
  process.on('uncaughtException', onCrash);
  const outcomes = { withData: 0, serverClosed: 0 };
  const started = Date.now();
  try {
    // Four sessions at once: a server is never faced by one client only.
    for (let base = first; base < last; base += 4) {
      const batch = Array.from({ length: Math.min(4, last - base) }, (_, k) => base + k);
      await Promise.all(batch.map(async (index) => {
        const m = mutant(index);
        try {
          const { got, serverClosed, open } = await session(m);
          const { bad, transmission } = checkReplies(got);
          if (bad) violations.push(`session ${index} (seed ${SEED}): ${m.steps.join('; ')}\n  ${bad}`);
          // F1: a client that closed its side is let go at once; one that went quiet outside transmission (an idle client in transmission may stay), at its handshake timeout.
          if (open && (m.end === 'close' || !transmission)) {
            violations.push(`session ${index} (seed ${SEED}): ${m.steps.join('; ')}\n  F1 the server kept the connection open ${m.end === 'close' ? CLOSE_BOUND_MS : QUIET_WAIT_MS} ms after the client ${m.end === 'close' ? 'closed its side' : 'went quiet'}`);
          }
          if (got.length > 18) outcomes.withData++;
          if (serverClosed) outcomes.serverClosed++;
        } catch (err) {
          violations.push(`session ${index} (seed ${SEED}): ${m.steps.join('; ')}\n  ${(err as Error).message}`);
        }
      }));
      if (crashes.length) break;
      if ((base - first) % 50 < 4) await healthy();
    }
    await healthy();
  } finally {
    process.off('uncaughtException', onCrash);
  }
  assert.deepEqual(crashes, [], 'F3 the server threw');
  assert.deepEqual(violations, [], `${violations.length} session(s) broke an invariant`);
  process.stdout.write(`# ${last - first} sessions in ${((Date.now() - started) / 1000).toFixed(1)} s; ${outcomes.withData} got replies past the greeting, ${dataChunks} data chunk(s) checked; the server closed ${outcomes.serverClosed}; ${logged.length} log line(s)\n`);
  if (ONLY === undefined && ITERATIONS >= 100) {
    assert.ok(outcomes.withData > ITERATIONS / 4, 'too few sessions got past the greeting: the mutations are too coarse');
    assert.ok(dataChunks > ITERATIONS / 4, 'too few data chunks checked: F2 checks little');
  }
});

/**
 * A read-only NBD server for one export whose bytes come from an `NbdSource`: the
 * other half of vmvault's NBD client, so stock tools (qemu-img, qemu's nbd driver,
 * nbdinfo) can read a backup's disk without it ever being written out.
 *
 * Why it looks like this:
 * - Holes are told, not sent: with structured replies, a zero run of a read is one
 *   NBD_REPLY_TYPE_OFFSET_HOLE chunk, and NBD_CMD_BLOCK_STATUS (`base:allocation`)
 *   reports it, so `qemu-img map` and `convert` see the disk as sparse as it was.
 * - A run the source cannot produce (a chunk that fails verification, a storage
 *   error) ends its read with an NBD error (EIO) and nothing of that run: a client
 *   never receives bytes the source did not vouch for.
 * - Memory is bounded by design: a connection serves at most PER_CONNECTION_ACTIVE
 *   requests at once and stops reading the socket while PER_CONNECTION_QUEUED more
 *   wait, or while more than REPLY_BACKLOG bytes of replies are unread; a request
 *   writes one run at a time and waits for the socket to drain before the next; a
 *   read without structured replies (whole before it is sent, so that an error can
 *   still be told) takes its bytes from SIMPLE_READ_BUDGET across all connections
 *   until they are written; at most `loads` runs are being produced at once across
 *   all connections; and connections beyond `maxConnections`, or beyond
 *   PER_PEER_CONNECTIONS from one client (an IPv4 address, an IPv6 /64: nbd-peers.ts),
 *   are refused, after a few log lines a minute (LogBudget), not one each.
 * - A handshake left unfinished holds no slot against a new client for long: when the
 *   server (or that client's share) is full, a newcomer takes the place of the oldest
 *   connection still in its handshake after HANDSHAKE_YIELD_MS. A real client finishes
 *   its handshake in milliseconds; one that opens connections and stalls them can no
 *   longer keep everyone else out for the 30 s of the handshake's timeout.
 * - Each request starts on an event-loop turn of its own, and a block status looks at
 *   most BLOCK_STATUS_SPAN ahead: a client that pipelines cheap requests cannot keep
 *   the loop (and every other client of the process) for itself.
 * - Writes are refused with EPERM (the export is read-only), after their payload has
 *   been read and dropped, so the stream stays in step.
 */
import net from 'node:net';
import { chmod, rm, stat } from 'node:fs/promises';
import { VmvaultError, errnoCode, errorMessage } from '../errors.js';
import { ByteBudget } from '../byte-budget.js';
import { ExactReader } from './nbd-handshake.js';
import { LogBudget, peerKey } from './nbd-peers.js';
import { REPLY_BACKLOG, REPLY_STALL_MS, drained, serveHandshake, type Agreed, type ExportInfo } from './nbd-server-options.js';
import {
  DEFAULT_MAX_PAYLOAD, NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, NBD_CMD_DISC, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_FLUSH,
  NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO, NBD_EPERM,
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC, NBD_REQUEST_SIZE, NBD_SIMPLE_REPLY_MAGIC, NBD_STATE_HOLE, NBD_STATE_ZERO,
  NBD_STRUCTURED_REPLY_MAGIC, readU64, writeU64,
} from './nbd-protocol.js';

/** A run of the export: data, or zeros (unallocated). */
export interface SourceRun { offset: number; length: number; zero: boolean }

/**
 * Where an export's bytes come from. `layout` is synchronous and cheap (it is asked
 * for every read and every block status); `read` does the work.
 */
export interface NbdSource {
  readonly size: number;
  /** Runs covering exactly [offset, offset+length), in order. A data run never spans more than one `read`. */
  layout(offset: number, length: number): SourceRun[];
  /** The bytes of one data run from `layout`. Rejects when they cannot be vouched for; the client then gets EIO. */
  read(offset: number, length: number): Promise<Buffer>;
}

/** Just enough of a logger (pino's fits). */
export interface ServerLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface NbdServerOptions {
  source: NbdSource;
  /** The export's name (what `nbd://host/NAME` asks for); the empty name reaches it too, unless `secretName`. */
  name: string;
  /** Only the name reaches the export, and no reply tells it (ExportInfo.secretName). */
  secretName?: boolean;
  description?: string;
  /** Connections served at once (default 64); more are closed at once. */
  maxConnections?: number;
  /** Runs produced at once across all connections (default 8). */
  loads?: number;
  /** A client that reads none of its replies for this long is disconnected (default REPLY_STALL_MS, 2 minutes). */
  stallMs?: number;
  /** A client that has not finished the handshake after this long is disconnected (default 30 s). */
  handshakeTimeoutMs?: number;
  /** A connection in its handshake for this long gives its place to a new client when the server is full (default HANDSHAKE_YIELD_MS). */
  handshakeYieldMs?: number;
  log?: ServerLog;
}

/** `{ path }` for a unix socket, `{ host, port }` for TCP (port 0: any free port). */
export type ListenAddress = { path: string } | { host: string; port: number };

const PER_CONNECTION_ACTIVE = 4;
const PER_CONNECTION_QUEUED = 32;
/** Block status answers at most this many descriptors at once; the client asks again for the rest. */
const MAX_DESCRIPTORS = 4096;
/**
 * Block status looks at most this far from its offset; the client asks again for the
 * rest (the spec lets a reply cover less than asked). The source's layout is built
 * whole and at once, on the event loop: for all of a 4 GiB request over 64 KiB chunks
 * that is 65,536 runs, tens of milliseconds, and a client may pipeline thousands.
 */
const BLOCK_STATUS_SPAN = 256 * 1024 * 1024;
const HANDSHAKE_TIMEOUT_MS = 30_000;
/** After this long in its handshake, a connection makes room for a new client when the server is full. */
const HANDSHAKE_YIELD_MS = 2_000;
/** Connections from one client (nbd-peers.ts peerKey) at once: one client cannot take every connection. */
const PER_PEER_CONNECTIONS = 16;
/** Bytes of reads without structured replies produced and not yet written, across all connections. */
const SIMPLE_READ_BUDGET = 256 * 1024 * 1024;
/**
 * The zeros of holes in simple replies, sent as many times as a hole needs: one buffer
 * for the whole server, where one the size of the largest hole per connection would
 * keep up to 32 MiB for each connection, outside every other bound.
 */
let zeros: Buffer | undefined;
/** How long a client that sent NBD_CMD_DISC, or whose handshake ended without an export, may keep its side of the connection open. */
const DISCONNECT_GRACE_MS = 5_000;

export class NbdServer {
  /** Open connections, each with its client's key (peerKey). */
  private readonly connections = new Map<net.Socket, string | undefined>();
  /** Connections still in their handshake, with when they came. */
  private readonly handshaking = new Map<net.Socket, number>();
  private readonly refusals: LogBudget;
  private readonly failures: LogBudget;
  private readonly loads: Limiter;
  private readonly simpleBytes = new ByteBudget(SIMPLE_READ_BUDGET);
  private readonly info: ExportInfo;
  private closed = false;

  private constructor(private readonly server: net.Server, private readonly opts: NbdServerOptions, readonly address: ListenAddress) {
    this.loads = new Limiter(opts.loads ?? 8);
    this.refusals = new LogBudget((held) => opts.log?.warn({ refused: held }, `NBD connections refused and not logged one by one: ${held} in the last minute`));
    this.failures = new LogBudget((held) => opts.log?.warn({ failed: held }, `NBD connections ended on an error and not logged one by one: ${held} in the last minute`));
    this.info = {
      name: opts.name, ...(opts.secretName ? { secretName: true } : {}), description: opts.description ?? '', size: opts.source.size,
      transmissionFlags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_CAN_MULTI_CONN, maxPayload: DEFAULT_MAX_PAYLOAD,
    };
    accepting.set(server, (socket) => this.accept(socket));
    // An error accepting a connection (EMFILE when the process is out of descriptors) is
    // emitted on the server: without a listener of its own, the second one (the listen
    // step's `once` takes the first) would end the whole process, every other export with it.
    server.on('error', (err) => this.opts.log?.warn({ err: errorMessage(err) }, 'NBD server could not accept a connection'));
  }

  /**
   * Listen on a unix socket or a TCP address. A unix socket path that already exists
   * is replaced only when it is a socket nobody listens on (left by a killed server);
   * anything else there is refused. A unix socket is made the owner's only (0600).
   */
  static async listen(address: ListenAddress, opts: NbdServerOptions): Promise<NbdServer> {
    if ('path' in address) await clearStaleSocket(address.path);
    // Served once the server is set up (its socket private): one that connects earlier is closed.
    const server = net.createServer({ pauseOnConnect: false }, (socket) => (accepting.get(server) ?? ((s: net.Socket) => s.destroy()))(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => reject(new VmvaultError('NBD', `cannot listen on ${describeAddress(address)}: ${errnoCode(err) ?? err.message}`, { cause: err })));
      if ('path' in address) server.listen(address.path, () => resolve());
      else server.listen(address.port, address.host, () => resolve());
    });
    // The owner's only, whatever the umask: a local user who can connect reads the disk.
    if ('path' in address) await chmod(address.path, 0o600).catch(async (err: unknown) => {
      server.close();
      throw new VmvaultError('NBD', `cannot make ${address.path} private: ${errnoCode(err) ?? errorMessage(err)}`, { cause: err });
    });
    const bound = server.address();
    const actual: ListenAddress = typeof bound === 'object' && bound && 'port' in address ? { host: address.host, port: bound.port } : address;
    return new NbdServer(server, opts, actual);
  }

  /** Connections open right now. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /** Stop listening and drop every connection (in-flight requests are abandoned). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.connections.keys()) s.destroy();
    this.refusals.flush();
    this.failures.flush();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    if ('path' in this.address) await rm(this.address.path, { force: true });
  }

  private accept(socket: net.Socket): void {
    const max = this.opts.maxConnections ?? 64;
    const peer = peerKey(socket.remoteAddress);
    const fromPeer = (): number => peer === undefined ? 0 : [...this.connections.values()].filter((k) => k === peer).length;
    if (!this.closed && this.connections.size >= max) this.yieldHandshake();
    if (!this.closed && peer !== undefined && fromPeer() >= PER_PEER_CONNECTIONS) this.yieldHandshake(peer);
    if (this.closed || this.connections.size >= max || fromPeer() >= PER_PEER_CONNECTIONS) {
      if (this.refusals.take()) {
        this.opts.log?.warn({ connections: this.connections.size, ...(peer ? { peer, address: socket.remoteAddress, fromPeer: fromPeer() } : {}) }, 'NBD connection refused: too many connections');
      }
      socket.destroy();
      return;
    }
    this.connections.set(socket, peer);
    this.handshaking.set(socket, Date.now());
    socket.setNoDelay?.(true);
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      this.connections.delete(socket);
      this.handshaking.delete(socket);
    });
    void this.serve(socket).catch((err) => {
      if (this.failures.take()) this.opts.log?.warn({ err: errorMessage(err) }, 'NBD connection ended on an error');
      socket.destroy();
    });
  }

  /**
   * Closes the connection (of client `peer`, or any) that has been in its handshake the
   * longest, if that is longer than the handshake yield time, to make room for a new one.
   */
  private yieldHandshake(peer?: string): void {
    const before = Date.now() - (this.opts.handshakeYieldMs ?? HANDSHAKE_YIELD_MS);
    let oldest: net.Socket | undefined;
    let oldestAt = Infinity;
    // In the order they came: of those that came in the same millisecond, the first.
    for (const [s, at] of this.handshaking) {
      if (at <= before && at < oldestAt && (peer === undefined || this.connections.get(s) === peer)) {
        oldest = s;
        oldestAt = at;
      }
    }
    if (!oldest) return;
    this.handshaking.delete(oldest);
    this.connections.delete(oldest);
    oldest.destroy();
  }

  private async serve(socket: net.Socket): Promise<void> {
    const reader = new ExactReader();
    const onData = (d: Buffer): void => reader.push(d);
    const onClose = (): void => reader.fail(new VmvaultError('NBD', 'NBD client left during the handshake'));
    socket.on('data', onData);
    socket.on('close', onClose);
    // Closed too: the handshake may be waiting for the client to read its replies, not on the reader.
    const timer = setTimeout(() => {
      reader.fail(new VmvaultError('NBD', 'NBD client did not finish the handshake in time'));
      socket.destroy();
    }, this.opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS);
    let agreed: Agreed | undefined;
    try {
      agreed = await serveHandshake(socket, reader, this.info, this.opts.stallMs);
    } finally {
      this.handshaking.delete(socket);
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
    }
    if (!agreed) {
      socket.end();
      // The handshake's timer is gone: a client that keeps its side open (never reading
      // our FIN) would otherwise hold the connection, and its slot, for good, without
      // ever having named the export.
      setTimeout(() => socket.destroy(), DISCONNECT_GRACE_MS).unref();
      return;
    }
    const t = new Transmission(socket, this.opts.source, agreed, this.loads, this.simpleBytes, this.info.maxPayload, this.opts.stallMs ?? REPLY_STALL_MS);
    socket.on('data', (d: Buffer) => t.push(d));
    const leftover = reader.leftover();
    if (leftover.length > 0) t.push(leftover);
  }
}

/** Each listening server's connection handler, set once it is ready to serve. */
const accepting = new WeakMap<net.Server, (socket: net.Socket) => void>();

function describeAddress(a: ListenAddress): string {
  return 'path' in a ? `unix socket ${a.path}` : `${a.host}:${a.port}`;
}

async function clearStaleSocket(path: string): Promise<void> {
  let st;
  try {
    st = await stat(path);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) throw new VmvaultError('ALREADY_EXISTS', `${path} exists and is not a socket: choose another path for the export`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.createConnection(path);
    probe.once('connect', () => { probe.destroy(); resolve(true); });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new VmvaultError('ALREADY_EXISTS', `something already listens on ${path}: stop it or choose another path for the export`);
  await rm(path, { force: true });
}

/** At most `max` tasks at once; the rest wait in order. */
class Limiter {
  private active = 0;
  private readonly waiting: (() => void)[] = [];
  constructor(private readonly max: number) {}
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.max) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
      this.waiting.shift()?.();
    }
  }
}

interface Request { flags: number; type: number; handle: Buffer; offset: number; length: number }

/** The transmission phase of one connection. */
class Transmission {
  private readonly header = Buffer.alloc(NBD_REQUEST_SIZE);
  private headerFill = 0;
  /** Bytes of a write payload still to drop, and the write waiting for them. */
  private discard = 0;
  private discarding: Request | undefined;
  private readonly queue: Request[] = [];
  private active = 0;
  private disconnecting = false;
  private dead = false;
  /** Requests not yet parsed, kept while the client leaves more than REPLY_BACKLOG of replies unread. */
  private held: Buffer | undefined;

  constructor(
    private readonly socket: net.Socket, private readonly source: NbdSource, private readonly agreed: Agreed,
    private readonly loads: Limiter, private readonly simpleBytes: ByteBudget, private readonly maxPayload: number, private readonly stallMs: number,
  ) {
    socket.on('close', () => { this.dead = true; });
  }

  push(data: Buffer): void {
    if (this.held) {
      this.held = Buffer.concat([this.held, data]);
      return;
    }
    let pos = 0;
    while (pos < data.length && !this.dead && !this.disconnecting) {
      // Replies answered at once (writes refused, flushes) are not queued: a client that
      // sends them without reading what they answer is read no further until it does.
      if (this.socket.writableLength > REPLY_BACKLOG) {
        this.held = data.subarray(pos);
        this.socket.pause();
        void drained(this.socket, this.stallMs).then(() => {
          const rest = this.held!;
          this.held = undefined;
          this.resume();
          this.push(rest);
        });
        return;
      }
      if (this.discard > 0) {
        const n = Math.min(this.discard, data.length - pos);
        this.discard -= n;
        pos += n;
        if (this.discard === 0) this.simple(this.discarding!, NBD_EPERM);
        continue;
      }
      const n = Math.min(NBD_REQUEST_SIZE - this.headerFill, data.length - pos);
      data.copy(this.header, this.headerFill, pos, pos + n);
      this.headerFill += n;
      pos += n;
      if (this.headerFill < NBD_REQUEST_SIZE) break;
      this.headerFill = 0;
      if (this.header.readUInt32BE(0) !== NBD_REQUEST_MAGIC) {
        this.dead = true;
        this.socket.destroy(); // Out of step: nothing after this can be trusted.
        return;
      }
      this.onRequest({
        flags: this.header.readUInt16BE(4), type: this.header.readUInt16BE(6), handle: Buffer.from(this.header.subarray(8, 16)),
        offset: readU64(this.header, 16), length: this.header.readUInt32BE(24),
      });
    }
  }

  private onRequest(r: Request): void {
    switch (r.type) {
      case NBD_CMD_READ:
      case NBD_CMD_BLOCK_STATUS:
        this.queue.push(r);
        if (this.queue.length > PER_CONNECTION_QUEUED) this.socket.pause();
        this.pump();
        return;
      case NBD_CMD_WRITE:
        if (r.length === 0) return this.simple(r, NBD_EPERM);
        this.discard = r.length;
        this.discarding = r;
        return;
      case NBD_CMD_WRITE_ZEROES:
      case NBD_CMD_TRIM:
        return this.simple(r, NBD_EPERM);
      case NBD_CMD_CACHE:
        // A hint, but of a range: one outside the export is an error, as for a read (the spec's SHOULD).
        if (r.offset + r.length > this.source.size) return this.simple(r, NBD_EINVAL);
        return this.simple(r, 0);
      case NBD_CMD_FLUSH:
        return this.simple(r, 0); // Nothing written, nothing to flush.
      case NBD_CMD_DISC:
        this.disconnecting = true;
        this.maybeEnd();
        return;
      default:
        return this.simple(r, NBD_EINVAL);
    }
  }

  private pump(): void {
    while (this.active < PER_CONNECTION_ACTIVE && this.queue.length > 0 && !this.dead) {
      const r = this.queue.shift()!;
      this.active++;
      void this.handle(r).catch(() => this.socket.destroy()).finally(() => {
        this.active--;
        this.resume();
        this.pump();
        this.maybeEnd();
      });
    }
  }

  /** Reads requests again, unless too many wait or replies are held up. */
  private resume(): void {
    if (this.queue.length <= PER_CONNECTION_QUEUED / 2 && !this.disconnecting && !this.held && !this.dead) this.socket.resume();
  }

  /** After NBD_CMD_DISC: answer what was asked before it, then close. */
  private maybeEnd(): void {
    if (this.disconnecting && this.active === 0 && this.queue.length === 0 && !this.dead) {
      this.socket.end();
      // A client that keeps its side open would hold a connection for good.
      setTimeout(() => this.socket.destroy(), DISCONNECT_GRACE_MS).unref();
    }
  }

  private async handle(r: Request): Promise<void> {
    // Each request starts on a turn of its own: a reply that needs no waiting (a block
    // status, a cached chunk, a socket that takes all it is given) would otherwise start
    // the next queued request at once, and a client that pipelines thousands would keep
    // the event loop, and every other client and job of this process, from running.
    await new Promise<void>((resolve) => setImmediate(resolve));
    if (this.dead) return;
    const bad = r.offset + r.length > this.source.size || r.length === 0 || (r.type === NBD_CMD_READ && r.length > this.maxPayload);
    if (r.type === NBD_CMD_READ) {
      if (bad) return this.fail(r, NBD_EINVAL, `read of ${r.length} bytes at ${r.offset} is outside the ${this.source.size}-byte export or too large`);
      return this.agreed.structuredReplies ? this.readStructured(r) : this.readSimple(r);
    }
    if (!this.agreed.structuredReplies || this.agreed.allocationContext === undefined) return this.fail(r, NBD_EINVAL, 'block status needs the base:allocation meta context');
    if (bad) return this.fail(r, NBD_EINVAL, `block status of ${r.length} bytes at ${r.offset} is outside the ${this.source.size}-byte export`);
    const out: number[] = [];
    for (const run of this.source.layout(r.offset, Math.min(r.length, BLOCK_STATUS_SPAN))) {
      const flags = run.zero ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0;
      if (out.length && out[out.length - 1] === flags) out[out.length - 2] = out[out.length - 2]! + run.length;
      else if (out.length / 2 >= MAX_DESCRIPTORS || (out.length && r.flags & NBD_CMD_FLAG_REQ_ONE)) break;
      else out.push(run.length, flags);
    }
    const payload = Buffer.allocUnsafe(4 + out.length * 4);
    payload.writeUInt32BE(this.agreed.allocationContext, 0);
    for (let i = 0; i < out.length; i++) payload.writeUInt32BE(out[i]!, 4 + i * 4);
    await this.chunk(r, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, [payload]);
  }

  private async readStructured(r: Request): Promise<void> {
    const runs = this.source.layout(r.offset, r.length);
    for (let i = 0; i < runs.length; i++) {
      const run = runs[i]!;
      const flags = i === runs.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      const where = Buffer.allocUnsafe(run.zero ? 12 : 8);
      writeU64(where, run.offset, 0);
      if (run.zero) {
        where.writeUInt32BE(run.length, 8);
        await this.chunk(r, flags, NBD_REPLY_TYPE_OFFSET_HOLE, [where]);
        continue;
      }
      if (this.dead) return; // Its client left: the rest would only take loads from the others.
      let data: Buffer;
      try {
        data = await this.loads.run(() => this.source.read(run.offset, run.length));
      } catch (err) {
        return this.fail(r, NBD_EIO, errorMessage(err), run.offset);
      }
      await this.chunk(r, flags, NBD_REPLY_TYPE_OFFSET_DATA, [where, data]);
    }
  }

  /**
   * Without structured replies the error goes in the header, so every run is produced
   * before anything is sent: its bytes are taken from the server's budget until written.
   */
  private readSimple(r: Request): Promise<void> {
    // Checked again once the budget lets it go: the client may have left while it waited.
    return this.simpleBytes.run(r.length, async () => { if (!this.dead) await this.produceSimple(r); });
  }

  private async produceSimple(r: Request): Promise<void> {
    const parts: Buffer[] = [];
    try {
      for (const run of this.source.layout(r.offset, r.length)) {
        if (run.zero) {
          zeros ??= Buffer.alloc(1024 * 1024);
          for (let at = 0; at < run.length; at += zeros.length) parts.push(zeros.subarray(0, Math.min(zeros.length, run.length - at)));
          continue;
        }
        // A client that left gets nothing: the rest of its read would only take loads from the others.
        if (this.dead) return;
        parts.push(await this.loads.run(() => this.source.read(run.offset, run.length)));
      }
    } catch {
      return this.simple(r, NBD_EIO);
    }
    await this.send([this.simpleHeader(r, 0), ...parts]);
    await drained(this.socket, this.stallMs);
  }

  private simpleHeader(r: Request, errno: number): Buffer {
    const h = Buffer.allocUnsafe(16);
    h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(errno, 4);
    r.handle.copy(h, 8);
    return h;
  }

  private simple(r: Request, errno: number): void {
    if (!this.dead) this.socket.write(this.simpleHeader(r, errno));
  }

  /** An error for `r`: a structured error chunk when structured replies are on (reads must not get simple replies then). */
  private async fail(r: Request, errno: number, message: string, offset?: number): Promise<void> {
    if (!this.agreed.structuredReplies) return this.simple(r, errno);
    const msg = Buffer.from(message.slice(0, 1000), 'utf8');
    const payload = Buffer.allocUnsafe(6 + msg.length + (offset === undefined ? 0 : 8));
    payload.writeUInt32BE(errno, 0);
    payload.writeUInt16BE(msg.length, 4);
    msg.copy(payload, 6);
    if (offset !== undefined) writeU64(payload, offset, 6 + msg.length);
    await this.chunk(r, NBD_REPLY_FLAG_DONE, offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET, [payload]);
  }

  private chunk(r: Request, flags: number, type: number, payload: Buffer[]): Promise<void> {
    const h = Buffer.allocUnsafe(20);
    h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    r.handle.copy(h, 8);
    h.writeUInt32BE(payload.reduce((n, b) => n + b.length, 0), 16);
    return this.send([h, ...payload]);
  }

  /** Write the buffers back to back (one reply chunk stays whole), then wait until the socket can take more. */
  private async send(bufs: Buffer[]): Promise<void> {
    if (this.dead) throw new VmvaultError('NBD', 'connection closed', { retriable: false });
    let ok = true;
    for (const b of bufs) ok = this.socket.write(b);
    if (!ok) await drained(this.socket, this.stallMs);
  }
}

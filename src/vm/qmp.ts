/**
 * A small client for the QEMU Machine Protocol (QMP) on a unix socket: the way a
 * running VM is asked to snapshot, commit and report its block devices.
 *
 * Why it looks like this:
 * - Every command carries an `id` and replies are matched by it, so a reply can never
 *   be taken for another command's, whatever order the caller awaits in.
 * - Events arrive whenever QEMU likes, often before the reply of the command that
 *   caused them. They are kept in a short backlog, and `waitEvent` looks there first,
 *   so an event that came between `execute` and `waitEvent` is not missed. An event
 *   is handed to one waiter only.
 * - A QMP monitor serves one client at a time; a second connection gets no greeting
 *   until the first leaves. `connect` therefore times out with a message saying so
 *   instead of hanging.
 */
import net from 'node:net';
import { NotFoundError, VmvaultError } from '../errors.js';

export interface QmpEvent {
  event: string;
  data: any;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  names: Set<string>;
  after: number;
  match: (data: any) => boolean;
  resolve(ev: QmpEvent): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

const DEFAULT_TIMEOUT_MS = 30_000;
/** Events kept for late waiters: by count and by age. */
const BACKLOG_MAX = 512;
const BACKLOG_AGE_MS = 60_000;

export class QmpClient {
  private buffer = '';
  private nextId = 1;
  private seq = 0;
  private closed = false;
  private closeReason: Error | undefined;
  private readonly pending = new Map<string, Pending>();
  private readonly backlog: { seq: number; at: number; ev: QmpEvent }[] = [];
  private readonly waiters = new Set<EventWaiter>();

  private constructor(private readonly socket: net.Socket, readonly socketPath: string) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => this.shutdown(new VmvaultError('QEMU', `QMP connection to ${socketPath} failed: ${err.message}`, { cause: err })));
    socket.on('close', () => this.shutdown(new VmvaultError('QEMU', `QMP connection to ${socketPath} closed (did the VM stop?)`)));
  }

  /**
   * Connects, reads the greeting and enters command mode (qmp_capabilities).
   * NotFoundError when the socket does not exist; QEMU when nothing listens on it or
   * no greeting comes within `timeoutMs` (default 10 s).
   */
  static async connect(socketPath: string, opts: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const socket = await openSocket(socketPath, timeoutMs);
    const client = new QmpClient(socket, socketPath);
    try {
      await client.greeting(timeoutMs);
      await client.execute('qmp_capabilities', undefined, { timeoutMs });
      return client;
    } catch (err) {
      await client.close();
      throw err;
    }
  }

  /**
   * Runs one command and returns its `return` value. A QMP error becomes
   * VmvaultError('QEMU', `<command>: <desc>`); no reply within the timeout (default
   * 30 s) is a QEMU error too.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closed) return Promise.reject(this.closeReason ?? new VmvaultError('QEMU', `QMP connection to ${this.socketPath} is closed`));
    const id = `vmvault-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new VmvaultError('QEMU', `${command}: no reply from QEMU on ${this.socketPath} within ${timeoutMs} ms`, { retriable: true }));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** Runs an HMP command line through `human-monitor-command` and returns what it printed. */
  async hmp(commandLine: string): Promise<string> {
    return await this.execute<string>('human-monitor-command', { 'command-line': commandLine });
  }

  /** A position in the event stream: `waitEvent(..., { after })` only considers events received after it. */
  eventMark(): number {
    return this.seq;
  }

  /**
   * The first event `name` whose data passes `match`, received after `opts.after`
   * (default: any still in the backlog, i.e. of the last minute and not handed to
   * another waiter). Rejects with a QEMU error after `timeoutMs` (default 30 s) or
   * when the connection closes.
   */
  waitEvent(name: string, match: (data: any) => boolean = () => true, timeoutMs = DEFAULT_TIMEOUT_MS, opts: { after?: number } = {}): Promise<any> {
    return this.waitAnyEvent([name], match, timeoutMs, opts).then((ev) => ev.data);
  }

  /**
   * Like waitEvent, for the first of several events (e.g. a block job's READY or
   * COMPLETED, whichever comes): resolves with the whole event.
   */
  waitAnyEvent(names: string[], match: (data: any) => boolean = () => true, timeoutMs = DEFAULT_TIMEOUT_MS, opts: { after?: number } = {}): Promise<QmpEvent> {
    const after = opts.after ?? -1;
    const wanted = new Set(names);
    this.trimBacklog();
    const i = this.backlog.findIndex((b) => b.seq > after && wanted.has(b.ev.event) && safeMatch(match, b.ev.data));
    if (i >= 0) return Promise.resolve(this.backlog.splice(i, 1)[0]!.ev);
    if (this.closed) return Promise.reject(this.closeReason ?? new VmvaultError('QEMU', `QMP connection to ${this.socketPath} is closed`));
    return new Promise((resolve, reject) => {
      const w: EventWaiter = {
        names: wanted, after, match, resolve, reject,
        timer: setTimeout(() => {
          this.waiters.delete(w);
          reject(new VmvaultError('QEMU', `QEMU on ${this.socketPath} sent no ${names.join(' or ')} event within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.waiters.add(w);
    });
  }

  /**
   * Runs a job command (snapshot-save, snapshot-load, …): executes it, waits until
   * the job concludes, reads its error from query-jobs and dismisses it. Throws
   * VmvaultError('QEMU', `<command>: <QEMU's error>`) when the job failed.
   */
  async runJob(command: string, args: Record<string, unknown> & { 'job-id': string }, timeoutMs = 10 * 60_000): Promise<void> {
    const id = args['job-id'];
    const mark = this.eventMark();
    await this.execute(command, args);
    await this.waitEvent('JOB_STATUS_CHANGE', (d) => d?.id === id && (d.status === 'concluded' || d.status === 'null'), timeoutMs, { after: mark });
    const jobs = await this.execute<{ id: string; status: string; error?: string }[]>('query-jobs');
    const job = jobs.find((j) => j.id === id);
    if (job?.status === 'concluded') await this.execute('job-dismiss', { id });
    if (job?.error) throw new VmvaultError('QEMU', `${command}: ${job.error}`);
  }

  /** Closes the connection; pending commands and waiters fail. Idempotent. */
  async close(): Promise<void> {
    if (!this.socket.destroyed) {
      await new Promise<void>((resolve) => {
        this.socket.once('close', () => resolve());
        this.socket.end();
        setTimeout(() => { this.socket.destroy(); resolve(); }, 1000).unref();
      });
    }
    this.shutdown(new VmvaultError('QEMU', `QMP connection to ${this.socketPath} is closed`));
  }

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.onGreeting = undefined;
        reject(new VmvaultError('QEMU', `no QMP greeting on ${this.socketPath} within ${timeoutMs} ms: is it a QMP socket, and is another client (a monitor, another backup) connected to it?`));
      }, timeoutMs);
      this.onGreeting = (err) => {
        clearTimeout(timer);
        this.onGreeting = undefined;
        if (err) reject(err);
        else resolve();
      };
    });
  }

  private onGreeting: ((err?: Error) => void) | undefined;

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: any;
    try {
      msg = JSON.parse(line);
    } catch {
      this.shutdown(new VmvaultError('QEMU', `${this.socketPath} sent something other than QMP JSON: ${line.slice(0, 200)}`));
      this.socket.destroy();
      return;
    }
    if (msg.QMP) {
      this.onGreeting?.();
      return;
    }
    if (typeof msg.event === 'string') {
      this.onEvent(msg as QmpEvent);
      return;
    }
    const p = typeof msg.id === 'string' ? this.pending.get(msg.id) : undefined;
    if (!p) return; // A reply to a command that already timed out.
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.error) p.reject(new VmvaultError('QEMU', `${p.command}: ${msg.error.desc ?? JSON.stringify(msg.error)}`));
    else p.resolve(msg.return);
  }

  private onEvent(ev: QmpEvent): void {
    const seq = ++this.seq;
    for (const w of this.waiters) {
      if (seq > w.after && w.names.has(ev.event) && safeMatch(w.match, ev.data)) {
        this.waiters.delete(w);
        clearTimeout(w.timer);
        w.resolve(ev);
        return;
      }
    }
    this.backlog.push({ seq, at: Date.now(), ev });
    this.trimBacklog();
  }

  private trimBacklog(): void {
    const oldest = Date.now() - BACKLOG_AGE_MS;
    while (this.backlog.length > BACKLOG_MAX || (this.backlog.length > 0 && this.backlog[0]!.at < oldest)) this.backlog.shift();
  }

  private shutdown(reason: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.closeReason = reason;
    this.onGreeting?.(reason);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new VmvaultError('QEMU', `${p.command}: ${reason.message}`, { cause: reason }));
    }
    this.pending.clear();
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(reason);
    }
    this.waiters.clear();
  }
}

function safeMatch(match: (data: any) => boolean, data: any): boolean {
  try {
    return match(data);
  } catch {
    return false;
  }
}

function openSocket(socketPath: string, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new VmvaultError('QEMU', `could not connect to QMP socket ${socketPath} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (err.code === 'ENOENT') {
        reject(new NotFoundError(`QMP socket ${socketPath} does not exist: is the VM running, and is its qmpSocket (QEMU's -qmp unix:PATH,server=on) right?`, { cause: err }));
      } else if (err.code === 'ECONNREFUSED') {
        reject(new VmvaultError('QEMU', `nothing listens on QMP socket ${socketPath} (connection refused): the VM is probably not running`, { cause: err }));
      } else {
        reject(new VmvaultError('QEMU', `cannot connect to QMP socket ${socketPath}: ${err.message}`, { cause: err }));
      }
    });
  });
}

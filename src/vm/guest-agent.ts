/**
 * The QEMU guest agent (qemu-ga) on its host-side socket: freezing the guest's
 * filesystems around the instant a backup is taken, so the backup holds what the
 * guest had flushed rather than what a power cut would leave.
 *
 * The agent protocol is QMP-like JSON lines, but without greeting or ids, and the
 * socket may still hold replies meant for an earlier client. `guest-sync` with a
 * random number is the agreed way to skip those: lines are read until the reply
 * carrying that number.
 *
 * Policy (see withGuestFreeze): an agent that is configured but does not answer, or
 * cannot freeze, does not fail the backup. The backup goes on crash-consistent, as a
 * VM without an agent would, and a warning says so. A scheduled backup that fails
 * because the guest's agent is down would leave no backup at all, which is worse
 * than a crash-consistent one. A thaw is always attempted once a freeze was sent,
 * even when the freeze timed out: the guest may have frozen after all.
 */
import { randomInt } from 'node:crypto';
import net from 'node:net';
import { VmvaultError, errorMessage } from '../errors.js';

export interface GuestAgentOptions {
  /** Connect and guest-sync (default 5 s). */
  syncTimeoutMs?: number;
  /** guest-fsfreeze-freeze (default 60 s: the guest flushes everything first). */
  freezeTimeoutMs?: number;
  /** guest-fsfreeze-thaw, per attempt (default 10 s). */
  thawTimeoutMs?: number;
}

export type Warn = (message: string, fields?: Record<string, unknown>) => void;

/** One connection to a guest agent. */
export class GuestAgent {
  private buffer = '';
  private lines: string[] = [];
  private wake: (() => void) | undefined;
  private failure: Error | undefined;

  private constructor(private readonly socket: net.Socket, readonly socketPath: string) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buffer += d;
      let nl: number;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, nl).replace(/^\xff/, '').trim();
        this.buffer = this.buffer.slice(nl + 1);
        if (line) this.lines.push(line);
      }
      this.wake?.();
    });
    const fail = (err: Error) => {
      this.failure ??= err;
      this.wake?.();
    };
    socket.on('error', (err) => fail(new VmvaultError('QEMU', `guest agent socket ${socketPath}: ${err.message}`, { cause: err })));
    socket.on('close', () => fail(new VmvaultError('QEMU', `guest agent socket ${socketPath} closed`)));
  }

  /** Connects and syncs; QEMU error when the socket is missing or the agent does not answer in time. */
  static async connect(socketPath: string, timeoutMs = 5000): Promise<GuestAgent> {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection(socketPath);
      const timer = setTimeout(() => { s.destroy(); reject(new VmvaultError('QEMU', `could not connect to guest agent socket ${socketPath} within ${timeoutMs} ms`)); }, timeoutMs);
      s.once('connect', () => { clearTimeout(timer); s.removeAllListeners('error'); resolve(s); });
      s.once('error', (err) => { clearTimeout(timer); reject(new VmvaultError('QEMU', `cannot connect to guest agent socket ${socketPath}: ${err.message}`, { cause: err })); });
    });
    const agent = new GuestAgent(socket, socketPath);
    try {
      const id = randomInt(1, 2 ** 31);
      // A 0xFF byte makes an agent discard a half-received earlier command.
      socket.write(Buffer.from([0xff]));
      await agent.call('guest-sync', { id }, timeoutMs, (r) => r === id);
      return agent;
    } catch (err) {
      agent.close();
      throw err;
    }
  }

  /** Freezes the guest's filesystems; returns how many were frozen. */
  async freeze(timeoutMs = 60_000): Promise<number> {
    return await this.call<number>('guest-fsfreeze-freeze', undefined, timeoutMs);
  }

  /** Thaws them; returns how many were thawed. */
  /** guest-ping: the agent is up and answering (a restore drill's probe). */
  async ping(timeoutMs = 5000): Promise<void> {
    await this.call('guest-ping', undefined, timeoutMs);
  }

  async thaw(timeoutMs = 10_000): Promise<number> {
    return await this.call<number>('guest-fsfreeze-thaw', undefined, timeoutMs);
  }

  close(): void {
    this.socket.destroy();
  }

  /** Sends a command and returns the first reply (or the first that `accept`s, skipping stale ones). */
  private async call<T>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number, accept?: (ret: unknown) => boolean): Promise<T> {
    this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) }) + '\n');
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.lines.shift();
      if (line !== undefined) {
        let msg: { return?: unknown; error?: { desc?: string } };
        try {
          msg = JSON.parse(line);
        } catch {
          continue; // Noise from an earlier, interrupted exchange.
        }
        if (msg.error && !accept) throw new VmvaultError('QEMU', `guest agent ${command}: ${msg.error.desc ?? JSON.stringify(msg.error)}`);
        if ('return' in msg && (!accept || accept(msg.return))) return msg.return as T;
        continue;
      }
      if (this.failure) throw this.failure;
      const left = deadline - Date.now();
      if (left <= 0) throw new VmvaultError('QEMU', `guest agent on ${this.socketPath} did not answer ${command} within ${timeoutMs} ms (is qemu-ga running in the guest?)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => { clearTimeout(t); this.wake = undefined; resolve(); };
      });
    }
  }
}

/**
 * Runs `fn` with the guest's filesystems frozen when `socketPath` is given and the
 * agent can freeze them; otherwise runs it unfrozen after a warning (see the file
 * comment). Returns whether the guest was frozen. The thaw runs whatever `fn` does.
 */
export async function withGuestFreeze(
  socketPath: string | undefined, fn: () => Promise<void>, warn: Warn, opts: GuestAgentOptions = {},
): Promise<{ frozen: boolean }> {
  if (!socketPath) {
    await fn();
    return { frozen: false };
  }
  let agent: GuestAgent;
  try {
    agent = await GuestAgent.connect(socketPath, opts.syncTimeoutMs ?? 5000);
  } catch (err) {
    warn(`guest agent not answering: backing up crash-consistent, without freezing the guest's filesystems (${errorMessage(err)})`, { guestAgentSocket: socketPath });
    await fn();
    return { frozen: false };
  }
  try {
    let frozen = false;
    try {
      const n = await agent.freeze(opts.freezeTimeoutMs ?? 60_000);
      frozen = true;
      if (n === 0) warn('the guest agent froze no filesystem: the backup is crash-consistent', { guestAgentSocket: socketPath });
    } catch (err) {
      warn(`guest filesystems could not be frozen: backing up crash-consistent (${errorMessage(err)})`, { guestAgentSocket: socketPath });
    }
    try {
      await fn();
    } finally {
      await thaw(agent, socketPath, warn, opts.thawTimeoutMs ?? 10_000);
    }
    return { frozen };
  } finally {
    agent.close();
  }
}

/** Thaw, retried: a guest left frozen stops writing altogether. Thawing a guest that is not frozen is harmless. */
async function thaw(agent: GuestAgent, socketPath: string, warn: Warn, timeoutMs: number): Promise<void> {
  let last: unknown;
  for (let attempt = 1; attempt <= 3; attempt++) {
    try {
      await agent.thaw(timeoutMs);
      return;
    } catch (err) {
      last = err;
    }
  }
  warn(`GUEST FILESYSTEMS MAY STILL BE FROZEN: guest-fsfreeze-thaw failed three times (${errorMessage(last)}). ` +
    `Thaw by hand: virsh domfsthaw DOMAIN, or send {"execute":"guest-fsfreeze-thaw"} to ${socketPath}`, { guestAgentSocket: socketPath });
}

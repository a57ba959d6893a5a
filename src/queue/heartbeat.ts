/**
 * Worker heartbeats in Redis: every running host agent keeps one key,
 * `vmvault:worker:<host>:<id>`, holding who it is (host, id, pid, version) and when
 * it last wrote, with a TTL of a few intervals. A worker that dies (kill -9, a host
 * gone) stops refreshing its key and Redis drops it: "online" is simply "has a key".
 * Any process with a Redis connection can read them (status, health, metrics,
 * alerts); none keeps state of its own.
 */
import { randomBytes } from 'node:crypto';
import type { RedisConnection } from './connection.js';
import * as z from 'zod';

const PREFIX = 'vmvault:worker:';

/** How often a worker refreshes its key (VMVAULT_HEARTBEAT_MS overrides it in the service). */
export const DEFAULT_HEARTBEAT_MS = 10_000;
/** A key outlives this many missed refreshes before the worker counts as gone. */
const TTL_INTERVALS = 3;

const beatSchema = z.object({
  host: z.string(),
  id: z.string(),
  pid: z.number(),
  version: z.string(),
  startedAt: z.string(),
  lastSeen: z.string(),
});
export type WorkerBeat = z.infer<typeof beatSchema>;

export interface Heartbeat {
  readonly id: string;
  /** Stops refreshing and deletes the key (a clean stop is seen at once, not after the TTL). */
  stop(): Promise<void>;
}

export interface HeartbeatOptions {
  host: string;
  version: string;
  intervalMs?: number;
  /** Told when a refresh fails (Redis away); the next interval tries again. */
  onError?: (err: Error) => void;
}

/** Writes the worker's key now and every intervalMs. */
export async function startHeartbeat(redis: RedisConnection, opts: HeartbeatOptions): Promise<Heartbeat> {
  const id = randomBytes(6).toString('hex');
  const intervalMs = opts.intervalMs ?? DEFAULT_HEARTBEAT_MS;
  const key = `${PREFIX}${opts.host}:${id}`;
  const startedAt = new Date().toISOString();
  const beat = () => {
    const value: WorkerBeat = { host: opts.host, id, pid: process.pid, version: opts.version, startedAt, lastSeen: new Date().toISOString() };
    return redis.set(key, JSON.stringify(value), 'PX', intervalMs * TTL_INTERVALS);
  };
  // One write at a time; stop() waits for the last, so no late write brings the key back after the delete.
  let last: Promise<unknown> = beat().catch((err: Error) => opts.onError?.(err));
  await last;
  let stopped = false;
  const timer = setInterval(() => {
    if (!stopped) last = last.then(() => beat()).catch((err: Error) => opts.onError?.(err));
  }, intervalMs);
  timer.unref();
  return {
    id,
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await last;
      await redis.del(key).catch(() => {});
    },
  };
}

/** Every worker with a live key, by host then id. Unreadable values are skipped. */
export async function liveWorkers(redis: RedisConnection): Promise<WorkerBeat[]> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await redis.scan(cursor, 'MATCH', `${PREFIX}*`, 'COUNT', 500);
    cursor = next;
    keys.push(...batch);
  } while (cursor !== '0');
  if (keys.length === 0) return [];
  const values = await redis.mget(...keys);
  const out: WorkerBeat[] = [];
  for (const v of values) {
    if (!v) continue; // Expired between SCAN and MGET.
    try {
      const r = beatSchema.safeParse(JSON.parse(v));
      if (r.success) out.push(r.data);
    } catch {
      /* not ours */
    }
  }
  return out.sort((a, b) => a.host.localeCompare(b.host) || a.id.localeCompare(b.id));
}

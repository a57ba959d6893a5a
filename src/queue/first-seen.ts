/**
 * When the scheduler first saw a policy, kept in Redis so that every replica and
 * every restart agree: catch-up never runs a slot from before the policy existed.
 * Chosen over the policy file's mtime, which copying, restoring or provisioning a
 * file sets to anything. Losing Redis forgets it; the policy then counts as first
 * seen at the next start, which only means no catch-up on that start.
 */
import type { RedisConnection } from './connection.js';

const key = (policy: string) => `vmvault:policy-first-seen:${policy}`;

/** Records `now` as the policy's first sighting unless one is recorded; returns the recorded one. */
export async function policyFirstSeen(redis: RedisConnection, policy: string, now: Date = new Date()): Promise<Date> {
  await redis.set(key(policy), String(now.getTime()), 'NX');
  const v = Number(await redis.get(key(policy)));
  return Number.isFinite(v) && v > 0 ? new Date(v) : now;
}

/** The recorded first sighting, without recording one (readers such as the status report). */
export async function policyFirstSeenIfRecorded(redis: RedisConnection, policy: string): Promise<Date | undefined> {
  const v = Number(await redis.get(key(policy)));
  return Number.isFinite(v) && v > 0 ? new Date(v) : undefined;
}

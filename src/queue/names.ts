/**
 * Queue names and job ids. BullMQ builds Redis keys as `bull:<queue>:<id>`, so
 * neither a queue name nor a job id may contain ':' (BullMQ itself still lets some
 * through for old repeatable jobs; we refuse them all).
 */
import { VmvaultError } from '../errors.js';

/** Work that runs anywhere: prune, garbage collection, verify. */
export const MAINTENANCE_QUEUE = 'vmvault-maintenance';

const HOST_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;

/** Throws BAD_INPUT unless `host` can name a queue (letters, digits, '.', '_', '-'; no ':'). */
export function assertHostName(host: string): void {
  if (!HOST_RE.test(host)) {
    const why = host.includes(':') ? 'it contains ":"' : host === '' ? 'it is empty' : 'use letters, digits, ".", "_" and "-" only, starting with a letter or digit';
    throw new VmvaultError('BAD_INPUT', `"${host}" is not a valid host name for a queue: ${why}`);
  }
}

/** The queue of one hypervisor host: backup, snapshot and restore of that host's VMs. */
export function hostQueueName(host: string): string {
  assertHostName(host);
  return `vmvault-host-${host}`;
}

/** Throws BAD_INPUT unless `id` is usable as a custom BullMQ job id. */
export function assertJobId(id: string): void {
  if (id === '' || id.length > 512) throw new VmvaultError('BAD_INPUT', `job id "${id.slice(0, 40)}" must have 1 to 512 characters`);
  if (id.includes(':')) throw new VmvaultError('BAD_INPUT', `job id "${id}" contains ":", which BullMQ job ids must not contain`);
  // BullMQ refuses ids that read as integers: those are its own, generated ids.
  if (`${parseInt(id, 10)}` === id) throw new VmvaultError('BAD_INPUT', `job id "${id}" is an integer; custom job ids must not be (BullMQ numbers its own jobs)`);
}

/**
 * A deterministic job id from its parts, e.g. `scheduledJobId(['nightly', 'web-01', slot])`
 * → `nightly-web%2D01-2025%2D01%2D01T02%3A00%3A00.000Z`. Each part has '%', ':' and
 * '-' percent-encoded, so different parts never give the same id and no ':' remains.
 */
export function deterministicJobId(parts: readonly string[]): string {
  if (parts.length === 0) throw new VmvaultError('BAD_INPUT', 'a job id needs at least one part');
  const id = parts.map((p) => p.replace(/[%:-]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`)).join('-');
  assertJobId(id);
  return id;
}

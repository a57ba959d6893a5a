import { copyBytes } from '../bytes.js';
import { IntegrityError } from '../errors.js';

/**
 * The storage seam: a flat namespace of immutable objects addressed by
 * slash-separated names such as `config`, `keys/<id>`, `chunks/ab/<id>`,
 * `backups/<id>`. Every backend passes test/storage/conformance.ts.
 *
 * Contract:
 * - `put` is atomic: a reader sees either the whole object or none of it, never a
 *   partial one, even when the writer is killed. Writing an existing name replaces it.
 * - `get` of a missing name throws `NotFoundError`.
 * - `delete` of a missing name succeeds (idempotent).
 * - `list(prefix)` yields every object whose name starts with `prefix`, each once,
 *   in no particular order; temporary files of interrupted writes are never listed.
 * - Every method may be retried: wrappers (see retry.ts) call them more than once.
 * - Names follow names.ts (relative, no empty, `.` or `..` segment, no backslash or
 *   NUL, no `.tmp-` segment); every method throws VmvaultError('BAD_INPUT') otherwise.
 *   A name is never also a "directory" of other names (`a` and `a/b` cannot both
 *   exist): a directory-backed storage cannot hold both.
 */
export interface Storage {
  /** Where this storage points, safe to print (no credentials). */
  readonly location: string;
  /**
   * Optional: how many chunks a backup keeps in flight (read, sealed or being stored) to
   * keep this backend busy; DEFAULT_CHUNKS_IN_FLIGHT when absent. Each chunk in flight
   * holds a slot of one chunk size, so this is most of a backup's memory for its data.
   * Wrappers pass it on (see `sameBackend`).
   */
  readonly chunksInFlight?: number;
  /**
   * The whole object. With `maxBytes`, an object larger than that throws IntegrityError
   * (tooLarge) before it is read into memory: the backend checks the size it knows first
   * (a file's, a response's Content-Length) and counts what arrives too, in case that
   * size was wrong. Callers read only objects of a kind whose valid size has a bound
   * (repo/object-limits.ts), so a stray or hostile huge file costs an error, not memory.
   */
  get(name: string, opts?: GetOptions): Promise<Uint8Array>;
  /**
   * Optional: reads the whole object into the start of `into` and returns its size, so
   * that a caller with a buffer of its own (a chunk slot: pipeline/pool.ts) allocates and
   * copies nothing per object. An object larger than `into` throws IntegrityError (no
   * valid object of that kind is that large); a missing one NotFoundError, as `get`.
   * Use `getInto(storage, …)`, which falls back to `get` for a backend without it.
   * With `opts.signal`, a network backend stops reading when the signal aborts and
   * rejects with its reason (a restore being cancelled); what was read into `into` is
   * then not to be used.
   */
  getInto?(name: string, into: Uint8Array, opts?: RequestOptions): Promise<number>;
  /**
   * Writes the object whole, replacing what was there. With `opts.signal`, a backend that
   * sends it over the network (S3) stops the request when the signal aborts and rejects
   * with its reason: only for writes whose outcome nobody needs to know, such as a chunk
   * of a backup being cancelled (it is stored whole or not at all, and no manifest
   * references it). Wrappers pass `opts` on.
   */
  put(name: string, data: Uint8Array, opts?: RequestOptions): Promise<void>;
  /** Size in bytes (and when it was last written, where the backend knows), or undefined when the object does not exist. */
  stat(name: string): Promise<ObjectStat | undefined>;
  delete(name: string): Promise<void>;
  list(prefix: string): AsyncIterable<StoredObject>;
  /**
   * Optional: removes what writes that never finished left behind (the temporary file of
   * a writer killed mid-put), if last modified before `before` (ms since the epoch).
   * Only backends that leave such files implement it (local.ts); wrappers pass it on.
   */
  removeTemporary?(before: number): Promise<{ files: number; bytes: number }>;
  /**
   * Optional: what lies at names starting with `prefix` (in its last directory) that is no
   * object, and that `list` therefore leaves out: a FIFO, a symbolic link, a directory or
   * a device where vmvault only ever writes regular files (a damaged or tampered directory
   * repository). Lets "not found" say what is there instead. Only local.ts has them;
   * wrappers pass it on (sameBackend).
   */
  strays?(prefix: string): Promise<Stray[]>;
  /** Release sockets and handles. */
  close(): Promise<void>;
}

export interface ObjectStat {
  size: number;
  /**
   * When the object was last written, in ms since the epoch on the storage's own clock
   * (a file's mtime, S3's Last-Modified), where the backend knows it. One clock for every
   * host that uses the repository: lock expiry is judged on it (repo/locks.ts), as hosts'
   * own clocks may disagree by hours.
   */
  modified?: number;
}

/** Something at an object's name that is no object (Storage.strays), and what it is in words ("a FIFO (named pipe)"). */
export interface Stray { name: string; kind: string }

/** One object of a listing. */
export interface StoredObject extends ObjectStat {
  name: string;
  /**
   * What the backend says identifies the object's content, where a listing gives it (S3's
   * ETag: another ETag, other bytes). A catalogue compares it to notice an object
   * rewritten in place (repo/catalogue.ts).
   */
  etag?: string;
}

/** For `put` and `getInto`: see there. */
export interface RequestOptions {
  /** Aborting it cuts the request short. */
  signal?: AbortSignal;
}

export interface GetOptions {
  /** The most bytes a valid object of this kind can have; larger ones throw IntegrityError. */
  maxBytes?: number;
}

/** `storage.getInto`, or `get` (bounded by `into`) and a copy where the backend has no such method. */
export async function getInto(storage: Storage, name: string, into: Uint8Array, opts?: RequestOptions): Promise<number> {
  if (storage.getInto) return storage.getInto(name, into, opts);
  const data = await storage.get(name, { maxBytes: into.length });
  if (data.length > into.length) throw tooLarge(storage, name, data.length, into.length);
  return copyBytes(data, into);
}

/**
 * What `get` with maxBytes and `getInto` throw for an object larger than any valid one
 * of its kind. `atLeast`: the size is what arrived before the read was cut off.
 */
export function tooLarge(storage: Pick<Storage, 'location'>, name: string, size: number, room: number, atLeast = false): IntegrityError {
  return new IntegrityError(`object ${JSON.stringify(name)} in ${storage.location} is ${atLeast ? 'at least ' : ''}${size} bytes, ` +
    `more than the ${room} any valid one can be: it is damaged (or not vmvault's), and was not read`);
}

/**
 * Chunks in flight for a backend that does not say: enough to hide a round trip per put
 * (S3) behind reading and sealing.
 */
export const DEFAULT_CHUNKS_IN_FLIGHT = 10;

/** What a wrapper repeats of the storage it wraps: where it points and how it is best fed. */
export function sameBackend(storage: Storage): Pick<Storage, 'location' | 'chunksInFlight' | 'strays'> {
  return {
    location: storage.location, ...(storage.chunksInFlight !== undefined ? { chunksInFlight: storage.chunksInFlight } : {}),
    ...(storage.strays ? { strays: storage.strays.bind(storage) } : {}),
  };
}

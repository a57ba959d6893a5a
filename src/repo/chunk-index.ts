/**
 * The chunk index: what the chunk store holds, known without listing it.
 *
 * Index objects, `index/<sha256 of the object>`, are sealed lists of chunk ids. A
 * backup records each chunk it stores (ChunkIndex.add) and writes them as one index
 * object before its manifest commits, and every INDEX_FLUSH_ENTRIES chunks on the way,
 * so a long backup killed midway still leaves most of what it uploaded known. Objects are immutable and named after their content, so a host keeps a
 * local cache of them keyed by name (index-cache.ts): opening the index costs one LIST
 * of `index/` plus one GET per object written since the cache last saw the repository.
 * Garbage collection, under the exclusive lock, replaces them all by a compacted set
 * (gc.ts: the old objects go first, then the unreferenced chunks, then the new objects
 * are written), and deletes them all before it frees room on a full repository without
 * its lock, so an index object never claims a chunk gc deleted. A repository with no index object
 * at all (made by an older vmvault) is listed once and indexed.
 *
 * In memory the index is a sorted array of 64-bit id prefixes: 8 bytes a chunk, about
 * 8 MB for a million chunks (20 TiB of 4 MiB chunks), against the ~150 bytes a chunk
 * of a Set of hex strings. Ids are keyed hashes (crypto/keys.ts), so no one without
 * the key can make two ids share a prefix, and chance does it with probability about
 * n/2^64 per lookup. How a backup uses the claims: ChunkIndex below.
 */
import { createHash } from 'node:crypto';
import { IntegrityError, NotFoundError } from '../errors.js';
import { SEAL_OVERHEAD, additionalData, open, seal } from '../crypto/seal.js';
import type { Storage } from '../storage/storage.js';
import { chunkName, implausibleChunkSize, isChunkId } from './chunk.js';
import type { IndexCache } from './index-cache.js';

export const INDEX_PREFIX = 'index/';
/** Chunks a writer records before it writes an index object on the way (64 GiB of 4 MiB chunks). */
export const INDEX_FLUSH_ENTRIES = 16384;
/** Chunks per object when gc compacts the index (2 MiB objects). */
export const INDEX_OBJECT_ENTRIES = 65536;
/** Index objects read at once when loading the index, and their total size (readGroups). */
const INDEX_READS_AT_ONCE = 8;
const INDEX_READ_BYTES = 2 * 1024 * 1024;

const MAGIC = Buffer.from('VVIX');
const VERSION = 1;
const HEADER = 12;
const ID_BYTES = 32;

/**
 * The most bytes a valid index object has as stored: writers put at most
 * INDEX_OBJECT_ENTRIES ids in one (Repository.writeIndex), 2 MiB and a header sealed.
 * Twice that, so a larger object is refused as damaged before it is read
 * (repo/object-limits.ts says why reads are bounded).
 */
export const INDEX_OBJECT_MAX_BYTES = 2 * (HEADER + INDEX_OBJECT_ENTRIES * ID_BYTES + SEAL_OVERHEAD);

/** What this module needs of a repository (Repository has it). */
export interface IndexRepo {
  readonly id: string;
  readonly keys: { readonly encKey: Uint8Array };
  readonly storage: Storage;
}

const isIndexName = (name: string) => /^index\/[0-9a-f]{64}$/.test(name);

/** Seals a list of chunk ids as one index object; returns its name and bytes. */
export function sealIndex(repo: IndexRepo, ids: readonly string[]): { name: string; data: Buffer } {
  const plain = Buffer.alloc(HEADER + ids.length * ID_BYTES);
  MAGIC.copy(plain, 0);
  plain.writeUInt32BE(VERSION, 4);
  plain.writeUInt32BE(ids.length, 8);
  ids.forEach((id, i) => {
    if (!isChunkId(id)) throw new Error(`not a chunk id: ${id}`);
    plain.write(id, HEADER + i * ID_BYTES, 'hex');
  });
  // The name is the hash of the sealed bytes, which the additional data cannot bind:
  // it binds the type instead, and a cached copy is checked against its name.
  const data = seal(repo.keys.encKey, 'index', plain, additionalData(repo.id, 'index', ''));
  return { name: `${INDEX_PREFIX}${sha256(data)}`, data };
}

/** The raw 32-byte ids of an index object; IntegrityError naming it when it is not one. */
export function openIndex(repo: IndexRepo, name: string, sealed: Uint8Array): Buffer {
  if (`${INDEX_PREFIX}${sha256(sealed)}` !== name) throw new IntegrityError(`index object ${name} is damaged: its content does not match its name`);
  const plain = open(repo.keys.encKey, 'index', sealed, additionalData(repo.id, 'index', ''), `index object ${name}`);
  if (plain.length < HEADER || !plain.subarray(0, 4).equals(MAGIC)) throw new IntegrityError(`index object ${name} is not an index`);
  if (plain.readUInt32BE(4) !== VERSION) throw new IntegrityError(`index object ${name} has unknown version ${plain.readUInt32BE(4)}: upgrade vmvault`);
  const count = plain.readUInt32BE(8);
  if (plain.length !== HEADER + count * ID_BYTES) throw new IntegrityError(`index object ${name} is truncated`);
  return plain.subarray(HEADER);
}

function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** The names of the index objects storage has now. */
export async function indexNames(storage: Storage): Promise<string[]> {
  return (await indexObjects(storage)).map((o) => o.name);
}

/** The index objects storage has now, with their sizes, by name. */
async function indexObjects(storage: Storage): Promise<{ name: string; size: number }[]> {
  const objects: { name: string; size: number }[] = [];
  for await (const o of storage.list(INDEX_PREFIX)) if (isIndexName(o.name)) objects.push({ name: o.name, size: o.size });
  return objects.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * Consecutive groups of objects to read at once: at most `count` objects and, unless one
 * object alone is larger, `bytes` bytes each. A host with no cache (a new one, or one whose
 * cache was lost) reads every object, and on S3 each is a round trip: the many small
 * objects backups leave between two gc runs are read several at a time, the large ones gc
 * writes (2 MiB) about one at a time, so that memory does not grow with the concurrency.
 */
function readGroups<T extends { size: number }>(objects: readonly T[], count: number, bytes: number): T[][] {
  const groups: T[][] = [];
  let group: T[] = [];
  let size = 0;
  for (const o of objects) {
    if (group.length && (group.length === count || size + o.size > bytes)) {
      groups.push(group);
      group = [];
      size = 0;
    }
    group.push(o);
    size += o.size;
  }
  if (group.length) groups.push(group);
  return groups;
}

export interface IndexLoad {
  /** Index objects read, and how many of them came from storage rather than the cache. */
  objects: number;
  fetched: number;
  /** Objects that could not be used (damaged): their chunks are simply unknown, which costs uploads. */
  damaged: { name: string; problem: string }[];
  /** True when the repository had no index and its chunk store was listed to make one. */
  built: boolean;
}

/**
 * Reads every index object (through the cache) into sorted 64-bit prefixes. A damaged
 * object costs only the chunks it lists, which are then uploaded again when met.
 */
export async function loadPrefixes(repo: IndexRepo, cache: IndexCache | undefined): Promise<{ prefixes: BigUint64Array; load: IndexLoad }> {
  const objects = await indexObjects(repo.storage);
  const names = objects.map((o) => o.name);
  const load: IndexLoad = { objects: names.length, fetched: 0, damaged: [], built: false };
  // Each object is turned into prefixes at once and dropped: memory is 8 bytes a chunk, not
  // 32 plus the sealed copy. The prefixes of each object are kept apart until all are read,
  // then copied once into an array of the exact total: growing one array by doubling held up
  // to three times the final size at the end (the doubled array, its trimmed copy, garbage).
  const parts: (BigUint64Array | undefined)[] = [];
  let total = 0;
  const readObject = async (name: string): Promise<void> => {
    let sealed: Uint8Array | undefined = await cache?.get(name);
    const cached = sealed !== undefined;
    if (!sealed) {
      try {
        sealed = await repo.storage.get(name, { maxBytes: INDEX_OBJECT_MAX_BYTES });
      } catch (err) {
        if (err instanceof NotFoundError) return; // compacted by gc meanwhile
        if (!(err instanceof IntegrityError)) throw err;
        load.damaged.push({ name, problem: err.message }); // far too large to be an index object
        return;
      }
      load.fetched++;
    }
    let ids: Buffer;
    try {
      ids = openIndex(repo, name, sealed);
    } catch (err) {
      if (!(err instanceof IntegrityError)) throw err;
      load.damaged.push({ name, problem: err.message });
      return;
    }
    if (!cached) await cache?.put(name, sealed);
    const part = new BigUint64Array(ids.length / ID_BYTES);
    for (let i = 0; i < part.length; i++) part[i] = ids.readBigUInt64BE(i * ID_BYTES);
    parts.push(part);
    total += part.length;
  };
  for (const group of readGroups(objects, INDEX_READS_AT_ONCE, INDEX_READ_BYTES)) await Promise.all(group.map((o) => readObject(o.name)));
  await cache?.retain(names);
  const prefixes = new BigUint64Array(total);
  let at = 0;
  for (let i = 0; i < parts.length; i++) {
    prefixes.set(parts[i]!, at);
    at += parts[i]!.length;
    parts[i] = undefined;
  }
  prefixes.sort();
  return { prefixes: dedupe(prefixes), load };
}

/** Removes repeated values of a sorted array, in place; the result may be a view of it. */
function dedupe(sorted: BigUint64Array): BigUint64Array {
  if (sorted.length < 2) return sorted;
  let w = 1;
  for (let r = 1; r < sorted.length; r++) if (sorted[r] !== sorted[w - 1]) sorted[w++] = sorted[r]!;
  return w === sorted.length ? sorted : sorted.subarray(0, w);
}

function prefixOf(id: string): bigint {
  return BigInt(`0x${id.slice(0, 16)}`);
}

function contains(sorted: BigUint64Array, p: bigint): boolean {
  let lo = 0;
  let hi = sorted.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const v = sorted[mid]!;
    if (v === p) return true;
    if (v < p) lo = mid + 1;
    else hi = mid - 1;
  }
  return false;
}

/**
 * What storage has, as one backup sees it. Two questions, two levels of proof:
 * - `has(id)`, for a chunk the backup does not read (unchanged since the previous
 *   backup of the disk): the index's claim, minus quarantined chunks (repo/health.ts).
 *   gc never deletes a chunk a manifest references, so the claim is true unless storage
 *   lost the object behind vmvault's back; the reader asks `present` of each such chunk
 *   before the disk is done (chunk-reader.ts checkUnread), and reads one storage lacks.
 * - `present(id)`, for a chunk the backup has just read and hashed: one stat of its
 *   object, once per session. A chunk the index claims but storage lacks is uploaded
 *   again; a chunk storage has but the index does not know (uploaded by a backup killed
 *   before it wrote its index, or by another host a moment ago) is not uploaded twice,
 *   and goes into this session's index. A stat costs far less than the read and hash of
 *   the chunk that precedes it, so the cost stays bounded by what the backup reads.
 * Memory beyond the prefixes is bounded by the backup's own chunks.
 */
export class ChunkIndex {
  /** Stored or found by this session: storage surely has them. */
  private readonly sure = new Set<string>();
  /** Chunks storage turned out to lack. */
  private readonly lacking = new Set<string>();
  /** Stats asked of storage; index claims found missing; chunks found stored but not indexed; stored objects no sealed chunk can be (uploaded again). */
  readonly counts = { checked: 0, missing: 0, unindexed: 0, damaged: 0 };

  /**
   * This backup's chunks that no index object lists yet (stored now, or found stored):
   * written by flush(), on the way and before the manifest commits, and dropped with the
   * backup when it fails, so that no other job ever indexes chunks gc may since have
   * collected as unreferenced.
   */
  private readonly pending: string[] = [];

  constructor(
    private readonly prefixes: BigUint64Array,
    private readonly excluded: ReadonlySet<string>,
    private readonly storage: Storage,
    readonly load: IndexLoad,
    /** Writes index objects (Repository.writeIndex). */
    private readonly write: (ids: readonly string[]) => Promise<unknown> = async () => {},
    /** The repository's chunk size: a stored object no sealed chunk of it can be is not a chunk (chunk.ts implausibleChunkSize). */
    private readonly chunkSize = Number.MAX_SAFE_INTEGER,
  ) {}

  /** Writes the pending entries as an index object: all of them, or only once INDEX_FLUSH_ENTRIES have gathered. */
  async flush(all: boolean): Promise<void> {
    if (this.pending.length === 0 || (!all && this.pending.length < INDEX_FLUSH_ENTRIES)) return;
    const ids = this.pending.splice(0);
    try {
      await this.write(ids);
    } catch (err) {
      this.pending.unshift(...ids);
      throw err;
    }
  }

  /** Chunks the index claims (before quarantine and this session's additions). */
  get size(): number { return this.prefixes.length; }

  /** Whether a chunk may be referenced unread: claimed by the index (or stored now), not quarantined, not found missing. */
  has(id: string): boolean {
    if (this.sure.has(id)) return true;
    if (this.excluded.has(id) || this.lacking.has(id)) return false;
    return contains(this.prefixes, prefixOf(id));
  }

  /** Records a chunk this session stored. */
  add(id: string): void {
    if (!this.sure.has(id)) this.pending.push(id);
    this.sure.add(id);
    this.lacking.delete(id);
  }

  /** Whether storage has a chunk just read (see above); false means it must be uploaded. Quarantined chunks are always uploaded, which heals them. */
  async present(id: string): Promise<boolean> {
    if (this.sure.has(id)) return true;
    if (this.excluded.has(id) || this.lacking.has(id)) return false;
    const claimed = contains(this.prefixes, prefixOf(id));
    this.counts.checked++;
    const stored = await this.storage.stat(chunkName(id));
    // An object of a size no sealed chunk has (zero-length after a crash that lost its data,
    // a copy cut short) is not reused: the chunk just read is uploaded over it.
    if (stored && implausibleChunkSize(stored.size, this.chunkSize)) {
      this.counts.damaged++;
      this.lacking.add(id);
      return false;
    }
    if (stored) {
      this.sure.add(id);
      if (!claimed) {
        this.counts.unindexed++;
        this.pending.push(id);
      }
      return true;
    }
    if (claimed) this.counts.missing++;
    this.lacking.add(id);
    return false;
  }
}

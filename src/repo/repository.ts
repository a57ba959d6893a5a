/**
 * A repository: the plaintext config, the sealed keys, the chunk store and the
 * manifests, on any Storage. Opening needs a passphrase that opens one of the keys.
 */
import { randomBytes } from 'node:crypto';
import * as z from 'zod';
import { compress, decompress } from 'zstd-napi';
import { IntegrityError, NotFoundError, VmvaultError, errorMessage } from '../errors.js';
import { getInto, type RequestOptions, type Storage } from '../storage/storage.js';
import { readOnly } from '../storage/read-only.js';
import {
  constantTimeEqualHex, deriveKeys, generateMaster, KDF_OPEN_BUDGET, KDF_PRESET_MAX_COST, kdfCost, keyFileSchema, mac, openMaster, sealMaster,
  type ChunkIdHash, type KdfPreset, type KeyFile, type RepoKeys,
} from '../crypto/keys.js';
import { cachedMaster, storeMaster, type KeyCache } from '../crypto/key-cache.js';
import { blake3Unavailable } from '../crypto/chunk-id.js';
import { blake2bReady } from '../crypto/blake2b.js';
import { additionalData, open, seal } from '../crypto/seal.js';
import { toPaper, fromPaper } from '../crypto/paper.js';
import { chunkName, isChunkId, type ChunkKeys } from './chunk.js';
import { UnreadableManifestError, backupName, manifestSchema, summarise, type BackupSummary, type Manifest } from './manifest.js';
import { quarantinedChunkIds, release, removeVerification } from './health.js';
import { ChunkIndex, INDEX_OBJECT_ENTRIES, indexNames, loadPrefixes, sealIndex } from './chunk-index.js';
import { MANIFEST_MAX_BYTES, MANIFEST_READ_BUDGET, SMALL_OBJECT_MAX_BYTES } from './object-limits.js';
import { IndexCache, SummaryCache, defaultCacheDir } from './index-cache.js';
import { ByteBudget } from '../byte-budget.js';

export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;

const configFields = {
  id: z.string().regex(/^[0-9a-f]{32}$/),
  chunkSize: z.number().int().min(64 * 1024).max(64 * 1024 * 1024).refine((n) => (n & (n - 1)) === 0, 'a power of two'),
  compression: z.enum(['zstd', 'none']),
  created: z.string(),
  mac: z.string().regex(/^[0-9a-f]{64}$/),
};
/**
 * Format 1: chunk ids are keyed BLAKE2b (every vmvault reads it). Format 2 names its
 * chunk id function (`chunkIdHash`); vmvault before format 2 refuses such a repository
 * instead of writing chunks under ids that would not match. Format 3 is format 2 with
 * keyed BLAKE3 chunk ids, under a new number so that vmvault before it says "made by
 * a newer vmvault" rather than "damaged".
 */
const configSchema = z.discriminatedUnion('version', [
  z.object({ version: z.literal(1), ...configFields }),
  z.object({ version: z.literal(2), chunkIdHash: z.enum(['blake2b', 'hmac-sha256']), ...configFields }),
  z.object({ version: z.literal(3), chunkIdHash: z.literal('blake3'), ...configFields }),
]);
export type RepoConfig = z.infer<typeof configSchema>;
/** The newest repository format this vmvault reads and writes. */
export const REPOSITORY_FORMAT = 3;

/** The format a new repository with this chunk id function gets. */
const FORMAT_OF: Record<ChunkIdHash, 1 | 2 | 3> = { blake2b: 1, 'hmac-sha256': 2, blake3: 3 };

function configMac(keys: RepoKeys, c: DistributiveOmit<RepoConfig, 'mac'>): string {
  const fields: unknown[] = [c.version, c.id, c.chunkSize, c.compression, c.created];
  if (c.version !== 1) fields.push(c.chunkIdHash);
  return mac(keys.macKey, JSON.stringify(fields));
}
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

/** Keyed BLAKE3 where this host has its native code, else HMAC-SHA-256 (and a warning saying why). */
function defaultChunkIdHash(onWarning?: (message: string) => void): ChunkIdHash {
  const why = blake3Unavailable();
  if (!why) return 'blake3';
  onWarning?.(`this host cannot load BLAKE3's native code (@napi-rs/blake-hash: ${why}): the new repository's chunk ids are HMAC-SHA-256 (format 2)`);
  return 'hmac-sha256';
}

/** The chunk id function of a repository with this config. */
export function chunkIdHashOf(c: RepoConfig): ChunkIdHash {
  return c.version === 1 ? 'blake2b' : c.chunkIdHash;
}

/** `damaged` says why a key file cannot be used; such a key has no `created` date (''). */
export interface KeyInfo { id: string; created: string; label?: string; current: boolean; damaged?: string }

/** An object that is there but cannot be used (not JSON, fails authentication, swapped…). */
export interface DamagedObject { id: string; name: string; problem: string }

/** A manifest as the storage lists it. */
export interface ListedBackup { id: string; size: number; modified?: number; etag?: string }

export interface OpenOptions {
  /**
   * The caller promises to only read (`--no-lock`): read paths take no lock, and the
   * storage refuses every write, so a command that would write fails instead of
   * writing without the protection of a lock.
   */
  noLock?: boolean;
  /** Where warnings go (damaged objects skipped, no lock taken…); default process.emitWarning. */
  onWarning?: (message: string) => void;
  /** This host's cache of the chunk index (index-cache.ts); default from the environment, false for none. */
  cacheDir?: string | false;
  /**
   * This host's cache of opened keys (src/crypto/key-cache.ts): skips Argon2id when
   * this passphrase opened this exact key object here before. Only for passphrases
   * stored on the host anyway (a file, the environment, the service's configuration).
   */
  keyCache?: KeyCache;
  /**
   * How long to wait for a lock another process holds (`--retry-lock`), trying again
   * with backoff, before failing with LOCKED; default 0 (fail at once). `signal` ends
   * the wait early (Ctrl-C).
   */
  lockWait?: LockWait;
}

export interface LockWait { ms: number; signal?: AbortSignal }

interface Session { noLock: boolean; warn: (message: string) => void; cacheDir: string | undefined; lockWait: LockWait | undefined }

const defaultSession = (opts: OpenOptions = {}): Session => ({
  noLock: !!opts.noLock,
  lockWait: opts.lockWait,
  warn: opts.onWarning ?? ((message) => process.emitWarning(message, { code: 'VMVAULT' })),
  cacheDir: opts.cacheDir === false ? undefined : opts.cacheDir ?? defaultCacheDir(),
});

export interface InitOptions {
  chunkSize?: number;
  compression?: 'zstd' | 'none';
  kdf?: KdfPreset;
  label?: string;
  /**
   * The chunk id function: keyed BLAKE3 (format 3) by default, or HMAC-SHA-256 where
   * this host cannot load BLAKE3's native code (with a warning). `hmac-sha256` makes a
   * format-2 repository and `blake2b` a format-1 one, for vmvault releases older than
   * format 3 or 2 to read.
   */
  chunkIdHash?: ChunkIdHash;
  /**
   * This host's key cache (src/crypto/key-cache.ts), filled as an open fills it: the
   * next command here does not run Argon2id again for the passphrase just chosen.
   */
  keyCache?: KeyCache;
  onWarning?: (message: string) => void;
}

export class Repository {
  /** Quarantined chunks chunkIndex() left out: the next put of one of them heals it. */
  private readonly toHeal = new Set<string>();
  /** Manifest sizes from the last listing of backups/ (replaced by each: pruned ones drop out), and the bytes of manifests being read at once (loadManifest). */
  private listedManifestBytes = new Map<string, number>();
  private readonly manifestReads = new ByteBudget(MANIFEST_READ_BUDGET);
  private cache: IndexCache | undefined | null = null;
  private summaries: SummaryCache | undefined | null = null;

  private constructor(
    readonly storage: Storage,
    readonly config: RepoConfig,
    readonly keys: RepoKeys,
    private readonly master: Uint8Array,
    /** The key file this session opened with. */
    readonly keyId: string,
    private readonly session: Session = defaultSession(),
  ) {}

  /** True when opened with `noLock`: see OpenOptions. */
  get noLock(): boolean { return this.session.noLock; }

  /** How long lock acquisition waits for another process's lock: see OpenOptions. */
  get lockWait(): LockWait | undefined { return this.session.lockWait; }

  /** Reports something the operator should know that does not stop the operation. */
  warn(message: string): void { this.session.warn(message); }

  get id(): string { return this.config.id; }
  get chunkSize(): number { return this.config.chunkSize; }
  /**
   * zstd level 1, as Proxmox Backup Server uses: on the benchmark's mixed image it is
   * 13% faster than level 3 for 3% more stored bytes. Only writers use it; any level reads back.
   */
  get compressionLevel(): number { return this.config.compression === 'zstd' ? 1 : 0; }

  static async init(storage: Storage, passphrase: string, opts: InitOptions = {}): Promise<Repository> {
    await blake2bReady();
    if (await storage.stat('config')) {
      throw new VmvaultError('ALREADY_EXISTS', `a repository already exists at ${storage.location}; nothing was changed`);
    }
    const master = generateMaster();
    const idHash = opts.chunkIdHash ?? defaultChunkIdHash(opts.onWarning);
    const noBlake3 = idHash === 'blake3' ? blake3Unavailable() : undefined;
    if (noBlake3) {
      throw new VmvaultError('UNSUPPORTED', `cannot make a repository with BLAKE3 chunk ids: this host cannot load its native code (@napi-rs/blake-hash: ${noBlake3}); choose --chunk-id hmac-sha256; nothing was changed`);
    }
    const keys = deriveKeys(master, idHash);
    const common = {
      id: randomBytes(16).toString('hex'),
      chunkSize: opts.chunkSize ?? DEFAULT_CHUNK_SIZE,
      compression: opts.compression ?? 'zstd',
      created: new Date().toISOString(),
    };
    const format = FORMAT_OF[idHash];
    const body: DistributiveOmit<RepoConfig, 'mac'> = format === 1
      ? { version: 1, ...common }
      : format === 2 ? { version: 2, chunkIdHash: idHash as 'hmac-sha256', ...common } : { version: 3, chunkIdHash: 'blake3', ...common };
    const config = configSchema.safeParse({ ...body, mac: configMac(keys, body) });
    if (!config.success) {
      throw new VmvaultError('BAD_INPUT', `invalid repository settings: ${config.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    }
    const keyId = randomBytes(8).toString('hex');
    const keyFile = encodeJson(await sealMaster(master, passphrase, body.id, opts.kdf ?? 'moderate', opts.label));
    await storage.put(`keys/${keyId}`, keyFile);
    const repo = new Repository(storage, config.data, keys, master, keyId);
    // An empty chunk index: a repository with none was made by an older vmvault, and is indexed by listing it once.
    await repo.writeIndex([]);
    // The config is written last: a repository exists once its config does.
    await storage.put('config', encodeJson(config.data));
    const cache = opts.keyCache;
    if (cache) {
      // The key file as an open reads it back (the cache entry is bound to that).
      const file = keyFileSchema.parse(parseJson(keyFile, `keys/${keyId}`));
      await storeMaster(cache, body.id, keyId, file, passphrase, master).catch((err: unknown) =>
        opts.onWarning?.(`could not write the key cache in ${cache.dir}: ${errorMessage(err)}`));
    }
    return repo;
  }

  static async readConfig(storage: Storage): Promise<RepoConfig> {
    let raw: Uint8Array;
    try {
      raw = await storage.get('config', { maxBytes: SMALL_OBJECT_MAX_BYTES });
    } catch (err) {
      if (err instanceof NotFoundError) {
        throw new VmvaultError('NO_REPOSITORY', `there is no vmvault repository at ${storage.location}: check --repo or VMVAULT_REPOSITORY, or create one with "vmvault init"`);
      }
      if (err instanceof IntegrityError) {
        throw new IntegrityError(`the repository config at ${storage.location} is damaged: ${err.message}; put back a copy of the file "config" (it holds no secret)`, { cause: err });
      }
      throw err;
    }
    const fix = 'put back a copy of the file "config" (it holds no secret), from another copy of this repository or a backup of it';
    let json: unknown;
    try {
      json = parseJson(raw, 'config');
    } catch (err) {
      throw new IntegrityError(`the repository config at ${storage.location} is damaged (${raw.length} bytes, not valid JSON): ${fix}`, { cause: err });
    }
    const parsed = configSchema.safeParse(json);
    if (!parsed.success) {
      const version = (json as { version?: unknown } | null)?.version;
      if (typeof version === 'number' && Number.isInteger(version) && version > REPOSITORY_FORMAT) {
        throw new VmvaultError('UNSUPPORTED', `the repository at ${storage.location} has format ${version}, made by a newer vmvault; this vmvault reads formats 1 to ${REPOSITORY_FORMAT}: upgrade vmvault on this host; nothing was changed`);
      }
      throw new IntegrityError(`the repository config at ${storage.location} is damaged or from an unknown version: ${fix}`);
    }
    return parsed.data;
  }

  static async open(storage: Storage, passphrase: string, opts: OpenOptions = {}): Promise<Repository> {
    await blake2bReady();
    const session = defaultSession(opts);
    const store = session.noLock ? readOnly(storage, 'opened with --no-lock, which only reads') : storage;
    const config = await Repository.readConfig(store);
    const { files, damaged } = await Repository.readKeyFiles(store);
    const opened = (master: Uint8Array, keyId: string): Repository => {
      // Another key opened the repository: a damaged one costs only itself, but should be fixed.
      for (const d of damaged) session.warn(`key file ${d.name} is damaged (${d.problem}) and was skipped; remove it with "vmvault key remove ${d.id}"`);
      return Repository.withMaster(store, config, master, keyId, session);
    };
    const cache = opts.keyCache;
    if (cache) {
      for (const [keyId, file] of files) {
        const master = await cachedMaster(cache, config.id, keyId, file, passphrase).catch((err: unknown) => {
          session.warn(`the key cache in ${cache.dir} was not used: ${errorMessage(err)}`);
          return undefined;
        });
        if (master) return opened(master, keyId);
      }
    }
    // Cheapest first; keys costlier than any preset within one budget: see KDF_OPEN_BUDGET.
    const order = [...files].sort(([a, fa], [b, fb]) => kdfCost(fa) - kdfCost(fb) || (a < b ? -1 : a > b ? 1 : 0));
    let spent = 0;
    const skipped: string[] = [];
    for (const [keyId, file] of order) {
      const cost = kdfCost(file);
      if (cost > KDF_PRESET_MAX_COST) {
        if (spent + cost > KDF_OPEN_BUDGET) {
          skipped.push(keyId);
          continue;
        }
        spent += cost;
      }
      let master: Uint8Array | undefined;
      try {
        master = await openMaster(file, passphrase, config.id);
      } catch (err) {
        // Parameters that parse but cannot be used (bad base64, impossible KDF limits).
        damaged.push({ id: keyId, name: `keys/${keyId}`, problem: `it cannot be used: ${errorMessage(err)}` });
        continue;
      }
      if (!master) continue;
      const repo = opened(master, keyId);
      if (cache) {
        await storeMaster(cache, config.id, keyId, file, passphrase, master).catch((err: unknown) =>
          session.warn(`could not write the key cache in ${cache.dir}: ${errorMessage(err)}`));
      }
      return repo;
    }
    const broken = damaged.length ? `; ${damaged.length} key file(s) are damaged and were skipped: ${damaged.map((d) => `${d.name} (${d.problem})`).join(', ')}` : '';
    if (skipped.length) {
      const costly = skipped.map((id) => `keys/${id} (${files.get(id)!.kdf.opsLimit} passes of ${Math.round(files.get(id)!.kdf.memLimit / 2 ** 20)} MiB)`).join(', ');
      throw new VmvaultError('WRONG_PASSWORD',
        `the passphrase opens none of the ${files.size - skipped.length} key(s) tried, cheapest first, of the repository at ${storage.location}; ` +
        `${skipped.length} more, costlier than any key vmvault makes, were not tried, as their key derivation in one open is bounded (${KDF_OPEN_BUDGET / 2 ** 30} GiB × passes in all): ${costly}${broken}. ` +
        'If your passphrase is one of those, or they were not made by you (key files planted to slow every open), ' +
        'open the repository with another passphrase and remove them with "vmvault key remove ID" (see vmvault key list), or delete them from the storage; nothing was changed');
    }
    if (files.size === 0) {
      // No passphrase was tried: "wrong passphrase" would send the operator after the wrong thing.
      throw new IntegrityError(`the repository at ${storage.location} has no readable key file (keys/ holds no regular file that parses as a key${broken}), ` +
        'so no passphrase can open it: put back a good copy of keys/ (from a copy of the repository), or add a key from the paper key with "vmvault key import"; nothing was changed');
    }
    throw new VmvaultError('WRONG_PASSWORD', `wrong passphrase: it opens none of the ${files.size} readable key(s) of the repository at ${storage.location}${broken}; nothing was changed`);
  }

  /** Adds a passphrase from a paper key when every other passphrase is lost. */
  static async importPaper(storage: Storage, paper: string, passphrase: string, kdf: KdfPreset = 'moderate', label?: string): Promise<Repository> {
    await blake2bReady();
    const config = await Repository.readConfig(storage);
    const { master, repoId } = fromPaper(paper);
    if (repoId !== config.id) {
      throw new VmvaultError('BAD_INPUT', `this paper key belongs to repository ${repoId}, not to ${config.id} at ${storage.location}`);
    }
    const repo = Repository.withMaster(storage, config, master, '');
    const keyId = await repo.addKey(passphrase, kdf, label ?? 'imported from paper');
    return Repository.withMaster(storage, config, master, keyId);
  }

  private static withMaster(storage: Storage, config: RepoConfig, master: Uint8Array, keyId: string, session?: Session): Repository {
    const keys = deriveKeys(master, chunkIdHashOf(config));
    const { mac: stored, ...body } = config;
    if (!constantTimeEqualHex(configMac(keys, body), stored)) {
      throw new IntegrityError(`the repository config at ${storage.location} does not match its keys: it was modified, or the key is of another repository`);
    }
    return new Repository(storage, config, keys, master, keyId, session);
  }

  /** Every key file, and those that are not key files at all (not JSON, wrong shape). */
  private static async readKeyFiles(storage: Storage): Promise<{ files: Map<string, KeyFile>; damaged: DamagedObject[] }> {
    const files = new Map<string, KeyFile>();
    const damaged: DamagedObject[] = [];
    for await (const { name } of storage.list('keys/')) {
      const id = name.slice('keys/'.length);
      const slash = id.indexOf('/');
      if (slash >= 0) {
        // A directory at a key's name, holding files: no key file, and nothing in it is one.
        const dir = `keys/${id.slice(0, slash)}`;
        if (!damaged.some((d) => d.name === dir)) {
          damaged.push({ id: id.slice(0, slash), name: dir, problem: `it is a directory (holding ${name}), not a key file vmvault wrote: move it out of the repository, then put back a good copy of the key file if there is one` });
        }
        continue;
      }
      let raw: Uint8Array;
      try {
        raw = await storage.get(name, { maxBytes: SMALL_OBJECT_MAX_BYTES });
      } catch (err) {
        if (err instanceof NotFoundError) continue; // removed meanwhile
        if (!(err instanceof IntegrityError)) throw err;
        damaged.push({ id, name, problem: err.message }); // far too large to be a key file
        continue;
      }
      let parsed;
      try {
        parsed = keyFileSchema.safeParse(parseJson(raw, name));
      } catch (err) {
        damaged.push({ id, name, problem: errorMessage(err) });
        continue;
      }
      if (parsed.success) files.set(id, parsed.data);
      else damaged.push({ id, name, problem: 'it is not a vmvault key file' });
    }
    // What a directory repository holds at a key's name that is no file (a FIFO, a symbolic link, an empty directory).
    for (const stray of storage.strays ? await storage.strays('keys/') : []) {
      if (damaged.some((d) => d.name === stray.name)) continue;
      damaged.push({ id: stray.name.slice('keys/'.length), name: stray.name, problem: `it is ${stray.kind}, not a key file vmvault wrote: move it out of the repository, then put back a good copy of the key file if there is one` });
    }
    return { files, damaged };
  }

  // ---- keys ----

  async addKey(passphrase: string, kdf: KdfPreset = 'moderate', label?: string): Promise<string> {
    const keyId = randomBytes(8).toString('hex');
    await this.storage.put(`keys/${keyId}`, encodeJson(await sealMaster(this.master, passphrase, this.id, kdf, label)));
    return keyId;
  }

  async listKeys(): Promise<KeyInfo[]> {
    const { files, damaged } = await Repository.readKeyFiles(this.storage);
    return [
      ...[...files].map(([id, f]) => ({ id, created: f.created, ...(f.label ? { label: f.label } : {}), current: id === this.keyId })),
      ...damaged.map((d) => ({ id: d.id, created: '', current: false, damaged: d.problem })),
    ].sort((a, b) => a.created.localeCompare(b.created));
  }

  async removeKey(idOrPrefix: string): Promise<string> {
    const keys = await this.listKeys();
    const id = resolvePrefix(idOrPrefix, keys.map((k) => k.id), 'key');
    if (id === this.keyId) throw new VmvaultError('BAD_INPUT', `key ${id} is the one this passphrase opened: remove it using another passphrase`);
    const usable = keys.filter((k) => !k.damaged);
    if (usable.length <= 1 && usable.some((k) => k.id === id)) throw new VmvaultError('BAD_INPUT', 'the last key of a repository cannot be removed');
    await this.storage.delete(`keys/${id}`);
    return id;
  }

  /** What a worker thread needs to seal and open chunks (see pipeline/pool.ts). */
  workerInit(): { keys: ChunkKeys; repoId: string; level: number; chunkSize: number } {
    const { idKey, idHash, encKey } = this.keys;
    return { keys: { idKey, idHash, encKey }, repoId: this.id, level: this.compressionLevel, chunkSize: this.chunkSize };
  }

  paperKey(): string {
    return toPaper(this.master, this.id);
  }

  // ---- chunks ----

  /** Every chunk in the chunk store, by listing it: for gc and verify, never for backups (see chunkIndex). */
  async chunkIds(): Promise<Set<string>> {
    return new Set((await this.storedChunks()).keys());
  }

  /** Every chunk in the chunk store with its stored size, by listing it (verify: a size no sealed chunk has is damage found without a read). */
  async storedChunks(): Promise<Map<string, number>> {
    const sizes = new Map<string, number>();
    for await (const { name, size } of this.storage.list('chunks/')) {
      const id = name.slice(name.lastIndexOf('/') + 1);
      // Only under its own name: a chunk in another chunks/xx/ is not where restore, gc and backups look.
      if (isChunkId(id) && name === chunkName(id)) sizes.set(id, size);
    }
    return sizes;
  }

  /**
   * The chunks a backup may reference without uploading them (chunk-index.ts): those the
   * index claims, minus those a verify quarantined as missing or damaged (repo/health.ts).
   * A backup that produces a quarantined chunk therefore uploads it, and putChunk heals it.
   * The chunk store is never listed, except once in a repository that has no index yet.
   */
  async chunkIndex(opts: { beforeWrite?: () => Promise<void> } = {}): Promise<ChunkIndex> {
    const [loaded, quarantined] = await Promise.all([loadPrefixes(this, this.indexCache()), quarantinedChunkIds(this)]);
    let { prefixes, load } = loaded;
    for (const d of load.damaged) this.warn(`${d.problem}: its chunks will be uploaded again when met; "vmvault gc" rewrites the index`);
    if (load.objects === 0) {
      const ids = [...(await this.chunkIds())];
      await this.writeIndex(ids);
      ({ prefixes } = await loadPrefixes(this, this.indexCache()));
      load = { ...load, built: true };
      if (ids.length) this.warn(`the repository had no chunk index: its ${ids.length} chunk(s) were listed once and indexed`);
    }
    for (const id of quarantined) this.toHeal.add(id);
    const write = async (ids: readonly string[]) => {
      await opts.beforeWrite?.();
      return this.writeIndex(ids);
    };
    return new ChunkIndex(prefixes, new Set(quarantined), this.storage, load, write, this.chunkSize);
  }

  /**
   * Writes index objects listing `ids` (at most INDEX_OBJECT_ENTRIES each); returns their
   * names. Also keeps them in this host's cache.
   */
  async writeIndex(ids: readonly string[]): Promise<string[]> {
    const names: string[] = [];
    for (let at = 0; at === 0 || at < ids.length; at += INDEX_OBJECT_ENTRIES) {
      const { name, data } = sealIndex(this, ids.slice(at, at + INDEX_OBJECT_ENTRIES));
      await this.storage.put(name, data);
      await this.indexCache()?.put(name, data);
      names.push(name);
    }
    return names;
  }

  /** The index objects storage has now. */
  indexNames(): Promise<string[]> {
    return indexNames(this.storage);
  }

  private indexCache(): IndexCache | undefined {
    if (this.cache === null) this.cache = this.session.cacheDir ? new IndexCache(this.session.cacheDir, this.id, (m) => this.warn(m)) : undefined;
    return this.cache;
  }

  /**
   * Stores a sealed chunk. Storage puts replace (storage.ts), so a re-upload overwrites a
   * damaged object; then the chunk leaves quarantine, which heals every backup using it.
   * The backup that stores it indexes it (ChunkIndex.add and flush).
   */
  async putChunk(id: string, sealed: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    await this.storage.put(chunkName(id), sealed, opts);
    if (this.toHeal.has(id)) {
      await release(this, [id]);
      this.toHeal.delete(id);
    }
  }

  /**
   * Reads chunk `id` as stored (sealed) into the start of `into`, which must have room
   * for any sealed chunk of this repository (sealedChunkBound); returns its size.
   */
  async getChunkSealedInto(id: string, into: Uint8Array, opts: RequestOptions = {}): Promise<number> {
    try {
      return await getInto(this.storage, chunkName(id), into, opts);
    } catch (err) {
      if (err instanceof NotFoundError) throw new IntegrityError(`chunk ${chunkName(id)} is missing from the repository`);
      if (err instanceof IntegrityError) throw new IntegrityError(`chunk ${chunkName(id)} is damaged: ${err.message}`, { cause: err });
      throw err;
    }
  }

  // ---- manifests ----

  /** Commits a backup (its chunks indexed first: ChunkIndex.flush). */
  async saveManifest(m: Manifest): Promise<void> {
    const plain = compress(Buffer.from(JSON.stringify(m)), { compressionLevel: 3 });
    await this.storage.put(backupName(m.id), seal(this.keys.encKey, 'manifest', plain, additionalData(this.id, 'manifest', m.id)));
    await this.summaryCache()?.put(m.id, Buffer.from(JSON.stringify(summarise(m))));
  }

  /**
   * One backup's manifest. Callers read many at once (16): together they stay within
   * MANIFEST_READ_BUDGET bytes by the sizes the listing gave, so a repository holding a
   * few huge objects under backups/ (each refused only past MANIFEST_MAX_BYTES) cannot
   * take gigabytes of memory.
   */
  loadManifest(id: string): Promise<Manifest> {
    return this.manifestReads.run(this.listedManifestBytes.get(id) ?? 0, () => this.readManifest(id));
  }

  private async readManifest(id: string): Promise<Manifest> {
    let sealed: Uint8Array;
    try {
      sealed = await this.storage.get(backupName(id), { maxBytes: MANIFEST_MAX_BYTES });
    } catch (err) {
      if (err instanceof NotFoundError) throw new NotFoundError(`backup ${id} does not exist`);
      if (err instanceof IntegrityError) {
        throw new IntegrityError(`backup manifest ${backupName(id)} is damaged: ${err.message}; put back a good copy, or delete it with "vmvault repair --remove" if it is no backup of yours`, { cause: err });
      }
      throw err;
    }
    const what = `backup manifest ${backupName(id)}`;
    const plain = open(this.keys.encKey, 'manifest', sealed, additionalData(this.id, 'manifest', id), what);
    // It authenticates: whatever fails from here on was written so by a holder of the key.
    const unreadable = (why: string, cause?: unknown) => new UnreadableManifestError(`${what} authenticates with this repository's key, ` +
      `but this vmvault cannot read it (${why}): it was most likely written by a newer vmvault; read it with that version, and do not delete it`, cause === undefined ? undefined : { cause });
    let json: unknown;
    try {
      json = parseJson(decompress(plain), what);
    } catch (err) {
      throw unreadable(errorMessage(err), err);
    }
    const parsed = manifestSchema.safeParse(json);
    if (!parsed.success) {
      const version = (json as { version?: unknown } | null)?.version;
      const issue = parsed.error.issues[0];
      throw unreadable(version !== 1 ? `manifest format ${JSON.stringify(version)}, this vmvault reads 1` : `${issue?.path.join('.') || 'its content'}: ${issue?.message ?? 'not a manifest'}`);
    }
    if (parsed.data.id !== id) throw new IntegrityError(`${what} is not a valid manifest: it names backup ${parsed.data.id}`);
    return parsed.data;
  }

  async backupIds(): Promise<string[]> {
    return (await this.listBackups()).map((b) => b.id);
  }

  /** The manifests in storage with what the listing says of each (size, and when it was last written where the backend knows). */
  async listBackups(): Promise<ListedBackup[]> {
    const listed: ListedBackup[] = [];
    for await (const { name, size, modified, etag } of this.storage.list('backups/')) {
      const id = name.slice('backups/'.length);
      if (/^[0-9a-f]{64}$/.test(id)) listed.push({ id, size, ...(modified !== undefined ? { modified } : {}), ...(etag !== undefined ? { etag } : {}) });
    }
    this.listedManifestBytes = new Map(listed.map((b) => [b.id, b.size]));
    return listed;
  }

  /**
   * Every manifest, oldest first; IntegrityError naming the damaged ones if any. For
   * callers that need all of them or nothing; readManifests() goes on without them.
   */
  async manifests(): Promise<Manifest[]> {
    const { manifests, damaged } = await this.readManifests();
    if (damaged.length) throw new IntegrityError(`${damaged.length} backup manifest(s) are damaged: ${damaged.map((d) => d.problem).join('; ')}`);
    return manifests;
  }

  /**
   * Every manifest, oldest first, and apart those that are there but cannot be read
   * (damaged, swapped with another, of another repository, or no file at all): one damaged manifest costs
   * only its own backup. Storage errors (network, permissions) still throw: they say
   * nothing about the manifest. Callers decide what a damaged one means for them
   * (gc, for one, must not delete anything it might reference).
   */
  async readManifests(): Promise<{ manifests: Manifest[]; damaged: DamagedObject[] }> {
    const ids = await this.backupIds();
    const damaged: DamagedObject[] = [];
    const loaded = await mapLimit(ids, 16, async (id) => {
      try {
        return await this.loadManifest(id);
      } catch (err) {
        if (err instanceof NotFoundError) return undefined; // deleted (pruned) since the listing
        if (!(err instanceof IntegrityError)) throw err;
        damaged.push({ id, name: backupName(id), problem: err.message });
        return undefined;
      }
    });
    damaged.push(...await this.strayManifests());
    const manifests = loaded.filter((m): m is Manifest => m !== undefined);
    manifests.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
    return { manifests, damaged: damaged.sort((a, b) => a.id.localeCompare(b.id)) };
  }

  /**
   * What a directory repository holds at manifests' names that is no file (a FIFO, a
   * symbolic link, a directory: Storage.strays). Each may be a manifest damaged in place,
   * so it counts as a damaged one: listed as such, and keeping gc from deleting chunks it
   * may use. None on storage that has no such things.
   */
  async strayManifests(): Promise<DamagedObject[]> {
    const strays = this.storage.strays ? await this.storage.strays('backups/') : [];
    return strays.map((stray) => ({
      id: stray.name.slice('backups/'.length), name: stray.name,
      problem: `${stray.name} is ${stray.kind}, not a backup manifest vmvault wrote: move it out of the repository, then put back a good copy of the manifest if there is one`,
    }));
  }

  /**
   * Summaries of `vm`'s backups, oldest first. Each manifest of the repository is
   * decrypted once per host, the first time it is seen, and its summary kept in the
   * host's cache (index-cache.ts): a backup's cost does not grow with the other VMs'
   * backups beyond one LIST of `backups/`. Damaged manifests are left out (they cost
   * only their own backup), and read again next time.
   */
  async vmBackups(vm: string): Promise<BackupSummary[]> {
    return (await this.backupSummaries()).filter((s) => s.vm === vm);
  }

  /**
   * Summaries of every backup whose manifest can be read, oldest first (see vmBackups).
   * `ids`: the whole listing of backups/, when the caller has just made it (the cache
   * keeps only the summaries of those ids).
   */
  async backupSummaries(ids?: readonly string[]): Promise<BackupSummary[]> {
    ids ??= await this.backupIds();
    const cache = this.summaryCache();
    const out: BackupSummary[] = [];
    await mapLimit(ids, 16, async (id) => {
      let summary = parseSummary(await cache?.get(id), id);
      if (!summary) {
        try {
          summary = summarise(await this.loadManifest(id));
        } catch (err) {
          if (err instanceof NotFoundError || err instanceof IntegrityError) return;
          throw err;
        }
        await cache?.put(id, Buffer.from(JSON.stringify(summary)));
      }
      out.push(summary);
    });
    await cache?.retain(ids);
    return out.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  }

  private summaryCache(): SummaryCache | undefined {
    if (this.summaries === null) this.summaries = this.session.cacheDir ? new SummaryCache(this.session.cacheDir, this.id, (m) => this.warn(m)) : undefined;
    return this.summaries;
  }

  /**
   * Resolves a unique prefix of a backup id, as git does. When none matches but a
   * directory repository holds something else at such a name (a FIFO, a symbolic link, a
   * directory: Storage.strays), the error says what is there: the manifest is damaged,
   * not absent.
   */
  async resolveBackupId(prefix: string): Promise<string> {
    try {
      return resolvePrefix(prefix, await this.backupIds(), 'backup');
    } catch (err) {
      if (!(err instanceof NotFoundError) || !this.storage.strays) throw err;
      const [stray, ...more] = await this.storage.strays(backupName(prefix.trim().toLowerCase())).catch(() => []);
      if (!stray) throw err;
      throw new IntegrityError(`${stray.name} is ${stray.kind}, not a backup manifest vmvault wrote${more.length ? ` (and ${more.length} more like it)` : ''}: ` +
        'the repository is damaged there, or something else put it there; move it out of the repository, then put back a good copy of the manifest if there is one', { cause: err });
    }
  }

  /** Deletes a backup: its manifest, then its verification records (gc removes any a crash leaves). */
  async deleteManifest(id: string): Promise<void> {
    await this.storage.delete(backupName(id));
    await removeVerification(this, id);
  }
}

export function resolvePrefix(prefix: string, ids: string[], what: string): string {
  const p = prefix.trim().toLowerCase();
  if (!/^[0-9a-f]+$/.test(p)) throw new VmvaultError('BAD_INPUT', `"${prefix}" is not a ${what} id (hexadecimal digits)`);
  const hits = ids.filter((id) => id.startsWith(p));
  if (hits.length === 1) return hits[0]!;
  if (hits.length === 0) throw new NotFoundError(`no ${what} id starts with "${prefix}"`);
  throw new VmvaultError('AMBIGUOUS', `"${prefix}" matches ${hits.length} ${what}s (${hits.slice(0, 4).map((h) => h.slice(0, 12)).join(', ')}${hits.length > 4 ? ', …' : ''}): give more digits`);
}

export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const run = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
  return out;
}

/**
 * What a cached summary must hold to be used (this host's cache may hold one another
 * vmvault wrote, or a damaged file): anything else is a cache miss, and the manifest
 * is read instead.
 */
const cachedSummary = z.object({
  id: z.string(), vm: z.string(), host: z.string(), time: z.string(), labels: z.array(z.string()), configs: z.array(z.string()),
  disks: z.array(z.object({ name: z.string(), format: z.string(), virtualSize: z.number() }).passthrough()),
}).passthrough();

/** A cached summary, if it is one and of this backup. */
function parseSummary(raw: Buffer | undefined, id: string): BackupSummary | undefined {
  if (!raw) return undefined;
  try {
    const s = cachedSummary.safeParse(JSON.parse(raw.toString('utf8')));
    return s.success && s.data.id === id ? (s.data as BackupSummary) : undefined;
  } catch {
    return undefined;
  }
}

function encodeJson(v: unknown): Uint8Array {
  return Buffer.from(JSON.stringify(v, null, 2) + '\n');
}

function parseJson(raw: Uint8Array, what: string): unknown {
  try {
    return JSON.parse(Buffer.from(raw).toString('utf8'));
  } catch {
    throw new IntegrityError(`${what} is damaged: it is not valid JSON`);
  }
}

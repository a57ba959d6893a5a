/**
 * A repository: the plaintext config, the sealed keys, the chunk store and the
 * manifests, on any Storage. Opening needs a passphrase that opens one of the keys.
 */
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { compress, decompress } from 'zstd-napi';
import { IntegrityError, NotFoundError, VmvaultError } from '../errors.js';
import type { Storage } from '../storage/storage.js';
import {
  constantTimeEqualHex, deriveKeys, generateMaster, keyFileSchema, mac, openMaster, sealMaster,
  type KdfPreset, type KeyFile, type RepoKeys,
} from '../crypto/keys.js';
import { additionalData, open, seal } from '../crypto/seal.js';
import { toPaper, fromPaper } from '../crypto/paper.js';
import { chunkName, isChunkId } from './chunk.js';
import { backupName, manifestSchema, type Manifest } from './manifest.js';
import { quarantinedChunkIds, release, removeVerification } from './health.js';

export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;

const configSchema = z.object({
  version: z.literal(1),
  id: z.string().regex(/^[0-9a-f]{32}$/),
  chunkSize: z.number().int().min(64 * 1024).max(64 * 1024 * 1024).refine((n) => (n & (n - 1)) === 0, 'a power of two'),
  compression: z.enum(['zstd', 'none']),
  created: z.string(),
  mac: z.string().regex(/^[0-9a-f]{64}$/),
});
export type RepoConfig = z.infer<typeof configSchema>;

function configMac(keys: RepoKeys, c: Omit<RepoConfig, 'mac'>): string {
  return mac(keys.macKey, JSON.stringify([c.version, c.id, c.chunkSize, c.compression, c.created]));
}

export interface KeyInfo { id: string; created: string; label?: string; current: boolean }

export interface InitOptions { chunkSize?: number; compression?: 'zstd' | 'none'; kdf?: KdfPreset; label?: string }

export class Repository {
  /** Quarantined chunks usableChunkIds reported: the next put of one of them heals it. */
  private readonly toHeal = new Set<string>();

  private constructor(
    readonly storage: Storage,
    readonly config: RepoConfig,
    readonly keys: RepoKeys,
    private readonly master: Uint8Array,
    /** The key file this session opened with. */
    readonly keyId: string,
  ) {}

  get id(): string { return this.config.id; }
  get chunkSize(): number { return this.config.chunkSize; }
  /**
   * zstd level 1, as Proxmox Backup Server uses: on the benchmark's mixed image it is
   * 13% faster than level 3 for 3% more stored bytes. Only writers use it; any level reads back.
   */
  get compressionLevel(): number { return this.config.compression === 'zstd' ? 1 : 0; }

  static async init(storage: Storage, passphrase: string, opts: InitOptions = {}): Promise<Repository> {
    if (await storage.stat('config')) {
      throw new VmvaultError('ALREADY_EXISTS', `a repository already exists at ${storage.location}; nothing was changed`);
    }
    const master = generateMaster();
    const keys = deriveKeys(master);
    const body = {
      version: 1 as const,
      id: randomBytes(16).toString('hex'),
      chunkSize: opts.chunkSize ?? DEFAULT_CHUNK_SIZE,
      compression: opts.compression ?? 'zstd',
      created: new Date().toISOString(),
    };
    const config = configSchema.safeParse({ ...body, mac: configMac(keys, body) });
    if (!config.success) {
      throw new VmvaultError('BAD_INPUT', `invalid repository settings: ${config.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    }
    const keyId = randomBytes(8).toString('hex');
    await storage.put(`keys/${keyId}`, encodeJson(await sealMaster(master, passphrase, body.id, opts.kdf ?? 'moderate', opts.label)));
    // The config is written last: a repository exists once its config does.
    await storage.put('config', encodeJson(config.data));
    return new Repository(storage, config.data, keys, master, keyId);
  }

  static async readConfig(storage: Storage): Promise<RepoConfig> {
    let raw: Uint8Array;
    try {
      raw = await storage.get('config');
    } catch (err) {
      if (err instanceof NotFoundError) {
        throw new VmvaultError('NO_REPOSITORY', `there is no vmvault repository at ${storage.location}: check --repo or VMVAULT_REPOSITORY, or create one with "vmvault init"`);
      }
      throw err;
    }
    const parsed = configSchema.safeParse(parseJson(raw, 'config'));
    if (!parsed.success) throw new IntegrityError(`the repository config at ${storage.location} is damaged or from an unknown version`);
    return parsed.data;
  }

  static async open(storage: Storage, passphrase: string): Promise<Repository> {
    const config = await Repository.readConfig(storage);
    const keyFiles = await Repository.readKeyFiles(storage);
    for (const [keyId, file] of keyFiles) {
      const master = await openMaster(file, passphrase, config.id);
      if (master) return Repository.withMaster(storage, config, master, keyId);
    }
    throw new VmvaultError('WRONG_PASSWORD', `wrong passphrase: it opens none of the ${keyFiles.size} key(s) of the repository at ${storage.location}; nothing was changed`);
  }

  /** Adds a passphrase from a paper key when every other passphrase is lost. */
  static async importPaper(storage: Storage, paper: string, passphrase: string, kdf: KdfPreset = 'moderate', label?: string): Promise<Repository> {
    const config = await Repository.readConfig(storage);
    const { master, repoId } = fromPaper(paper);
    if (repoId !== config.id) {
      throw new VmvaultError('BAD_INPUT', `this paper key belongs to repository ${repoId}, not to ${config.id} at ${storage.location}`);
    }
    const repo = Repository.withMaster(storage, config, master, '');
    const keyId = await repo.addKey(passphrase, kdf, label ?? 'imported from paper');
    return Repository.withMaster(storage, config, master, keyId);
  }

  private static withMaster(storage: Storage, config: RepoConfig, master: Uint8Array, keyId: string): Repository {
    const keys = deriveKeys(master);
    const { mac: stored, ...body } = config;
    if (!constantTimeEqualHex(configMac(keys, body), stored)) {
      throw new IntegrityError(`the repository config at ${storage.location} does not match its keys: it was modified, or the key is of another repository`);
    }
    return new Repository(storage, config, keys, master, keyId);
  }

  private static async readKeyFiles(storage: Storage): Promise<Map<string, KeyFile>> {
    const out = new Map<string, KeyFile>();
    for await (const { name } of storage.list('keys/')) {
      const parsed = keyFileSchema.safeParse(parseJson(await storage.get(name), name));
      if (parsed.success) out.set(name.slice('keys/'.length), parsed.data);
    }
    return out;
  }

  // ---- keys ----

  async addKey(passphrase: string, kdf: KdfPreset = 'moderate', label?: string): Promise<string> {
    const keyId = randomBytes(8).toString('hex');
    await this.storage.put(`keys/${keyId}`, encodeJson(await sealMaster(this.master, passphrase, this.id, kdf, label)));
    return keyId;
  }

  async listKeys(): Promise<KeyInfo[]> {
    const files = await Repository.readKeyFiles(this.storage);
    return [...files].map(([id, f]) => ({ id, created: f.created, ...(f.label ? { label: f.label } : {}), current: id === this.keyId }))
      .sort((a, b) => a.created.localeCompare(b.created));
  }

  async removeKey(idOrPrefix: string): Promise<string> {
    const keys = await this.listKeys();
    const id = resolvePrefix(idOrPrefix, keys.map((k) => k.id), 'key');
    if (id === this.keyId) throw new VmvaultError('BAD_INPUT', `key ${id} is the one this passphrase opened: remove it using another passphrase`);
    if (keys.length <= 1) throw new VmvaultError('BAD_INPUT', 'the last key of a repository cannot be removed');
    await this.storage.delete(`keys/${id}`);
    return id;
  }

  /** What a worker thread needs to seal and open chunks (see pipeline/pool.ts). */
  workerInit(): { master: Uint8Array; repoId: string; level: number } {
    return { master: this.master, repoId: this.id, level: this.compressionLevel };
  }

  paperKey(): string {
    return toPaper(this.master, this.id);
  }

  // ---- chunks ----

  async chunkIds(): Promise<Set<string>> {
    const ids = new Set<string>();
    for await (const { name } of this.storage.list('chunks/')) {
      const id = name.slice(name.lastIndexOf('/') + 1);
      if (isChunkId(id)) ids.add(id);
    }
    return ids;
  }

  /**
   * The chunks a backup may reference without uploading them: those stored, minus those
   * a verify quarantined as missing or damaged (repo/health.ts). A backup that produces
   * a quarantined chunk therefore uploads it, and putChunk heals it.
   */
  async usableChunkIds(): Promise<Set<string>> {
    const [stored, quarantined] = await Promise.all([this.chunkIds(), quarantinedChunkIds(this)]);
    for (const id of quarantined) {
      stored.delete(id);
      this.toHeal.add(id);
    }
    return stored;
  }

  /**
   * Stores a sealed chunk. Storage puts replace (storage.ts), so a re-upload overwrites a
   * damaged object; then the chunk leaves quarantine, which heals every backup using it.
   */
  async putChunk(id: string, sealed: Uint8Array): Promise<void> {
    await this.storage.put(chunkName(id), sealed);
    if (this.toHeal.has(id)) {
      await release(this, [id]);
      this.toHeal.delete(id);
    }
  }

  async getChunkSealed(id: string): Promise<Uint8Array> {
    try {
      return await this.storage.get(chunkName(id));
    } catch (err) {
      if (err instanceof NotFoundError) throw new IntegrityError(`chunk ${chunkName(id)} is missing from the repository`);
      throw err;
    }
  }

  // ---- manifests ----

  async saveManifest(m: Manifest): Promise<void> {
    const plain = compress(Buffer.from(JSON.stringify(m)), { compressionLevel: 3 });
    await this.storage.put(backupName(m.id), seal(this.keys.encKey, 'manifest', plain, additionalData(this.id, 'manifest', m.id)));
  }

  async loadManifest(id: string): Promise<Manifest> {
    let sealed: Uint8Array;
    try {
      sealed = await this.storage.get(backupName(id));
    } catch (err) {
      if (err instanceof NotFoundError) throw new NotFoundError(`backup ${id} does not exist`);
      throw err;
    }
    const what = `backup manifest ${backupName(id)}`;
    const plain = open(this.keys.encKey, 'manifest', sealed, additionalData(this.id, 'manifest', id), what);
    const parsed = manifestSchema.safeParse(parseJson(decompress(plain), what));
    if (!parsed.success || parsed.data.id !== id) throw new IntegrityError(`${what} is not a valid manifest`);
    return parsed.data;
  }

  async backupIds(): Promise<string[]> {
    const ids: string[] = [];
    for await (const { name } of this.storage.list('backups/')) {
      const id = name.slice('backups/'.length);
      if (/^[0-9a-f]{64}$/.test(id)) ids.push(id);
    }
    return ids;
  }

  /** Every manifest, oldest first. */
  async manifests(): Promise<Manifest[]> {
    const ids = await this.backupIds();
    const out = await mapLimit(ids, 16, (id) => this.loadManifest(id));
    return out.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  }

  /** Resolves a unique prefix of a backup id, as git does. */
  async resolveBackupId(prefix: string): Promise<string> {
    return resolvePrefix(prefix, await this.backupIds(), 'backup');
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

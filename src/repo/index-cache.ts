/**
 * A host's cache of what a repository holds that never changes once written, so that a
 * backup need not download it again: `<dir>/<repository id>/<kind>/<file>`.
 * - `index/<sha256>`: index objects (chunk-index.ts), as sealed as in the repository;
 *   named after their SHA-256, so a cached copy is checked against its name when read,
 *   and one that does not match is dropped and fetched again.
 * - `backups/<id>`: summaries of manifests (which VM, when, which disks and how each was
 *   read: summarise() in manifest.ts), so that a backup finds its VM's previous backups
 *   without decrypting every manifest of the repository. A summary only chooses which
 *   manifests to load; the manifest itself is then read from the repository and
 *   authenticated, and must name the VM (Repository.vmBackups).
 * The cache is an optimisation only: a failure to read or write it warns once and goes
 * on without it, and losing it costs downloads.
 *
 * Where: `cacheDir` of Repository.open, else VMVAULT_CACHE_DIR ("off" disables it),
 * else $XDG_CACHE_HOME/vmvault, else ~/.cache/vmvault. The service's workers use their
 * state directory's `cache/`.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, join } from 'node:path';
import { errorMessage } from '../errors.js';
// mkdir -p that reports EROFS where Node's recursive mkdir says ENOENT: the warning names the real cause.
import { mkdirs } from '../storage/local.js';

/** The cache directory the environment asks for, or undefined for none. */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const set = env.VMVAULT_CACHE_DIR;
  if (set !== undefined && set !== '') return set === 'off' ? undefined : set;
  if (env.XDG_CACHE_HOME) return join(env.XDG_CACHE_HOME, 'vmvault');
  const home = env.HOME ?? safeHome();
  return home ? join(home, '.cache', 'vmvault') : undefined;
}

function safeHome(): string | undefined {
  try {
    return homedir() || undefined;
  } catch {
    return undefined;
  }
}

/** One kind of cached object: files named by the object's immutable name, in one directory. */
class CacheDir {
  private broken = false;

  constructor(
    private readonly dir: string,
    private readonly warn: (message: string) => void,
    /** Whether a cached file's content is good for its name; a bad one is dropped. */
    private readonly good: (name: string, data: Buffer) => boolean = () => true,
  ) {}

  async get(name: string): Promise<Buffer | undefined> {
    if (this.broken) return undefined;
    const file = join(this.dir, basename(name));
    let data: Buffer;
    try {
      data = await readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.fail(err);
      return undefined;
    }
    if (this.good(basename(name), data)) return data;
    await rm(file, { force: true }).catch(() => undefined);
    return undefined;
  }

  async put(name: string, data: Uint8Array): Promise<void> {
    if (this.broken) return;
    const file = join(this.dir, basename(name));
    const tmp = join(this.dir, `.tmp-${randomBytes(6).toString('hex')}`);
    try {
      await mkdirs(this.dir, [], 0o700);
      await writeFile(tmp, data, { mode: 0o600 });
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true }).catch(() => undefined);
      this.fail(err);
    }
  }

  /** Forgets cached objects the repository no longer has (compacted by gc, pruned). */
  async retain(names: readonly string[]): Promise<void> {
    if (this.broken) return;
    const keep = new Set(names.map((n) => basename(n)));
    let files: string[];
    try {
      files = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.fail(err);
      return;
    }
    await Promise.all(files.filter((f) => !keep.has(f)).map((f) => rm(join(this.dir, f), { force: true }).catch(() => undefined)));
  }

  private fail(err: unknown): void {
    this.broken = true;
    this.warn(`the cache in ${this.dir} cannot be used (${errorMessage(err)}): going on without it, which costs downloads; ` +
      'set VMVAULT_CACHE_DIR to a writable directory, or "off"');
  }
}

const sha256Hex = (data: Buffer) => createHash('sha256').update(data).digest('hex');

/** Index objects (`index/<sha256>`), checked against their names. */
export class IndexCache extends CacheDir {
  constructor(root: string, repoId: string, warn: (message: string) => void) {
    super(join(root, repoId, 'index'), warn, (name, data) => sha256Hex(data) === name);
  }
}

/** Manifest summaries (`backups/<id>`), as JSON. */
export class SummaryCache extends CacheDir {
  constructor(root: string, repoId: string, warn: (message: string) => void) {
    super(join(root, repoId, 'backups'), warn);
  }
}

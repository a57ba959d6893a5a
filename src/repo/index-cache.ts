/**
 * A host's cache of a repository's index objects: `<dir>/<repository id>/index/<name>`,
 * as sealed as in the repository (the cache holds nothing storage does not). Objects
 * are immutable and named after their SHA-256, so a cached copy is checked against its
 * name when read, and one that does not match is dropped and fetched again. The cache
 * is an optimisation only: any failure to read or write it warns once and goes on
 * without it, and losing it costs one GET per index object.
 *
 * Where: `cacheDir` of Repository.open, else VMVAULT_CACHE_DIR ("off" disables it),
 * else $XDG_CACHE_HOME/vmvault, else ~/.cache/vmvault. The service uses its state
 * directory's `cache/`.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, join } from 'node:path';
import { errorMessage } from '../errors.js';

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

export class IndexCache {
  private broken = false;
  private readonly dir: string;

  constructor(root: string, repoId: string, private readonly warn: (message: string) => void) {
    this.dir = join(root, repoId, 'index');
  }

  /** The cached copy of index object `name` (`index/<sha256>`), if there is a good one. */
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
    if (createHash('sha256').update(data).digest('hex') === basename(name)) return data;
    await rm(file, { force: true }).catch(() => undefined);
    return undefined;
  }

  async put(name: string, data: Uint8Array): Promise<void> {
    if (this.broken) return;
    const file = join(this.dir, basename(name));
    const tmp = join(this.dir, `.tmp-${randomBytes(6).toString('hex')}`);
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      await writeFile(tmp, data, { mode: 0o600 });
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true }).catch(() => undefined);
      this.fail(err);
    }
  }

  /** Forgets cached objects the repository no longer has (compacted by gc). */
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
    this.warn(`the chunk index cache in ${this.dir} cannot be used (${errorMessage(err)}): going on without it, which costs one download per index object; set VMVAULT_CACHE_DIR to a writable directory, or "off"`);
  }
}

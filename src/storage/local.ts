/**
 * A Storage over a local directory (a disk, NFS mount, USB drive…). Object `a/b/c`
 * is the file `<root>/a/b/c`.
 */
import { randomBytes } from 'node:crypto';
import type { Dirent } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { constants } from 'node:fs';
import { lstat, mkdir, open, opendir, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { NotFoundError, VmvaultError, errnoCode, isRetriable } from '../errors.js';
import { TEMP_PREFIX, checkName, checkPrefix } from './names.js';
import { tooLarge, type GetOptions, type ObjectStat, type Storage, type Stray, type StoredObject } from './storage.js';
import { fileKind } from '../files.js';

/** O_DIRECT needs memory, offsets and lengths aligned to the device's block size: 4 KiB covers them all. */
export const DIRECT_ALIGN = 4096;
/** Smaller objects (manifests, index objects, locks) are not worth a second descriptor. */
const DIRECT_MIN_BYTES = 256 * 1024;
const BUFFERED_PIECE = 512 * 1024;

/** Files are sealed data and keys: readable by the owner only, as restic does. */
const FILE_MODE = 0o600;
const DIR_MODE = 0o700;

/** errno codes whose fix is on the operator's side, with what to tell them. */
const ADVICE: Record<string, string> = {
  ENOSPC: 'the file system is full: free some space ("vmvault gc" frees what no backup uses) or move the repository',
  EDQUOT: 'the disk quota is exhausted: free some space or raise the quota',
  EROFS: 'the file system is read-only: remount it read-write or use another directory',
  EACCES: 'permission denied: fix the permissions of the repository directory',
  EPERM: 'operation not permitted: fix the permissions (or attributes) of the repository directory',
  ENOTDIR: 'a component of the path is a regular file, not a directory: check the repository path',
  EEXIST: 'a component of the path is a regular file, not a directory: check the repository path',
  EISDIR: 'the object path is a directory: check the repository directory for stray directories',
  ENAMETOOLONG: 'the path is too long for this file system: use a shorter repository path',
};

/**
 * LocalStorage implements the Storage contract on a directory.
 *
 * - `put` writes `<dir>/.tmp-<random>`, fsyncs it, renames it over the final name and
 *   fsyncs the directory, so a crash leaves the old object, the new one, or a `.tmp-`
 *   file that `list` never shows (and that a later cleanup may remove).
 * - Parent directories are created on demand, including the root itself.
 * - `list` of a root that does not exist yields nothing; `get` throws NotFoundError.
 */
export class LocalStorage implements Storage {
  readonly location: string;
  /** Absolute path of the repository directory. */
  readonly root: string;
  /**
   * A put is a local write: two chunks being sealed, two read ahead and two being
   * written keep the disk and both cores busy. Ten (the default) was measured as fast,
   * with about 16 MiB more resident for the slots of the extra chunks (bench/README.md).
   */
  readonly chunksInFlight = 6;
  /** The file system refused O_DIRECT (writeObject): objects go through the page cache. */
  private directRefused = false;

  constructor(root: string) {
    this.root = path.resolve(root);
    this.location = this.root;
  }

  async get(name: string, opts: GetOptions = {}): Promise<Uint8Array> {
    return this.read(name, (size) => {
      // Checked against the file's size before anything is allocated: a sparse file of
      // terabytes costs a stat, not memory (nor Node's RangeError beyond its buffer limit).
      if (opts.maxBytes !== undefined && size > opts.maxBytes) throw tooLarge(this, name, size, opts.maxBytes);
      return Buffer.allocUnsafeSlow(size);
    });
  }

  async getInto(name: string, into: Uint8Array): Promise<number> {
    return (await this.read(name, (size) => {
      if (size > into.length) throw tooLarge(this, name, size, into.length);
      return into;
    })).length;
  }

  /**
   * Reads object `name` into what `place` gives for its size, and returns the bytes read.
   * Only a regular file is an object: the file is opened non-blocking and checked before
   * anything is read, so a FIFO or device planted at an object's name (a shared
   * repository directory) is "not found" instead of a read that never returns.
   */
  private async read(name: string, place: (size: number) => Uint8Array): Promise<Uint8Array> {
    const file = this.pathOf(name);
    const notFound = (cause?: unknown) => new NotFoundError(`object ${JSON.stringify(name)} not found in ${this.location}`, { cause });
    let fh: FileHandle;
    try {
      fh = await open(file, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch (err) {
      if (isMissing(err)) throw notFound(err);
      throw this.fail('read', name, file, err);
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw notFound(new Error(`${file} is not a regular file`));
      const into = place(st.size);
      let at = 0;
      while (at < st.size) {
        const { bytesRead } = await fh.read(into, at, st.size - at, at);
        if (bytesRead === 0) break; // objects are replaced whole (rename), never cut: this one is what it is
        at += bytesRead;
      }
      return new Uint8Array(into.buffer, into.byteOffset, at);
    } catch (err) {
      if (err instanceof VmvaultError) throw err;
      throw this.fail('read', name, file, err);
    } finally {
      await fh.close().catch(() => undefined); // read only: nothing a failed close could lose
    }
  }

  async put(name: string, data: Uint8Array): Promise<void> {
    const file = this.pathOf(name);
    const dir = path.dirname(file);
    const tmp = path.join(dir, `${TEMP_PREFIX}${randomBytes(8).toString('hex')}`);
    try {
      const fh = await this.createTemp(tmp);
      try {
        await this.writeObject(fh, data);
        await fh.sync(); // the data must be on disk before the rename makes it visible
      } finally {
        await fh.close();
      }
      await rename(tmp, file);
      await fsyncDir(dir); // make the rename itself durable
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw this.fail('write', name, dir, err);
    }
  }

  async stat(name: string): Promise<ObjectStat | undefined> {
    const file = this.pathOf(name);
    try {
      const st = await stat(file);
      return st.isFile() ? { size: st.size, modified: st.mtimeMs } : undefined;
    } catch (err) {
      if (isMissing(err)) return undefined;
      throw this.fail('stat', name, file, err);
    }
  }

  async delete(name: string): Promise<void> {
    const file = this.pathOf(name);
    try {
      await unlink(file);
    } catch (err) {
      if (isMissing(err)) return;
      throw this.fail('delete', name, file, err);
    }
  }

  async *list(prefix: string): AsyncIterable<StoredObject> {
    checkPrefix(prefix);
    // Start at the deepest directory the prefix names in full: `chunks/ab` → `chunks/`.
    const cut = prefix.lastIndexOf('/') + 1;
    yield* this.walk(prefix.slice(0, cut), prefix);
  }

  async strays(prefix: string): Promise<Stray[]> {
    checkPrefix(prefix);
    const rel = prefix.slice(0, prefix.lastIndexOf('/') + 1);
    const dirPath = path.join(this.root, rel);
    const out: Stray[] = [];
    try {
      for await (const entry of await opendir(dirPath)) {
        const name = rel + entry.name;
        if (entry.isFile() || entry.name.startsWith(TEMP_PREFIX) || !name.startsWith(prefix)) continue;
        // The directories vmvault makes itself: the kinds at the top, and chunks/ab/.
        if (entry.isDirectory() && (rel === '' || rel === 'chunks/')) continue;
        const st = await lstat(path.join(this.root, name)).catch(() => undefined);
        if (st && !st.isFile()) out.push({ name, kind: fileKind(st) });
      }
    } catch (err) {
      if (isMissing(err)) return out;
      throw this.fail('list', rel || '(root)', dirPath, err);
    }
    return out;
  }

  async close(): Promise<void> {
    // No handles stay open between calls.
  }

  /** Deletes `.tmp-*` files (puts that never finished) last modified before `before`, anywhere in the tree. */
  async removeTemporary(before: number): Promise<{ files: number; bytes: number }> {
    const done = { files: 0, bytes: 0 };
    const sweep = async (dirPath: string): Promise<void> => {
      let entries: Dirent[];
      try {
        entries = [];
        for await (const entry of await opendir(dirPath)) entries.push(entry);
      } catch (err) {
        if (isMissing(err)) return;
        throw this.fail('list', '(temporary files)', dirPath, err);
      }
      for (const entry of entries) {
        const file = path.join(dirPath, entry.name);
        if (entry.isDirectory()) await sweep(file);
        else if (entry.isFile() && entry.name.startsWith(TEMP_PREFIX)) {
          try {
            const st = await lstat(file);
            if (st.mtimeMs >= before) continue; // maybe a put still under way
            await unlink(file);
            done.files++;
            done.bytes += st.size;
          } catch (err) {
            if (!isMissing(err)) throw this.fail('delete', entry.name, file, err);
          }
        }
      }
    };
    await sweep(this.root);
    return done;
  }

  /** Yields the files under directory `rel` (a name prefix ending in "/" or "") that start with `prefix`. */
  private async *walk(rel: string, prefix: string): AsyncGenerator<StoredObject> {
    const dirPath = path.join(this.root, rel);
    let entries: Dirent[];
    try {
      entries = [];
      for await (const entry of await opendir(dirPath)) entries.push(entry);
    } catch (err) {
      if (isMissing(err)) return; // nothing stored under this prefix yet
      throw this.fail('list', rel || '(root)', dirPath, err);
    }
    for (const entry of entries) {
      if (entry.name.startsWith(TEMP_PREFIX)) continue; // an unfinished or crashed put
      const name = rel + entry.name;
      if (entry.isDirectory()) {
        // Descend only where names can still match the prefix.
        if (name.startsWith(prefix) || prefix.startsWith(name + '/')) yield* this.walk(name + '/', prefix);
      } else if (entry.isFile() && name.startsWith(prefix)) {
        const st = await this.stat(name);
        if (st) yield { name, ...st }; // undefined: deleted meanwhile
      }
    }
  }

  private pathOf(name: string): string {
    checkName(name);
    return path.join(this.root, name);
  }

  /**
   * Writes a new object's bytes. A large one (a chunk) goes to the device with O_DIRECT
   * where its memory allows (a chunk pool's slots: shared memory on page boundaries), through a second
   * descriptor of the same file (/proc/self/fd: never reopened by name); only the last
   * partial block goes through the page cache. A chunk is written once and read back
   * rarely (a restore, a verification), and on a hypervisor the page cache belongs to
   * the VMs: a backup through it evicted as much of their cache as it wrote. It also
   * cost a copy into memory the kernel must find, which on this class of virtual
   * machine is often far dearer than the copy (1.3 s of CPU for 480 MiB of buffered
   * writes, against 0.1 s a minute later; O_DIRECT: 0.06 s). In the benchmark's full
   * backup, side by side on one path: 2.56 s against 3.01 s (medians of 9). The cost: a
   * restore right after a backup reads its chunks from the device (0.2–0.3 s more for
   * the second benchmark image). The fsync that follows is still what makes the object
   * durable. Memory that is not aligned, or a file system that refuses O_DIRECT, is
   * written through the page cache.
   */
  private async writeObject(fh: FileHandle, data: Uint8Array): Promise<void> {
    // Only shared memory on a page boundary can be a slot: other memory (an index object's buffer) would fail each time.
    const slotLike = data.buffer instanceof SharedArrayBuffer && data.byteOffset % DIRECT_ALIGN === 0;
    const aligned = slotLike && data.length >= DIRECT_MIN_BYTES && !this.directRefused ? data.length - (data.length % DIRECT_ALIGN) : 0;
    let done = 0;
    if (aligned > 0) {
      let direct: FileHandle | undefined;
      try {
        direct = await openDirect(fh);
      } catch (err) {
        // ramfs (and tmpfs before Linux 6.6) refuse the flag at open (EINVAL): not asked again. No /proc: this write only.
        if (errnoCode(err) === 'EINVAL') this.directRefused = true;
      }
      if (direct) {
        try {
          await writeAll(direct, data.subarray(0, aligned), 0);
          done = aligned;
        } catch (err) {
          // EINVAL: memory not page-aligned (not a slot), or a write the file system refuses: all of it through the page cache.
          if (errnoCode(err) !== 'EINVAL') throw err;
        } finally {
          // Its writes are the file's: the fsync below makes them durable or fails.
          await direct.close().catch(() => undefined);
        }
      }
    }
    // The rest through the page cache, at most 512 KiB per write as FileHandle.writeFile does.
    await writeAll(fh, data.subarray(done), done, BUFFERED_PIECE);
  }

  /** Opens a new temporary file, creating its directory (and parents) when missing. */
  private async createTemp(tmp: string): Promise<FileHandle> {
    try {
      return await open(tmp, 'wx', FILE_MODE);
    } catch (err) {
      if ((err as { code?: unknown }).code !== 'ENOENT') throw err;
    }
    const created: string[] = [];
    await mkdirs(path.dirname(tmp), created);
    // New directory entries must survive a crash too: fsync each one's parent.
    for (const d of created) await fsyncDir(path.dirname(d));
    return open(tmp, 'wx', FILE_MODE);
  }

  /** An error that says what failed, where, and what to do about it. */
  private fail(op: string, name: string, where: string, err: unknown): VmvaultError {
    if (err instanceof VmvaultError) return err;
    const code = (err as { code?: unknown }).code;
    const reason = typeof code === 'string' ? ADVICE[code] : undefined;
    const detail = err instanceof Error ? err.message : String(err);
    const message = reason
      ? `cannot ${op} object ${JSON.stringify(name)} in ${where}: ${reason} (${detail})`
      : `cannot ${op} object ${JSON.stringify(name)} in ${where}: ${detail}`;
    return new VmvaultError('STORAGE', message, { cause: err, retriable: isRetriable(err) });
  }
}

/**
 * Errors meaning "no such object": the file is absent, a parent is a file (`config/x`),
 * or the name is a directory (`chunks`), which in S3 terms is not an object either.
 */
function isMissing(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return code === 'ENOENT' || code === 'ENOTDIR' || code === 'EISDIR';
}

/**
 * mkdir -p that reports the real errno: Node's `mkdir(…, { recursive: true })` says
 * ENOENT on a read-only file system instead of EROFS. Pushes what it created to
 * `created`, parents first. A directory created meanwhile by a concurrent put is fine.
 */
export async function mkdirs(dir: string, created: string[] = [], mode = DIR_MODE): Promise<void> {
  try {
    await mkdir(dir, mode);
    created.push(dir);
    return;
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (code === 'EEXIST' && (await stat(dir)).isDirectory()) return;
    if (code !== 'ENOENT' || path.dirname(dir) === dir) throw err;
  }
  await mkdirs(path.dirname(dir), created, mode);
  await mkdirs(dir, created, mode);
}

/**
 * Writes `data` to a new file (O_EXCL: never an existing file or a link planted at the
 * name) created with `mode`, synced before it is closed: for the temporary file of a
 * write that a rename then makes visible.
 */
export async function writeNewFileSynced(file: string, data: string | Uint8Array, mode = 0o600): Promise<void> {
  const fh = await open(file, 'wx', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * The file of `fh` opened again for writing with O_DIRECT, through /proc/self/fd: never
 * by its name, so nothing can be swapped in between. Rejects where the file system
 * refuses the flag (EINVAL) or /proc is missing.
 */
export function openDirect(fh: FileHandle): Promise<FileHandle> {
  return open(`/proc/self/fd/${fh.fd}`, constants.O_WRONLY | constants.O_DIRECT);
}

/** Writes all of `data` at `position`, at most `piece` bytes per write call. */
export async function writeAll(fh: FileHandle, data: Uint8Array, position: number, piece = data.length): Promise<void> {
  for (let done = 0; done < data.length;) {
    const { bytesWritten } = await fh.write(data, done, Math.min(piece, data.length - done), position + done);
    if (bytesWritten === 0) throw new Error(`a write at byte ${position + done} made no progress`);
    done += bytesWritten;
  }
}

/** fsync a directory so a rename or a new entry in it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } catch (err) {
    // Some file systems (and platforms) cannot fsync a directory; the rename still happened.
    if ((err as { code?: unknown }).code !== 'EINVAL') throw err;
  } finally {
    await fh.close();
  }
}

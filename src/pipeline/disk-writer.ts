/**
 * Where a restored disk's bytes go. A raw image is a plain file: it is written
 * directly with positional writes, without the qemu-nbd process, socket and copy that
 * every write through NBD costs. Any other format goes through qemu-nbd, which knows
 * its layout. Either way the new image reads as zeros and is allocated nowhere, so a
 * restore that writes only the data runs of its chunks comes back sparse.
 */
import { chmod, open, type FileHandle } from 'node:fs/promises';
import { VmvaultError, errnoCode } from '../errors.js';
import { createImage, exportImage, type ImageFormat } from '../disk/qemu.js';
import { copyBytes } from '../bytes.js';
import { abortWith } from '../disk/nbd.js';
import { DIRECT_ALIGN, openDirect, writeAll } from '../storage/local.js';

/**
 * A new disk image being filled. Writes may be in flight together but never overlap,
 * nor share a 4 KiB block (a raw file takes the block-aligned part of a write with
 * O_DIRECT and the rest through the page cache, and the two must not meet in one
 * block; a restore's writes start and end on 64 KiB boundaries, or at the disk's end);
 * `flush()` makes every completed write durable (with `durable: false`, only waits); `close()` releases the file or
 * export, is idempotent, and is the caller's to call after a failure too (the file
 * itself stays: removing it is the caller's cleanup).
 */
export interface DiskWriter {
  write(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

export interface DiskWriterOptions {
  /** Raw only: write around the page cache where the filesystem allows it (default true). */
  direct?: boolean;
  /** Raw only: bytes written between the fdatasyncs started as the writes go (default SYNC_EVERY). */
  syncEvery?: number;
  /** Through qemu-nbd: once aborted, every write in flight fails at once (a hung qemu-nbd is not waited for). */
  signal?: AbortSignal;
  /**
   * False: `flush()` asks nothing of the device, and a raw file gets no fdatasync as it
   * goes. The data is in the file for every reader, but not durable until the kernel
   * writes it back (or `sync`): for a restore that is compared and thrown away.
   */
  durable?: boolean;
}

/**
 * Creates `file` (which must not exist) as an empty image of `format` and
 * `virtualSize` bytes, readable by its owner only (a disk holds the VM's secrets).
 */
export function createDiskWriter(file: string, format: ImageFormat, virtualSize: number, opts: DiskWriterOptions = {}): Promise<DiskWriter> {
  const durable = opts.durable ?? true;
  return format === 'raw'
    ? rawFileWriter(file, virtualSize, opts.direct ?? true, durable ? opts.syncEvery ?? SYNC_EVERY : Infinity, durable)
    : nbdWriter(file, format, virtualSize, opts.signal, durable);
}

async function rawFileWriter(file: string, virtualSize: number, useDirect: boolean, syncEvery: number, durable: boolean): Promise<DiskWriter> {
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) {
    throw new VmvaultError('BAD_INPUT', `cannot create ${file}: virtual size ${virtualSize} is not a non-negative whole number of bytes`);
  }
  // 'wx' is O_CREAT|O_EXCL: whatever already sits at this path, a symlink included, is
  // an error and never followed. Mode 0600 from the first instant (the umask only narrows it).
  const fh = await open(file, 'wx', 0o600).catch((err: unknown) => {
    if (errnoCode(err) !== 'EEXIST') throw err;
    throw new VmvaultError('ALREADY_EXISTS', `cannot create disk image ${file}: something already exists at that path`, { cause: err });
  });
  let direct: FileHandle | undefined;
  try {
    await fh.truncate(virtualSize); // sparse: no block is allocated until data is written
    // O_DIRECT: the data goes from the slot (or a staging buffer) to the device, not through
    // the page cache, as qemu-nbd's --cache=none does (on this kind of host, a buffered write
    // of a whole disk and the fdatasync after it took about twice as long). Where the file
    // system refuses it, or /proc is missing: buffered.
    direct = useDirect ? await openDirect(fh).catch(() => undefined) : undefined;
  } catch (err) {
    await fh.close();
    throw err;
  }
  const staging = direct ? new Staging() : undefined;
  const opened = direct;
  /** Whether the data given (chunk pool slots: page-aligned) is written with O_DIRECT as it is, without staging. */
  let asGiven = true;
  let closing: Promise<void> | undefined;
  // An fdatasync started every `syncEvery` bytes, not waited for: the device settles
  // those writes while the next chunks are opened, and the one at the end (flush) has
  // only the rest left (a restore of the benchmark's second image: about 0.1 s sooner).
  // Its failure is flush()'s to report.
  // (Linux reports a writeback error to one fsync per descriptor: it is kept here, never lost.)
  let written = 0;
  let syncing: Promise<void> | undefined;
  let syncFailure: unknown;
  const syncBehind = (n: number) => {
    written += n;
    if (written < syncEvery || syncing) return;
    written = 0;
    const started: Promise<void> = fh.datasync().then(() => undefined, (err: unknown) => { syncFailure ??= err; });
    syncing = started;
    void started.then(() => { if (syncing === started) syncing = undefined; });
  };
  return {
    async write(offset, data) {
      syncBehind(data.length);
      let done = 0;
      const aligned = offset % DIRECT_ALIGN === 0 ? data.length - (data.length % DIRECT_ALIGN) : 0;
      if (aligned > 0 && direct && asGiven) {
        try {
          await writeAll(direct, data.subarray(0, aligned), offset);
          done = aligned;
        } catch (err) {
          // EINVAL: this memory is not aligned (not a pool slot); staged from now on, which also tells a refusing filesystem.
          if (errnoCode(err) !== 'EINVAL') throw err;
          asGiven = false;
        }
      }
      while (done < aligned && direct && staging) {
        const [at, n, to] = [done, Math.min(SLOT_SIZE, aligned - done), direct];
        try {
          await staging.use(async (slot) => {
            copyBytes(data.subarray(at, at + n), slot);
            await writeAll(to, slot.subarray(0, n), offset + at);
          });
          done += n;
        } catch (err) {
          // Opened with O_DIRECT, yet a write refused (a block size above 4 KiB, a filesystem
          // that accepts the flag only at open): nothing was written; the page cache from now on.
          if (errnoCode(err) !== 'EINVAL') throw err;
          direct = undefined;
        }
      }
      await writeAll(fh, data.subarray(done), offset + done);
    },
    // fdatasync covers the size set by truncate (needed to read the data back) and
    // every write, through either handle: it syncs the file, not the descriptor.
    async flush() {
      await syncing;
      if (syncFailure !== undefined) throw syncFailure;
      if (durable) await fh.datasync();
    },
    close: () => (closing ??= Promise.all([opened?.close(), fh.close()]).then(() => undefined)),
  };
}

/** Bytes written between the fdatasyncs a raw restore starts as it goes. */
const SYNC_EVERY = 128 * 1024 * 1024;
const SLOT_SIZE = 1024 * 1024;
const SLOTS = 8;
/** The one WebAssembly class used here (the project's "lib" setting declares none). */
declare const WebAssembly: { Memory: new (desc: { initial: number }) => { buffer: ArrayBuffer } };

/**
 * Page-aligned buffers for O_DIRECT writes (Node's Buffers are not aligned; a
 * WebAssembly memory is), SLOTS of SLOT_SIZE bytes, lent out one write at a time.
 */
class Staging {
  private readonly free: Buffer[];
  private readonly waiting: ((slot: Buffer) => void)[] = [];

  constructor() {
    const mem = Buffer.from(new WebAssembly.Memory({ initial: (SLOTS * SLOT_SIZE) / 65536 }).buffer);
    this.free = Array.from({ length: SLOTS }, (_, i) => mem.subarray(i * SLOT_SIZE, (i + 1) * SLOT_SIZE));
  }

  async use<T>(fn: (slot: Buffer) => Promise<T>): Promise<T> {
    const slot = this.free.pop() ?? (await new Promise<Buffer>((resolve) => this.waiting.push(resolve)));
    try {
      return await fn(slot);
    } finally {
      const next = this.waiting.shift();
      if (next) next(slot);
      else this.free.push(slot);
    }
  }
}

async function nbdWriter(file: string, format: ImageFormat, virtualSize: number, signal: AbortSignal | undefined, durable: boolean): Promise<DiskWriter> {
  await createImage(file, format, virtualSize);
  // qemu-img creates it by the umask (0644 under 022): narrow it before any data is written.
  await chmod(file, 0o600);
  const exp = await exportImage(file, { format, readOnly: false });
  const unlisten = abortWith(exp.client, signal);
  return {
    write: (offset, data) => exp.client.write(offset, data),
    flush: () => (durable ? exp.client.flush() : Promise.resolve()),
    close: () => {
      unlisten();
      return exp.close();
    },
  };
}

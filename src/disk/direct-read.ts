/**
 * Reading a raw or qcow2 image's guest data from its own file, without a qemu-nbd in
 * between: each byte is copied once (page cache to the chunk's slot) instead of three
 * times (to qemu-nbd, to the socket, to vmvault), and no process is started for a
 * disk (figures in bench/README.md).
 *
 * Only where that is certain (src/disk/qcow2-map.ts): a regular file, raw or a qcow2
 * image without backing or data file, encryption or subclusters. Clusters the map
 * cannot place (compressed ones, damaged entries) are read through a qemu-nbd export
 * of the same image (or snapshot), started when the first one is met; an image that is
 * not mapped at all is read through qemu-nbd as before. The format is the configured
 * one: a file configured as qcow2 that does not carry the qcow2 magic goes to qemu-nbd,
 * which refuses it; a raw image is never looked into.
 *
 * Reads go through the page cache (qemu-nbd reads with O_DIRECT): on this machine a
 * cold read was as fast either way, and a cached one much faster.
 */
import fs, { type FileHandle } from 'node:fs/promises';
import { VmvaultError, errorMessage } from '../errors.js';
import { fileReader } from './image-refs.js';
import type { ImageFormat } from './image-format.js';
import { appendExtent, type Extent, type NbdClient } from './nbd.js';
import { openQcow2Map, type Qcow2Map, type Qcow2Run } from './qcow2-map.js';
import { mustExist, optValue, probeRawWriters, runOn } from './qemu-run.js';
import { toolTimeoutMs } from './tool-timeouts.js';
import { retryIfOrphansHeld } from './qemu-nbd.js';
import { settleAll } from '../settle.js';

/** What a backup reads a disk through: an NBD client, or the image file itself. */
export interface BlockReader {
  /** Allocation of [offset, offset+length), covering it exactly, merged where adjacent. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** Fills `target` with the guest bytes from `offset`. */
  readInto(offset: number, target: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

export interface FileReadOptions {
  format: ImageFormat;
  /** A qcow2 internal snapshot to read instead of the image's current state. */
  snapshot?: string;
  /** The virtual size the inspection found. */
  size: number;
  /** A qemu-nbd export of the same image (and snapshot), for what the file reader leaves to qemu. */
  viaQemu: () => Promise<{ client: NbdClient; close(): Promise<void> }>;
}

/**
 * A reader of the image file, or why it must be read through qemu-nbd. The caller has
 * inspected the image (src/disk/inspect.ts) and holds it still (a snapshot, or no
 * writer); a raw image is probed for writers here, as exportImage does.
 */
export async function openImageFile(file: string, opts: FileReadOptions): Promise<{ reader: BlockReader } | { why: string }> {
  if (opts.format !== 'raw' && opts.format !== 'qcow2') return { why: `${opts.format} images are read by qemu` };
  if (opts.format === 'raw' && opts.snapshot !== undefined) return { why: 'a raw image has no snapshots' };
  await mustExist(file);
  let fh: FileHandle;
  try {
    fh = await fs.open(file, 'r');
  } catch (err) {
    throw new VmvaultError('QEMU', `cannot open disk image ${file} for reading: ${errorMessage(err)}`, { cause: err });
  }
  try {
    const st = await fh.stat();
    let opened: BlockReader | { why: string };
    if (!st.isFile()) {
      opened = { why: 'it is not a regular file' };
    } else if (opts.format === 'raw') {
      await retryIfOrphansHeld(() => probeRawWriters(file));
      opened = new RawFile(file, fh, opts.size);
    } else {
      const map = await openQcow2Map(fileReader(fh), st.size, opts.size, opts.snapshot);
      opened = 'unmapped' in map ? { why: map.unmapped } : new Qcow2File(file, fh, map, opts.viaQemu);
    }
    if ('why' in opened) {
      await fh.close();
      return opened;
    }
    return { reader: opened };
  } catch (err) {
    await fh.close();
    throw err;
  }
}

/** Reads [position, position+target.length) of the file into target; bytes past its end read as zeros, as qemu reads them. */
async function preadFull(file: string, fh: FileHandle, target: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < target.length) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await fh.read(target, done, target.length - done, position + done));
    } catch (err) {
      throw new VmvaultError('QEMU', `reading disk image ${file} failed at byte ${position + done} of the file: ${errorMessage(err)}`, { cause: err });
    }
    if (bytesRead === 0) {
      target.fill(0, done);
      return;
    }
    done += bytesRead;
  }
}

class RawFile implements BlockReader {
  constructor(private readonly file: string, private readonly fh: FileHandle, private readonly size: number) {}

  /** Holes and data as `qemu-img map` finds them (SEEK_DATA/SEEK_HOLE), the raw driver pinned: nothing in the file is interpreted. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    checkRange(offset, length, this.size);
    if (length === 0) return [];
    const spec = `driver=raw,file.driver=file,file.filename=${optValue(this.file)}`;
    const out = await runOn('qemu-img', this.file, ['map', '--output=json', `--start-offset=${offset}`, `--max-length=${length}`, '--image-opts', spec], { timeoutMs: toolTimeoutMs('map') });
    const extents: Extent[] = [];
    for (const e of JSON.parse(out) as { start: number; length: number; zero: boolean; data: boolean }[]) {
      appendExtent(extents, e.start, e.length, e.zero || !e.data, !e.data);
    }
    const covered = extents.reduce((n, e) => n + e.length, 0);
    if (extents[0]?.offset !== offset || covered !== length) {
      throw new VmvaultError('QEMU', `qemu-img map of ${this.file} described ${covered} bytes from ${extents[0]?.offset} where ${length} from ${offset} were asked`);
    }
    return extents;
  }

  async readInto(offset: number, target: Uint8Array): Promise<void> {
    checkRange(offset, target.length, this.size);
    await preadFull(this.file, this.fh, target, offset);
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

class Qcow2File implements BlockReader {
  private qemu: Promise<{ client: NbdClient; close(): Promise<void> }> | undefined;
  /** Bytes read through qemu, for tests and diagnostics. */
  viaQemuBytes = 0;

  constructor(
    private readonly file: string, private readonly fh: FileHandle, private readonly map: Qcow2Map,
    private readonly viaQemu: FileReadOptions['viaQemu'],
  ) {}

  async extents(offset: number, length: number): Promise<Extent[]> {
    checkRange(offset, length, this.map.virtualSize);
    const out: Extent[] = [];
    for (const r of await this.map.runs(offset, length)) {
      // As qemu reports them: anything without data is a hole (NBD_STATE_HOLE), zero clusters too.
      const zero = r.kind === 'zero' || r.kind === 'hole';
      appendExtent(out, r.offset, r.length, zero, zero);
    }
    return out;
  }

  async readInto(offset: number, target: Uint8Array): Promise<void> {
    checkRange(offset, target.length, this.map.virtualSize);
    const reads: Promise<void>[] = [];
    for (const r of await this.map.runs(offset, target.length)) {
      const into = target.subarray(r.offset - offset, r.offset - offset + r.length);
      reads.push(this.readRun(r, into));
    }
    await settleAll(reads); // none may land in `target` after this fails
  }

  private async readRun(r: Qcow2Run, into: Uint8Array): Promise<void> {
    if (r.kind === 'zero' || r.kind === 'hole') {
      into.fill(0);
    } else if (r.kind === 'data') {
      await preadFull(this.file, this.fh, into, r.host);
    } else {
      this.viaQemuBytes += into.length;
      this.qemu ??= this.viaQemu();
      await (await this.qemu).client.readInto(r.offset, into);
    }
  }

  async close(): Promise<void> {
    try {
      if (this.qemu) await (await this.qemu.catch(() => undefined))?.close();
    } finally {
      await this.fh.close();
    }
  }
}

function checkRange(offset: number, length: number, size: number): void {
  if (offset < 0 || length < 0 || offset + length > size) {
    throw new VmvaultError('BAD_INPUT', `read of ${length} bytes at ${offset} is outside the ${size}-byte disk`);
  }
}

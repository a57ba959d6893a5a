/**
 * Opening a guest's disk safely: the format comes from the configuration (or is
 * detected once by vmvault's own probe and pinned), and no metadata inside the image
 * makes qemu open another host file unless the configuration allows that chain.
 *
 * Two layers, so that one mistake is not enough: vmvault reads the image's own
 * headers (src/disk/image-refs.ts) before qemu sees it, and then checks qemu's view
 * (`qemu-img info -f FORMAT`) of the same image again.
 */
import { constants } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { VmvaultError } from '../errors.js';
import { checkFormat, type ImageFormat } from './image-format.js';
import { fileReader, imageReferences, isProtocolName, probeFormat, type ImageReference, type ReadAt } from './image-refs.js';
import { imageInfo, type ImageInfo } from './qemu.js';
import { mustExist } from './qemu-run.js';

export interface DiskSource {
  path: string;
  /** The format the VM's configuration states. Without it the image is probed once, by vmvault. */
  format?: ImageFormat;
  /**
   * The configuration allows this image to name other files (a linked clone's backing
   * file, a vmdk's extents): they are read through it, flattened, and recorded.
   * Protocol names (`nbd:`, `json:` …) are refused even then.
   */
  allowChain?: boolean;
  /** The format an earlier backup of this disk detected: a different probe now is refused. */
  pinned?: ImageFormat;
  /** For messages: the disk's name in the VM. */
  name?: string;
}

export interface InspectedDisk extends ImageInfo {
  /** Where the format came from: the configuration, or vmvault's probe. */
  formatSource: 'declared' | 'detected';
  /** The other files read through this image (allowed chains only), absolute. */
  chain: string[];
  /**
   * Of those, the ones this image's own writes never change: its backing files and what
   * they name (not its own data file or extents). A bitmap of this image says nothing of
   * them (change-tracking.ts chainStamps).
   */
  below?: string[];
}

const MAX_CHAIN = 16;

/**
 * Inspects a disk before any qemu tool opens it. Errors: NotFoundError, BAD_INPUT
 * (not a file or block device), UNSUPPORTED (a format vmvault does not read),
 * UNSAFE_IMAGE (names another file, or its detected format changed since the last
 * backup), IMAGE_LOCKED.
 */
export async function inspectDisk(src: DiskSource): Promise<InspectedDisk> {
  const abs = path.resolve(src.path);
  const what = src.name ? `disk "${src.name}" (${abs})` : `disk image ${abs}`;
  if (src.format !== undefined) checkFormat(src.format, abs);
  await mustExist(abs);
  const { format, refs } = await withReader(abs, async (read) => {
    const format = src.format ?? (await detect(read, abs, what, src.pinned));
    return { format, refs: await imageReferences(read, format, path.basename(abs)) };
  });
  const { chain, below } = refs.length === 0 ? { chain: [], below: [] } : await allowedChain(abs, format, refs, src, what);
  const info = await imageInfo(abs, format);
  // Second layer: what qemu itself says the image names must be what we allowed.
  const unexpected = info.references.filter((r) => !chain.includes(path.resolve(path.dirname(abs), r.name)));
  if (unexpected.length > 0) throw refused(what, format, unexpected);
  return { ...info, formatSource: src.format !== undefined ? 'declared' : 'detected', chain, below };
}

/** Opens without following a FIFO's open semantics (O_NONBLOCK) and re-checks the type on the open handle. */
async function withReader<T>(abs: string, fn: (read: ReadAt) => Promise<T>): Promise<T> {
  const fh = await fs.open(abs, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const st = await fh.stat();
    if (!st.isFile() && !st.isBlockDevice()) throw new VmvaultError('BAD_INPUT', `${abs} is not a regular file or block device: not a disk image`);
    return await fn(fileReader(fh));
  } finally {
    await fh.close();
  }
}

async function detect(read: ReadAt, abs: string, what: string, pinned: ImageFormat | undefined): Promise<ImageFormat> {
  const probe = await probeFormat(read);
  // The pin first: a raw disk's guest writes any header it likes into sector 0, and advice
  // to convert what is now only its data would let qemu take the format from the guest.
  const now = 'foreign' in probe ? probe.foreign : probe.format;
  if (pinned !== undefined && pinned !== now) {
    throw new VmvaultError('UNSAFE_IMAGE', `${what} was ${pinned} and now looks like ${now}: set its format in the inventory (format: ${pinned} if the VM still uses it as ${pinned}, --format with the CLI); nothing was read`);
  }
  if ('foreign' in probe) {
    throw new VmvaultError('UNSUPPORTED', `${what} looks like a ${probe.foreign} image, which vmvault does not read: convert it (qemu-img convert -O qcow2), or if the VM uses it as a raw disk, set format: raw for it in the inventory (--format raw)`);
  }
  return probe.format;
}

function refused(what: string, format: ImageFormat, refs: ImageReference[]): VmvaultError {
  const named = refs.map((r) => `${r.kind} "${r.name}"`).join(', ');
  return new VmvaultError('UNSAFE_IMAGE',
    `${what}, read as ${format}, names another file: ${named}. vmvault never lets an image's metadata choose a host file to read. ` +
    `If the VM uses this disk as a raw disk, set format: raw for it in the inventory (--format raw); if it is ${chainKinds(refs)} you trust, set allowChain: true for it (--allow-chain); nothing was read`);
}

/** What an image naming `refs` is when the operator meant it: said in their words. */
function chainKinds(refs: ImageReference[]): string {
  const kinds = new Set(refs.map((r) => ({
    'backing file': 'a linked clone',
    'vmdk parent': 'a linked clone',
    'data file': 'a qcow2 image with a data file',
    'vmdk extent': 'a vmdk made of extent files',
  })[r.kind]));
  return [...kinds].join(' or ');
}

/**
 * The files an allowed chain reads, following backing files to the base; refuses
 * protocol names, a backing file whose format the image does not state (qemu would
 * probe it), a format vmvault does not read, and chains longer than MAX_CHAIN.
 */
async function allowedChain(abs: string, format: ImageFormat, refs: ImageReference[], src: DiskSource, what: string): Promise<{ chain: string[]; below: string[] }> {
  if (!src.allowChain) throw refused(what, format, refs);
  const chain: string[] = [];
  const below: string[] = [];
  let current = { abs, refs };
  for (let depth = 0; ; depth++) {
    const protocol = current.refs.filter((r) => isProtocolName(r.name) || r.name.startsWith('('));
    if (protocol.length > 0) throw refused(what, format, protocol);
    let next: { abs: string; format: ImageFormat } | undefined;
    for (const r of current.refs) {
      const file = path.resolve(path.dirname(current.abs), r.name);
      chain.push(file);
      const backing = r.kind === 'backing file' || r.kind === 'vmdk parent';
      if (depth > 0 || backing) below.push(file);
      if (!backing) continue;
      const f = r.kind === 'vmdk parent' ? 'vmdk' : r.format;
      if (f === undefined) {
        throw new VmvaultError('UNSAFE_IMAGE', `${what}: backing file ${file} has no format stated in the image, so qemu would probe it: state it with qemu-img rebase -u -F FORMAT -b ${r.name} ${current.abs}`);
      }
      checkFormat(f, file);
      next = { abs: file, format: f };
    }
    if (!next) return { chain, below };
    if (depth >= MAX_CHAIN) throw new VmvaultError('UNSAFE_IMAGE', `${what}: its backing chain is longer than ${MAX_CHAIN} files`);
    await mustExist(next.abs);
    const nextFormat = next.format;
    current = { abs: next.abs, refs: await withReader(next.abs, (read) => imageReferences(read, nextFormat, path.basename(next!.abs))) };
  }
}

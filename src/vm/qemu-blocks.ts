/**
 * A running VM's block devices as QMP reports them, mapped to the inventory's disk
 * paths. Each inventory disk must be the active layer of one device, or the backing
 * file of a vmvault overlay on top of it (a run that crashed before committing it):
 * anything else means the inventory and the VM disagree, and backing up would read
 * the wrong image.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { NotFoundError, VmvaultError } from '../errors.js';
import type { QmpClient } from './qmp.js';

/** Overlays this tool creates end like this, so a crashed run's leftovers are recognised. */
export const OVERLAY_MARK = '.vmvault-overlay-';
const OVERLAY_RE = /\.vmvault-overlay-[0-9a-f]+\.qcow2$/;

export function isOverlayFile(file: string): boolean {
  return OVERLAY_RE.test(file);
}

/**
 * How the names of `image`'s overlays start. Next to the image, its file name is
 * enough; in a directory given for overlays, which several VMs may share, a hash of
 * the image's absolute path keeps apart images with the same file name (two VMs'
 * disk0.qcow2): otherwise one run's clean-up would take the other's overlay for its
 * own leftover and delete it while QEMU still writes to it.
 */
export function overlayPrefix(image: string, dir?: string): string {
  if (dir === undefined) return `${path.basename(image)}${OVERLAY_MARK}`;
  const hash = createHash('sha256').update(path.resolve(image)).digest('hex').slice(0, 12);
  return `${path.basename(image)}.${hash}${OVERLAY_MARK}`;
}

/** Where the overlay of `image` for run `id` goes: next to the image unless a directory is given. */
export function overlayPath(image: string, id: string, dir?: string): string {
  return path.join(dir ?? path.dirname(image), `${overlayPrefix(image, dir)}${id}.qcow2`);
}

interface ImageChain { filename: string; format: string; 'backing-image'?: ImageChain }
interface QueryBlock {
  device: string;
  qdev?: string;
  inserted?: { file: string; 'node-name': string; drv: string; image: ImageChain };
}
interface NamedNode { 'node-name': string; drv: string; file: string }

export interface AttachedDisk {
  /** The inventory's path, as given. */
  path: string;
  /** How the device is named in messages (qdev path or drive id). */
  device: string;
  /** The node at the top of the device: the image itself, or a leftover overlay. */
  topNode: string;
  /** Format driver of the image itself (qcow2, raw…). */
  format: string;
  /** A vmvault overlay left on top of the image by an earlier run. */
  leftover?: { file: string; node: string };
}

/** Resolves symlinks where the file exists, so two spellings of one file compare equal. */
async function canonical(p: string): Promise<string> {
  const abs = path.resolve(p);
  return fs.realpath(abs).catch(() => abs);
}

function chainOf(image: ImageChain): ImageChain[] {
  const out: ImageChain[] = [];
  for (let i: ImageChain | undefined = image; i; i = i['backing-image']) out.push(i);
  return out;
}

function deviceName(b: QueryBlock): string {
  return b.device || (b.qdev ?? '').replace(/^\/machine\/peripheral(?:-anon)?\//, '').replace(/\/virtio-backend$/, '') || '(unnamed device)';
}

/**
 * Maps each inventory path to the device that uses it. NotFoundError naming the disk
 * when a path is attached to no device; BAD_INPUT when it is only a backing file
 * under someone else's overlay.
 */
export async function attachedDisks(qmp: QmpClient, paths: string[]): Promise<AttachedDisk[]> {
  const blocks = (await qmp.execute<QueryBlock[]>('query-block')).filter((b) => b.inserted);
  const seen = await Promise.all(blocks.map(async (b) => ({
    b, chain: await Promise.all(chainOf(b.inserted!.image).map(async (c) => ({ ...c, canonical: await canonical(c.filename) }))),
  })));
  const out: AttachedDisk[] = [];
  for (const p of paths) {
    const want = await canonical(p);
    let found: AttachedDisk | undefined;
    for (const { b, chain } of seen) {
      const depth = chain.findIndex((c) => c.canonical === want);
      if (depth < 0) continue;
      const top = chain[0]!;
      if (depth === 0) {
        found = { path: p, device: deviceName(b), topNode: b.inserted!['node-name'], format: top.format };
      } else if (depth === 1 && isOverlayFile(top.filename)) {
        found = { path: p, device: deviceName(b), topNode: b.inserted!['node-name'], format: chain[1]!.format, leftover: { file: top.filename, node: b.inserted!['node-name'] } };
      } else {
        throw new VmvaultError('BAD_INPUT', `disk ${p} is a backing file of device ${deviceName(b)}, whose active layer is ${top.filename}: ` +
          'back up the active layer instead (fix the VM\'s disks in the inventory), or merge the external snapshot first');
      }
      break;
    }
    if (!found) {
      const attached = seen.map(({ b, chain }) => `${deviceName(b)}: ${chain[0]!.filename}`).join(', ') || 'none';
      throw new NotFoundError(`disk ${p} is not attached to the VM on QMP socket ${qmp.socketPath} (attached: ${attached}): fix the VM's disks in the inventory`);
    }
    out.push(found);
  }
  return out;
}

/**
 * The node name of `file` opened with format driver `format` (the base under a
 * leftover overlay); undefined when QEMU has none or more than one.
 */
export async function nodeOfFile(qmp: QmpClient, file: string, format: string): Promise<string | undefined> {
  const nodes = await qmp.execute<NamedNode[]>('query-named-block-nodes', { flat: true });
  const want = await canonical(file);
  const matches: string[] = [];
  for (const n of nodes) {
    if (n.drv === format && (await canonical(n.file)) === want) matches.push(n['node-name']);
  }
  return matches.length === 1 ? matches[0] : undefined;
}

/** Files in use by any device of the VM (every layer of every chain), canonical. */
export async function filesInUse(qmp: QmpClient): Promise<Set<string>> {
  const blocks = (await qmp.execute<QueryBlock[]>('query-block')).filter((b) => b.inserted);
  const out = new Set<string>();
  for (const b of blocks) for (const c of chainOf(b.inserted!.image)) out.add(await canonical(c.filename));
  return out;
}

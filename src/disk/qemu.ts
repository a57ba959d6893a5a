/**
 * qemu-img and qemu-nbd: inspecting, creating and snapshotting disk images, and
 * exporting them over NBD to our own client.
 *
 * Rules kept everywhere here (see DESIGN.md, "Known pitfalls"):
 * - the format is always given (`-f FORMAT` or `driver=FORMAT`); only imageInfo
 *   lets qemu detect it, once, and callers pass the result on;
 * - never `-U`/force-share: a locked image fails with IMAGE_LOCKED instead;
 * - paths are made absolute before qemu sees them, so a name like `nbd:x` or
 *   `json:{…}` is never taken for a protocol prefix.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { NotFoundError, VmvaultError } from '../errors.js';
import { checkFormat, type ImageFormat } from './image-format.js';
import type { ImageReference } from './image-refs.js';
import { mustExist, probeRawWriters, qcow2WithoutBacking, qemuFailure, runOn, runTool, ToolTimeout, type RunResult } from './qemu-run.js';
import { boundText, COMPARE_BYTES_PER_SECOND, toolTimeoutMs } from './tool-timeouts.js';

export { IMAGE_FORMATS, isImageFormat, type ImageFormat } from './image-format.js';
export { exportImage, type ExportOptions, type NbdExport } from './qemu-nbd.js';

export interface ImageInfo {
  /** Absolute path of the image. */
  path: string;
  format: ImageFormat;
  virtualSize: number;
  /** Bytes the image occupies on its filesystem. */
  actualSize: number;
  backingFile?: string;
  /**
   * Every other file qemu says the image names: backing file (a vmdk's parent), qcow2
   * data file, vmdk extents other than the image itself (names as qemu prints them).
   */
  references: ImageReference[];
  /** Internal snapshots (qcow2). */
  snapshots: { id: string; name: string }[];
  /** Persistent dirty bitmaps (qcow2) with qemu's flags: `auto` (tracking), `in-use` or `inconsistent` (not to be trusted). */
  bitmaps: { name: string; flags: string[] }[];
}

interface QemuImgInfoJson {
  format: string;
  'virtual-size': number;
  'actual-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  snapshots?: { id: string | number; name: string; 'date-sec'?: number; 'vm-state-size'?: number }[];
  'format-specific'?: { data?: { 'data-file'?: string; extents?: { filename?: string }[]; bitmaps?: { name: string; flags?: string[] }[] } };
}

/** The files other than `abs` that qemu's view of an image names. */
function referencesOf(abs: string, j: QemuImgInfoJson): ImageReference[] {
  const data = j['format-specific']?.data;
  const backing = j['full-backing-filename'] ?? j['backing-filename'];
  const refs: ImageReference[] = [];
  if (backing !== undefined) refs.push({ kind: j.format === 'vmdk' ? 'vmdk parent' : 'backing file', name: backing });
  if (data?.['data-file'] !== undefined) refs.push({ kind: 'data file', name: data['data-file'] });
  for (const e of data?.extents ?? []) if (e.filename !== undefined) refs.push({ kind: 'vmdk extent', name: e.filename });
  return refs.filter((r) => path.resolve(path.dirname(abs), r.name) !== abs);
}

/**
 * qemu-img info reads headers only: a minute (tool-timeouts.ts `inspect`) is far more
 * than it needs. It can block for good in open() (a FIFO named by an image), and must
 * not hold a backup for ever.
 */
async function infoJson(abs: string, format?: ImageFormat, timeoutMs = toolTimeoutMs('inspect')): Promise<QemuImgInfoJson> {
  const args = ['info', '--output=json', ...(format ? ['-f', format] : []), abs];
  const out = await runOn('qemu-img', abs, args, { timeoutMs });
  try {
    return JSON.parse(out) as QemuImgInfoJson;
  } catch (err) {
    throw new VmvaultError('QEMU', `qemu-img info printed something other than JSON for ${abs}`, { cause: err });
  }
}

/**
 * Inspect an image. Without `format`, qemu detects it: only for images vmvault made
 * itself or tests; a guest's disk goes through inspectDisk (src/disk/inspect.ts), which
 * pins the format and refuses references to other files before qemu opens anything.
 * NotFoundError when it does not exist, UNSUPPORTED for a
 * format outside IMAGE_FORMATS, IMAGE_LOCKED when a running VM or another program
 * holds it, QEMU when qemu-img fails or does not answer within `opts.timeoutMs`
 * (default a minute).
 */
export async function imageInfo(file: string, format?: ImageFormat, opts: { timeoutMs?: number } = {}): Promise<ImageInfo> {
  const abs = path.resolve(file);
  if (format !== undefined) checkFormat(format, abs);
  await mustExist(abs);
  const j = await infoJson(abs, format, opts.timeoutMs);
  checkFormat(j.format, abs);
  if (j.format === 'raw') await probeRawWriters(abs); // qemu-img info alone misses writers of raw images.
  const backing = j['full-backing-filename'] ?? j['backing-filename'];
  return {
    path: abs,
    format: j.format,
    virtualSize: j['virtual-size'],
    actualSize: j['actual-size'] ?? 0,
    ...(backing !== undefined ? { backingFile: backing } : {}),
    references: referencesOf(abs, j),
    snapshots: (j.snapshots ?? []).map((s) => ({ id: String(s.id), name: s.name })),
    bitmaps: (j['format-specific']?.data?.bitmaps ?? []).map((b) => ({ name: b.name, flags: b.flags ?? [] })),
  };
}

/**
 * Create a sparse image with no backing file. Refuses to overwrite an existing file
 * (qemu-img would, silently): ALREADY_EXISTS. `virtualSize` must be a multiple of
 * 512 (qemu would round it up).
 */
export async function createImage(file: string, format: ImageFormat, virtualSize: number): Promise<void> {
  const abs = path.resolve(file);
  checkFormat(format, abs);
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0 || virtualSize % 512 !== 0) {
    throw new VmvaultError('BAD_INPUT', `cannot create ${abs}: virtual size ${virtualSize} is not a non-negative multiple of 512 bytes`);
  }
  const exists = await fs.lstat(abs).then(() => true, () => false);
  if (exists) throw new VmvaultError('ALREADY_EXISTS', `cannot create disk image ${abs}: the file already exists`);
  const dir = path.dirname(abs);
  if (!(await fs.stat(dir).then((s) => s.isDirectory(), () => false))) throw new NotFoundError(`cannot create disk image ${abs}: directory ${dir} does not exist`);
  // preallocation=off is qcow2's default, stated so a changed default cannot bloat restores;
  // vmdk defaults to monolithicSparse and vdi to dynamic, raw files are created sparse.
  const opts = format === 'qcow2' ? ['-o', 'preallocation=off'] : [];
  const timeoutMs = toolTimeoutMs('metadata');
  let r: RunResult;
  try {
    r = await runTool('qemu-img', ['create', '-q', '-f', format, ...opts, abs, String(virtualSize)], { timeoutMs });
  } catch (err) {
    if (!(err instanceof ToolTimeout)) throw err;
    // The file did not exist before: what the stopped qemu-img left of it is ours, and incomplete.
    await fs.rm(abs, { force: true }).catch(() => {});
    throw new VmvaultError('QEMU', `qemu-img create did not finish within ${boundText(timeoutMs)} making ${abs} and was stopped, and the file removed: ` +
      `the storage of ${dir} may not be answering (a hung network mount). Check it, then try again`, { cause: err });
  }
  if (r.exitCode !== 0) throw qemuFailure('qemu-img', abs, r.stderr);
}

/**
 * A qemu-img command (`what`: its subcommand and options, as an operator would type
 * them) that writes qcow2 image `abs`'s metadata, stopped after the `metadata` bound.
 * A writer stopped mid-write can leave the image with leaked clusters or worse, so the
 * image is then checked (read-only) and the error says what the check found.
 */
async function runWriter(abs: string, what: string, args: string[]): Promise<void> {
  const timeoutMs = toolTimeoutMs('metadata');
  let r: RunResult;
  try {
    r = await runTool('qemu-img', args, { timeoutMs });
  } catch (err) {
    if (!(err instanceof ToolTimeout)) throw err;
    throw await writerStopped(abs, what, timeoutMs, err);
  }
  if (r.exitCode !== 0) throw qemuFailure('qemu-img', abs, r.stderr);
}

/**
 * A qemu-img writer of `image` was stopped for its time bound. `checksClean`: a
 * read-only `qemu-img check` run since finds the image's metadata consistent, so
 * qemu may go on writing to it (undoing what the stopped command began); otherwise
 * nothing more should be written to it.
 */
export class WriterStopped extends VmvaultError {
  constructor(readonly image: string, readonly checksClean: boolean, message: string, options: { cause: unknown }) {
    super('QEMU', message, options);
    this.name = 'WriterStopped';
  }
}

async function writerStopped(abs: string, what: string, timeoutMs: number, cause: unknown): Promise<WriterStopped> {
  const check = await imageCheck(abs).catch((err: unknown) => ({ failed: err instanceof Error ? err.message : String(err) }));
  const clean = 'corruptions' in check && check.corruptions === 0;
  const verdict = clean
    ? 'the image checks clean (qemu-img check; leaked clusters, if any, only waste space)'
    : 'corruptions' in check
      ? `the image has ${check.corruptions} metadata corruption(s) (qemu-img check): start no VM on it and write nothing to it; restore the disk ` +
        'from its last backup (vmvault restore), or repair a copy (qemu-img check -r all on the copy, then compare its contents with the last backup)'
      : `the image could not be checked (${check.failed}): once its storage answers, run "qemu-img check -f qcow2 ${abs}" before a VM uses it`;
  return new WriterStopped(abs, clean, `qemu-img ${what} did not finish within ${boundText(timeoutMs)} on ${abs} and was stopped (its storage may not be ` +
    `answering, as a hung network mount does, or the image is very large or crafted); since then ${verdict}. ` +
    'Check the storage before the next backup (VMVAULT_TOOL_TIMEOUTS=metadata=MILLISECONDS waits longer)', { cause });
}


function checkSnapshotName(name: string, abs: string): void {
  // qemu-img snapshot -d and -l accept an id or a name: an all-digit name could hit another snapshot's id.
  if (name.length === 0 || /^\d+$/.test(name) || name.length > 128) {
    throw new VmvaultError('BAD_INPUT', `invalid snapshot name "${name}" for ${abs}: use 1-128 characters, not only digits`);
  }
}

/**
 * Create a qcow2 internal snapshot. ALREADY_EXISTS when one of that name exists (qemu
 * would add a duplicate). `existing`: the image's snapshots as the caller just listed
 * them (saves a qemu-img info).
 */
export async function snapshotCreate(file: string, name: string, existing?: readonly { name: string }[]): Promise<void> {
  const abs = path.resolve(file);
  checkSnapshotName(name, abs);
  await mustExist(abs);
  if ((existing ?? (await infoJson(abs, 'qcow2')).snapshots ?? []).some((s) => s.name === name)) {
    throw new VmvaultError('ALREADY_EXISTS', `snapshot "${name}" already exists in disk image ${abs}`);
  }
  // qemu-img snapshot has no -f in QEMU 7.2: the json: filename pins the format (and opens no backing file).
  await runWriter(abs, `snapshot -c ${name}`, ['snapshot', '-q', '-c', name, await qcow2WithoutBacking(abs)]);
}

/**
 * Delete a qcow2 internal snapshot. NotFoundError when there is none of that name.
 * `known`: the caller created or just listed it, so the existence check (a qemu-img
 * info) is skipped; qemu's own "snapshot not found" is still a NotFoundError.
 */
export async function snapshotDelete(file: string, name: string, opts: { known?: boolean } = {}): Promise<void> {
  if (!opts.known) return onExistingSnapshot(file, name, '-d');
  const abs = path.resolve(file);
  checkSnapshotName(name, abs);
  await mustExist(abs);
  await runWriter(abs, `snapshot -d ${name}`, ['snapshot', '-q', '-d', name, await qcow2WithoutBacking(abs)]);
}

/** `qemu-img snapshot -d|-a NAME` once the snapshot is known to exist (NotFoundError otherwise) and to be the only one NAME can mean. */
async function onExistingSnapshot(file: string, name: string, op: '-d' | '-a'): Promise<void> {
  const abs = path.resolve(file);
  checkSnapshotName(name, abs);
  await mustExist(abs);
  const j = await infoJson(abs, 'qcow2');
  const snapshots = (j.snapshots ?? []).map((s) => ({ id: String(s.id), name: s.name }));
  if (!snapshots.some((s) => s.name === name)) {
    throw new NotFoundError(`snapshot "${name}" does not exist in disk image ${abs}`);
  }
  // -d goes by name only: there, only two snapshots of that name are ambiguous.
  const ambiguous = ambiguousSnapshot(op === '-a' ? snapshots : snapshots.filter((s) => s.name === name), name, abs);
  if (ambiguous) throw ambiguous;
  await runWriter(abs, `snapshot ${op} ${name}`, ['snapshot', '-q', op, name, await qcow2WithoutBacking(abs)]);
}

/**
 * Why `name` does not name one snapshot of `where` for QEMU, or undefined when it does.
 * QEMU's revert (qemu-img snapshot -a, snapshot-load) takes the first snapshot whose id
 * or name is the tag, ids first; an id is any string the image holds, so an image (a
 * copied one, or crafted) could carry a snapshot whose id is the name of another, and a
 * revert would load that one. `qemu-img snapshot -d` goes by name only, but takes the
 * first of two of the same name.
 */
export function ambiguousSnapshot(snapshots: readonly { id: string; name: string }[], name: string, where: string): VmvaultError | undefined {
  const named = snapshots.filter((s) => s.name === name);
  const byId = snapshots.filter((s) => s.id === name && s.name !== name);
  if (named.length <= 1 && byId.length === 0) return undefined;
  const what = [...named.map((s) => `id ${s.id} named "${s.name}"`), ...byId.map((s) => `id "${s.id}" named "${s.name}"`)].join(', ');
  return new VmvaultError('AMBIGUOUS', `snapshot name "${name}" means more than one snapshot of ${where} (${what}): QEMU would take the first whose id or name matches, ` +
    'ids first. Nothing was changed. Look at them with "qemu-img snapshot -l"; the one that is not yours must go, deleted by its name with "qemu-img snapshot -d NAME" ' +
    '(which goes by name only) while the VM is stopped, on a copy of the image first if unsure');
}

/**
 * What `qemu-img check` finds in a qcow2 image's metadata: `corrupt` (clusters whose
 * refcounts or tables disagree: qemu may allocate a cluster that holds guest data for
 * its own metadata, and a write overwrites it), or why it could not tell. Leaked
 * clusters (allocated, unused) are harmless and not counted. Read-only, no backing file
 * opened, bounded in time (a crafted table can make the check long): `timedOut` says the
 * check was stopped for that, which says nothing of the image. IMAGE_LOCKED when a
 * process holds the image.
 */
export async function imageCheck(file: string, timeoutMs = toolTimeoutMs('check')): Promise<{ corruptions: number } | { failed: string; timedOut?: true }> {
  const abs = path.resolve(file);
  await mustExist(abs);
  let r;
  try {
    r = await runTool('qemu-img', ['check', '--output=json', await qcow2WithoutBacking(abs)], { timeoutMs });
  } catch (err) {
    if (err instanceof ToolTimeout) return { failed: `qemu-img check did not finish within ${boundText(timeoutMs)} and was stopped`, timedOut: true };
    return { failed: err instanceof Error ? err.message : String(err) };
  }
  // 0: clean; 2: corruptions; 3: leaks only; 1: the check could not complete; 63: not supported.
  if (r.exitCode !== 0 && r.exitCode !== 2 && r.exitCode !== 3) {
    // Held by a process (a VM started since the image was inspected): that is no damage.
    const failure = qemuFailure('qemu-img', abs, r.stderr);
    if (failure.code === 'IMAGE_LOCKED') throw failure;
    return { failed: `qemu-img check exited with ${r.exitCode}: ${r.stderr.trim().split('\n')[0] ?? ''}` };
  }
  try {
    const j = JSON.parse(r.stdout) as { corruptions?: number; 'check-errors'?: number };
    if (j['check-errors']) return { failed: `qemu-img check met ${j['check-errors']} error(s) it could not get past` };
    return { corruptions: j.corruptions ?? 0 };
  } catch {
    return { failed: 'qemu-img check printed something other than JSON' };
  }
}

/**
 * Adds (`--add`, persistent and enabled: every later write through any qemu program
 * marks it) or removes a dirty bitmap of a qcow2 image nobody has open. The json:
 * filename pins the format and opens no backing file.
 */
export async function bitmapChange(file: string, op: '--add' | '--remove', name: string): Promise<void> {
  const abs = path.resolve(file);
  await mustExist(abs);
  await runWriter(abs, `bitmap ${op} ${name}`, ['bitmap', op, await qcow2WithoutBacking(abs), name]);
}

/** One internal snapshot of a qcow2 image, as qemu-img reports it. */
export interface InternalSnapshot {
  id: string;
  name: string;
  /** When it was taken (qemu stores whole seconds). */
  date: Date;
  /** Bytes of saved VM state: 0 for a disk-only snapshot (qemu-img snapshot -c). */
  vmStateSize: number;
}

/** The internal snapshots of a qcow2 image. IMAGE_LOCKED when a running VM holds it. */
export async function snapshotList(file: string): Promise<InternalSnapshot[]> {
  const abs = path.resolve(file);
  await mustExist(abs);
  const j = await infoJson(abs, 'qcow2');
  checkFormat(j.format, abs);
  return (j.snapshots ?? []).map((s) => ({
    id: String(s.id), name: s.name, date: new Date((s['date-sec'] ?? 0) * 1000), vmStateSize: s['vm-state-size'] ?? 0,
  }));
}

/**
 * Revert a qcow2 image to an internal snapshot (qemu-img snapshot -a). qemu-img opens
 * the image for writing, so an image a running VM holds fails with IMAGE_LOCKED and
 * is left unchanged. NotFoundError when there is no snapshot of that name.
 */
export function snapshotApply(file: string, name: string): Promise<void> {
  return onExistingSnapshot(file, name, '-a');
}

/**
 * Compare the guest-visible contents of two images (qemu-img compare, not strict:
 * unallocated and zero regions are equal, and a shorter image counts as zero-extended).
 * Formats not given are detected with imageInfo.
 */
export async function compareImages(a: string, b: string, fa?: ImageFormat, fb?: ImageFormat): Promise<{ identical: boolean; output: string }> {
  const absA = path.resolve(a);
  const absB = path.resolve(b);
  const formatA = fa ?? (await imageInfo(absA)).format;
  const formatB = fb ?? (await imageInfo(absB)).format;
  checkFormat(formatA, absA);
  checkFormat(formatB, absB);
  await mustExist(absA);
  await mustExist(absB);
  // It reads both images' data: the bound grows with their files' sizes.
  const bytes = (await fs.stat(absA)).size + (await fs.stat(absB)).size;
  const timeoutMs = toolTimeoutMs('compare') + Math.ceil(bytes / COMPARE_BYTES_PER_SECOND) * 1000;
  let r: RunResult;
  try {
    r = await runTool('qemu-img', ['compare', '-f', formatA, '-F', formatB, absA, absB], { timeoutMs });
  } catch (err) {
    if (!(err instanceof ToolTimeout)) throw err;
    throw new VmvaultError('QEMU', `qemu-img compare did not finish within ${boundText(timeoutMs)} on ${absA} and ${absB} and was stopped (nothing was changed): ` +
      'their storage may not be answering (a hung network mount). Check it, then compare again', { cause: err });
  }
  // Exit status: 0 identical, 1 different, anything else an error.
  if (r.exitCode !== 0 && r.exitCode !== 1) throw qemuFailure('qemu-img compare', `${absA} or ${absB}`, r.stderr);
  return { identical: r.exitCode === 0, output: r.stdout.trim() };
}

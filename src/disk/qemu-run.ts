/**
 * Running qemu tools and turning their failures into errors an operator can act on.
 * qemu reports everything on stderr as "tool: message"; the message is kept verbatim
 * in the error so nothing qemu said is lost.
 */
import { execa } from 'execa';
import type { Stats } from 'node:fs';
import fs from 'node:fs/promises';
import { NotFoundError, VmvaultError } from '../errors.js';
import { errnoError } from '../storage/refusal.js';
import { boundText, toolTimeoutMs } from './tool-timeouts.js';
import { toolEnv } from '../tool-env.js';
import { fileKind } from '../files.js';

/** qemu's wording when an image's OFD lock is held (file-posix raw_check_lock_bytes). */
const LOCKED = /Failed to get (?:shared )?"[a-z ]+" lock|Is another process using the image/;
const MISSING_FILE = /No such file or directory/;
const MISSING_SNAPSHOT = /snapshot not found|Can't find snapshot/i;

/** The lines of qemu's stderr worth showing, joined on one line. */
export function stderrText(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
  return lines.join(' ').slice(0, 2000) || '(no message)';
}

/**
 * The error for a qemu tool that failed on `image`:
 * IMAGE_LOCKED when another process holds the image, NotFoundError for a missing
 * file or snapshot, QEMU (with qemu's own words) for anything else.
 */
export function qemuFailure(tool: string, image: string, stderr: string): VmvaultError {
  const said = stderrText(stderr);
  if (LOCKED.test(stderr)) {
    return new VmvaultError('IMAGE_LOCKED',
      `disk image ${image} is in use: a running VM or another program holds its lock (${tool}: ${said}). ` +
      'Stop the VM (or the other program) first, or back the VM up through the running-QEMU driver.');
  }
  if (MISSING_SNAPSHOT.test(stderr)) return new NotFoundError(`snapshot not found in disk image ${image} (${tool}: ${said})`);
  if (MISSING_FILE.test(stderr)) return new NotFoundError(`disk image ${image} does not exist (${tool}: ${said})`);
  const errno = STDERR_ERRNO.find(([, words]) => words.test(stderr))?.[0];
  return new VmvaultError('QEMU', `${tool} failed on ${image}: ${said}`, errno ? { cause: errnoError(errno, said) } : {});
}

/**
 * strerror() texts qemu prints for the errors of the file system it writes to, as
 * errno codes: given as the error's cause, so that a restore says its target is full
 * or read-only as it does when its own write fails.
 */
const STDERR_ERRNO: ReadonlyArray<readonly [string, RegExp]> = [
  ['ENOSPC', /No space left on device/],
  ['EDQUOT', /Disk quota exceeded/],
  ['EROFS', /Read-only file system/],
  ['EACCES', /Permission denied/],
  ['EFBIG', /File too large/],
];

export interface RunResult { exitCode: number; stdout: string; stderr: string }

export interface RunOptions {
  /** Stop the tool (SIGTERM, then SIGKILL 5 s later) when it has not exited after this long. */
  timeoutMs?: number;
}

/** The tool was stopped after `RunOptions.timeoutMs`. */
export class ToolTimeout extends Error {}

/** Run a qemu tool to completion; rejects with VmvaultError('QEMU') only when it could not start, ToolTimeout when it was stopped. */
export async function runTool(tool: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await execa(tool, args, { reject: false, stdin: 'ignore', encoding: 'utf8', env: toolEnv(), extendEnv: false, ...(opts.timeoutMs !== undefined ? { timeout: opts.timeoutMs } : {}) });
  if (r.timedOut) throw new ToolTimeout(r.shortMessage);
  if (r.exitCode === undefined) {
    const missing = (r.cause as NodeJS.ErrnoException | undefined)?.code === 'ENOENT';
    throw new VmvaultError('QEMU', missing
      ? `${tool} is not installed (install qemu-utils)`
      : `${tool} could not be run: ${r.shortMessage}`, { cause: r.cause });
  }
  return { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
}

/**
 * Run a qemu tool on `image` and return its stdout; any non-zero exit becomes
 * `qemuFailure`. A tool stopped after `opts.timeoutMs` is a QEMU error saying so: an
 * open() that never returns (a FIFO the image names) would otherwise hold the backup
 * for ever. (One stuck in the kernel on a hung hard network mount cannot be killed,
 * and is waited for.)
 */
export async function runOn(tool: string, image: string, args: string[], opts: RunOptions = {}): Promise<string> {
  let r: RunResult;
  try {
    r = await runTool(tool, args, opts);
  } catch (err) {
    if (!(err instanceof ToolTimeout)) throw err;
    throw new VmvaultError('QEMU',
      `${tool} ${args[0] ?? ''} did not answer within ${boundText(opts.timeoutMs ?? 0)} on ${image} and was stopped: it may be blocked opening a file the image names ` +
      '(a FIFO or device named as a vmdk extent or backing file) or on storage that does not answer (a hung network mount). ' +
      "Check the files the image's metadata names and the storage it lives on; nothing was read", { cause: err });
  }
  if (r.exitCode !== 0) throw qemuFailure(tool, image, r.stderr);
  return r.stdout;
}

/**
 * NotFoundError("disk image … does not exist") unless `file` exists; BAD_INPUT unless
 * it is a regular file or a block device. A FIFO, socket or character device given as
 * a disk would make a qemu tool block for ever (or read a stream), so it is refused
 * before any qemu tool runs.
 */
export async function mustExist(file: string): Promise<void> {
  let st: Stats;
  try {
    st = await fs.stat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new NotFoundError(`disk image ${file} does not exist`, { cause: err });
    throw new VmvaultError('QEMU', `cannot access disk image ${file}: ${(err as Error).message}`, { cause: err });
  }
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new VmvaultError('BAD_INPUT', `${file} is ${fileKind(st)}, not a disk image: give the path of an image file or a block device`);
  }
}

/**
 * A qcow2 image as a `json:` filename with its format pinned and `"backing": null`:
 * qemu opens no backing file, whatever the image's header says (qemu-img snapshot
 * and qemu-nbd would otherwise open it, even for operations that never read it).
 */
export async function qcow2WithoutBacking(abs: string): Promise<string> {
  const driver = (await fs.stat(abs)).isBlockDevice() ? 'host_device' : 'file';
  return `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver, filename: abs } })}`;
}

/** A value inside qemu's key=value,… option syntax: commas are doubled. */
export function optValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/**
 * IMAGE_LOCKED if a running VM (or anything else) has a raw image open for writing.
 *
 * qemu-img info and a read-only qemu-nbd do not notice that for raw images: only
 * format drivers with metadata (qcow2, vmdk, vdi) refuse to share writes, and a raw
 * read-only export shares everything. `qemu-img convert` opens its source without
 * sharing writes, so converting zero bytes of it to /dev/null is a lock probe that
 * reads and writes nothing. It sees writers present now; it cannot stop a VM that
 * starts later (a raw image then needs the running-QEMU driver).
 */
export async function probeRawWriters(abs: string): Promise<void> {
  const spec = `driver=raw,size=0,file.filename=${optValue(abs)}`;
  await runOn('qemu-img', abs, ['convert', '-q', '-n', '--image-opts', spec, '-O', 'raw', '/dev/null'], { timeoutMs: toolTimeoutMs('inspect') });
}

/**
 * Exporting an image with qemu-nbd on a private unix socket, connected to our
 * NbdClient.
 *
 * Process lifetime (verified by test/disk/qemu.test.ts):
 * - qemu-nbd runs without --fork and without --persistent, with --shared=1: it
 *   serves exactly one client and exits by itself as soon as that client
 *   disconnects. So once connected, a SIGKILLed node process (whose socket the
 *   kernel closes) takes qemu-nbd down with it.
 * - Before the connection exists there is a window where nothing would stop it;
 *   when util-linux `setpriv` is available qemu-nbd is started under
 *   `setpriv --pdeathsig TERM`, so the kernel signals it when node dies. SIGTERM, not
 *   KILL: qemu-nbd then closes the image cleanly. (pdeathsig follows the thread that
 *   spawned it: spawn exports from a long-lived thread.)
 * - execa's `cleanup` kills it when node exits normally or on SIGINT/SIGTERM.
 */
import { execa } from 'execa';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmvaultError } from '../errors.js';
import { toolEnv } from '../tool-env.js';
import { checkFormat, type ImageFormat } from './image-format.js';
import { NbdClient } from './nbd.js';
import { OWNER_FILE, endOrphanExports, writeOwner } from './nbd-orphans.js';
import { mustExist, optValue, probeRawWriters, qcow2WithoutBacking, qemuFailure } from './qemu-run.js';

export interface ExportOptions {
  format: ImageFormat;
  readOnly: boolean;
  /** Name of a qcow2 internal snapshot to export instead of the live image (read-only). */
  snapshot?: string;
  /**
   * Open a qcow2 image's backing file. Off by default: the image is opened with
   * `"backing": null`, so even a backing file the inspection missed is never read
   * (src/disk/inspect.ts refuses such images first; this is the second lock).
   */
  allowBacking?: boolean;
  /**
   * Export this persistent dirty bitmap (`qemu-nbd -B`) and connect through its
   * `qemu:dirty-bitmap:NAME` context: the client then answers `dirtyExtents()`.
   */
  bitmap?: string;
  /**
   * Clients served at once (default 1): 2 lets a second client read the data beside
   * the one reading the bitmap. qemu-nbd still exits once the last one disconnects.
   */
  shared?: number;
}

export interface NbdExport {
  client: NbdClient;
  /** qemu-nbd's process id, for diagnostics and tests. */
  readonly pid: number;
  readonly socketPath: string;
  /** Disconnect, wait for qemu-nbd to exit (SIGTERM after 5 s, SIGKILL 5 s later), remove the socket directory. Idempotent. */
  close(): Promise<void>;
}

const START_TIMEOUT_MS = 30_000;
const EXIT_GRACE_MS = 5_000;

let pdeathsig: Promise<boolean> | undefined;
function havePdeathsig(): Promise<boolean> {
  pdeathsig ??= execa('setpriv', ['--pdeathsig', 'TERM', '--', 'true'], { reject: false, stdin: 'ignore', env: toolEnv(), extendEnv: false })
    .then((r) => r.exitCode === 0, () => false);
  return pdeathsig;
}

/**
 * Starts what the first export of a process checks once (whether setpriv can tie
 * qemu-nbd's life to vmvault's, about 20 ms; the sweep of stale socket directories), so
 * that it overlaps the caller's own work, such as taking a snapshot, instead of
 * delaying that export.
 */
export function prepareExports(): void {
  void havePdeathsig();
  sweptOnce ??= Promise.all([
    sweepSocketDirs(socketParent()).catch(() => 0),
    endOrphans(),
  ]).then(([dirs, orphans]) => ({ dirs, orphans }));
}

/** Not async on purpose: execa's subprocess is a thenable, which an async function would await. */
function launch(args: string[], withPdeathsig: boolean) {
  const [file, argv] = withPdeathsig ? ['setpriv', ['--pdeathsig', 'TERM', '--', 'qemu-nbd', ...args]] : ['qemu-nbd', args];
  return execa(file, argv, {
    reject: false, stdin: 'ignore', stdout: 'ignore', encoding: 'utf8', cleanup: true, forceKillAfterDelay: false, env: toolEnv(), extendEnv: false,
  });
}
type Proc = ReturnType<typeof launch>;
type Exit = Awaited<Proc>;

const SOCKET_DIR_PREFIX = 'vmvault-nbd-';
/** How old an empty socket directory must be to be taken as left by a killed process. */
const STALE_SOCKET_DIR_MS = 10 * 60_000;
let sweptOnce: Promise<{ dirs: number; orphans: number }> | undefined;

/**
 * Removes the socket directories that killed vmvault processes left in `parent`
 * (a process that exits normally removes its own; qemu-nbd removes its socket when it
 * ends, and ends with its parent). Only directories of this user, older than the
 * longest start-up, holding nothing but an owner file (src/disk/nbd-orphans.ts), are
 * removed: a live export's directory holds its socket, and anything else is left alone.
 * Returns how many were removed.
 */
export async function sweepSocketDirs(parent: string, now = Date.now()): Promise<number> {
  let removed = 0;
  for (const name of await fs.readdir(parent)) {
    if (!name.startsWith(SOCKET_DIR_PREFIX)) continue;
    const dir = path.join(parent, name);
    const st = await fs.lstat(dir).catch(() => undefined);
    if (!st?.isDirectory() || st.uid !== process.getuid?.() || now - st.mtimeMs < STALE_SOCKET_DIR_MS) continue;
    const entries = await fs.readdir(dir).catch(() => undefined);
    if (!entries || entries.some((e) => e !== OWNER_FILE)) continue;
    try {
      if (entries.length > 0) await fs.unlink(path.join(dir, OWNER_FILE));
      await fs.rmdir(dir);
      removed++;
    } catch {
      /* not empty (a live export), or removed meanwhile */
    }
  }
  return removed;
}

/** Ends the orphaned exports of killed vmvault processes (src/disk/nbd-orphans.ts); how many. */
function endOrphans(): Promise<number> {
  return endOrphanExports(socketParent(), SOCKET_DIR_PREFIX).catch(() => 0);
}

/** A short directory for the socket: unix socket paths are limited to 107 bytes. */
export function socketParent(): string {
  const tmp = os.tmpdir();
  return tmp.length <= 60 ? tmp : '/tmp';
}

/**
 * Serve an image with qemu-nbd and connect an NbdClient to it.
 *
 * Cache mode: `--cache=none` (O_DIRECT, host write cache still flushed on NBD flush).
 * Measured on 2 GiB here it read cold data ~20% faster than writeback and wrote
 * ~3x faster, and what it reads does not evict the host's page cache. (A full backup
 * of a raw or qcow2 image reads its file without qemu-nbd, through the page cache:
 * src/disk/direct-read.ts.) Filesystems
 * without O_DIRECT fall back to writeback. Writable exports get `--discard=unmap`
 * so writeZeroes can leave holes.
 *
 * Errors: NotFoundError (no such image or snapshot), UNSUPPORTED (format, or a
 * snapshot of a non-qcow2 image), IMAGE_LOCKED (a running VM or another program
 * holds the image), QEMU (anything else qemu-nbd said).
 */
export function exportImage(file: string, opts: ExportOptions): Promise<NbdExport> {
  return retryIfOrphansHeld(() => exportOnce(file, opts));
}

/**
 * Runs `op`, and once more if it failed with IMAGE_LOCKED and orphaned qemu-nbd
 * processes of earlier, killed vmvault processes were found and ended
 * (src/disk/nbd-orphans.ts): the lock was theirs.
 */
export async function retryIfOrphansHeld<T>(op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (err) {
    if (!(err instanceof VmvaultError && err.code === 'IMAGE_LOCKED')) throw err;
    // This process's first sweep (prepareExports) may be ending that very orphan right now.
    const first = sweptOnce ? (await sweptOnce).orphans : 0;
    if (first + (await endOrphans()) === 0) throw err;
    return await op();
  }
}

async function exportOnce(file: string, opts: ExportOptions): Promise<NbdExport> {
  const abs = path.resolve(file);
  checkFormat(opts.format, abs);
  if (opts.snapshot !== undefined) {
    if (opts.format !== 'qcow2') throw new VmvaultError('UNSUPPORTED', `cannot export snapshot "${opts.snapshot}" of ${abs}: internal snapshots exist only in qcow2 images, this one is ${opts.format}`);
    if (!opts.readOnly) throw new VmvaultError('BAD_INPUT', `cannot export snapshot "${opts.snapshot}" of ${abs} writable: snapshots are exported read-only`);
  }
  await mustExist(abs);
  // qemu-nbd shares every permission, and raw has no metadata to protect: without this
  // probe it would serve a raw image that a VM (or another qemu-nbd) is writing.
  if (opts.format === 'raw') await probeRawWriters(abs);
  prepareExports();
  const dir = await fs.mkdtemp(path.join(socketParent(), SOCKET_DIR_PREFIX)); // mkdtemp creates it 0700
  try {
    await writeOwner(dir);
    const first = await start(abs, opts, dir, 'none');
    if (first !== 'no-o-direct') return first;
    return await start(abs, opts, dir, 'writeback') as NbdExport;
  } catch (err) {
    await fs.rm(dir, { recursive: true, force: true });
    throw err;
  }
}

async function start(abs: string, opts: ExportOptions, dir: string, cache: 'none' | 'writeback'): Promise<NbdExport | 'no-o-direct'> {
  const socketPath = path.join(dir, 'nbd.sock');
  const args = ['-f', opts.format, `--shared=${opts.shared ?? 1}`, '-k', socketPath, `--cache=${cache}`];
  args.push(...(opts.readOnly ? ['--read-only'] : ['--discard=unmap']));
  // snapshot.name= rather than a bare name, which qemu would also match against snapshot ids.
  if (opts.snapshot !== undefined) args.push('-l', `snapshot.name=${optValue(opts.snapshot)}`);
  if (opts.bitmap !== undefined) args.push('-B', opts.bitmap);
  args.push(opts.format === 'qcow2' && !opts.allowBacking ? await qcow2WithoutBacking(abs) : abs);
  const proc = launch(args, await havePdeathsig());
  let exited: Exit | undefined;
  const exit = proc.then((r) => (exited = r));
  const failed = (r: Exit): VmvaultError => r.exitCode === undefined
    ? new VmvaultError('QEMU', `qemu-nbd could not be started for ${abs}: ${r.shortMessage}`, { cause: r.cause })
    : qemuFailure('qemu-nbd', abs, r.stderr);

  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (exited) {
      if (cache === 'none' && /Invalid argument/.test(exited.stderr)) return 'no-o-direct';
      throw failed(exited);
    }
    try {
      const client = await NbdClient.connect(socketPath, { server: `qemu-nbd for ${abs}`, ...(opts.bitmap !== undefined ? { metaContext: `qemu:dirty-bitmap:${opts.bitmap}` } : {}) });
      return makeExport(proc, exit, client, dir, socketPath, abs);
    } catch (err) {
      const code = ((err as VmvaultError).cause as NodeJS.ErrnoException | undefined)?.code;
      if (code !== 'ENOENT' && code !== 'ECONNREFUSED') {
        // The handshake failed: if qemu-nbd is on its way out, its stderr says why.
        const r = await Promise.race([exit, sleep(1000, undefined, { ref: false })]);
        if (r) throw failed(r);
        await stop(proc, exit, 0);
        throw err;
      }
    }
    if (Date.now() > deadline) {
      await stop(proc, exit, 0);
      throw new VmvaultError('QEMU', `qemu-nbd did not start serving ${abs} within ${START_TIMEOUT_MS / 1000} s`);
    }
    await Promise.race([sleep(10), exit]); // Not listening yet: poll, or notice the exit at once.
  }
}

function makeExport(proc: Proc, exit: Promise<Exit>, client: NbdClient, dir: string, socketPath: string, abs: string): NbdExport {
  let closing: Promise<void> | undefined;
  const close = async (): Promise<void> => {
    await client.close();
    const { result, killed } = await stop(proc, exit, EXIT_GRACE_MS);
    await fs.rm(dir, { recursive: true, force: true });
    if (!killed && result.exitCode !== 0) throw qemuFailure('qemu-nbd', abs, result.stderr);
  };
  return {
    client,
    pid: proc.pid!,
    socketPath,
    close: () => (closing ??= close()),
  };
}

/** Wait up to `graceMs` for qemu-nbd to exit by itself; then SIGTERM, and SIGKILL if that is ignored. */
async function stop(proc: Proc, exit: Promise<Exit>, graceMs: number): Promise<{ result: Exit; killed: boolean }> {
  const within = (ms: number) => Promise.race([exit, sleep(ms, undefined, { ref: false })]);
  let result = await within(graceMs);
  if (result) return { result, killed: false };
  proc.kill('SIGTERM');
  result = await within(EXIT_GRACE_MS);
  if (!result) proc.kill('SIGKILL');
  return { result: await exit, killed: true };
}

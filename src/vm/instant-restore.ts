/**
 * Instant restore: the VM runs from its backup within seconds, and the data moves to
 * its final images underneath it (see instant-copy.ts for the QEMU side).
 *
 *   export each disk over NBD (a unix socket in DIR) → a qcow2 overlay per disk backed
 *   by it → QEMU runs on the overlays (started by vmvault, or an already running one
 *   told over QMP) → blockdev-mirror each overlay to its final image, rate-limited →
 *   pivot → stop the exports, delete the overlays and the state file.
 *
 * Everything needed to finish is in DIR/instant-restore.json from before the VM starts
 * until the end: `resumeInstantRestore` restarts the exports on the same sockets,
 * wakes the paused VM and copy jobs, and finishes. The exports live in this process,
 * so vmvault dying is the export dying: the VM then pauses on I/O errors (never reads
 * anything else) until a resume.
 */
import { chmod, mkdir, open, readFile, rm, writeFile } from 'node:fs/promises';
import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';
import { VmvaultError, errorMessage } from '../errors.js';
import { createImage } from '../disk/qemu.js';
import { runTool, stderrText, ToolTimeout } from '../disk/qemu-run.js';
import { toolEnv } from '../tool-env.js';
import { ownProcesses } from '../disk/nbd-orphans.js';
import { boundText, toolTimeoutMs } from '../disk/tool-timeouts.js';
import { exportBackupDisk, type NbdExport } from '../pipeline/nbd-export.js';
import { FORMAT_EXT, pathInside } from '../pipeline/names.js';
import { adjustConfig } from '../pipeline/restore.js';
import type { ProgressFn } from '../pipeline/progress.js';
import type { Repository } from '../repo/repository.js';
import type { Manifest } from '../repo/manifest.js';
import { addNodes, copyAndPivot, deviceOptions, dropSource, nodeNames, pivotedAlready, revive, sourceNodes, startMirror } from './instant-copy.js';
import { STATE_FILE, readState, writeState, type InstantDisk, type InstantState } from './instant-state.js';
import { QmpClient } from './qmp.js';
import { exists } from '../files.js';

export interface StartOptions { machine?: string; memoryMiB?: number; cpus?: number }

export interface InstantRestoreRequest {
  backupId: string;
  to: string;
  /** `start`: vmvault runs QEMU on the restored configuration; `qmp`: a running QEMU gets the disks. */
  vm: { start: StartOptions } | { qmp: string };
  /** Final image format (qcow2 or raw); qcow2 unless the disk was raw. */
  format?: 'qcow2' | 'raw';
  /** Copy rate limit in bytes per second (default none). */
  rate?: number;
  force?: boolean;
  onProgress?: ProgressFn;
  /** The VM runs on the overlays: where its (operator's) QMP monitor is. */
  onRunning?: (where: { qmpSocket: string }) => void;
}

export interface InstantRestoreResult {
  backup: string;
  vm: string;
  directory: string;
  disks: { name: string; path: string; format: string }[];
  qmpSocket: string;
  /** Seconds from the call to the VM running, and to the end. */
  runningAfter: number;
  seconds: number;
}

/** sun_path holds 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH = 107;
const resumeHint = (dir: string) => `finish with "vmvault restore --resume ${dir}"`;

export async function instantRestore(repo: Repository, req: InstantRestoreRequest): Promise<InstantRestoreResult> {
  const started = Date.now();
  const dir = resolve(req.to);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  if (await exists(join(dir, STATE_FILE))) throw new VmvaultError('ALREADY_EXISTS', `an instant restore is unfinished in ${dir}: ${resumeHint(dir)}`);
  const manifest = await repo.loadManifest(req.backupId);
  const state = plan(manifest, dir, req);
  const taken = (await Promise.all(state.disks.map(async (d) => (await exists(d.target)) ? d.target : undefined))).filter(Boolean);
  if (taken.length && !req.force) throw new VmvaultError('ALREADY_EXISTS', `${taken.join(', ')} already exist: choose another directory or pass --force to replace them; nothing was written`);

  const exports: NbdExport[] = [];
  let running = false;
  try {
    for (const d of state.disks) exports.push(await exportBackupDisk({ repo, backupId: manifest.id, disk: d.name, listen: `unix:${d.socket}` }));
    for (const d of state.disks) await prepareImages(d, !!req.force);
    await writeConfigs(manifest, state, dir, !!req.force);
    await writeState(dir, state);
    const qmp = 'start' in req.vm ? await startQemu(state, manifest, dir, req.vm.start) : await attach(req.vm.qmp, state);
    running = true;
    const runningAfter = (Date.now() - started) / 1000;
    req.onRunning?.({ qmpSocket: state.userQmpSocket ?? state.qmpSocket });
    try {
      for (const d of state.disks) await startMirror(qmp, d, state.rate);
      await finish(qmp, state, dir, req.onProgress);
    } finally {
      await qmp.close();
    }
    return result(state, manifest, dir, runningAfter, started);
  } catch (err) {
    if (!running) {
      await Promise.all(state.disks.map((d) => Promise.all([rm(d.overlay, { force: true }), rm(d.target, { force: true })])));
      await rm(join(dir, STATE_FILE), { force: true });
      throw err;
    }
    throw new VmvaultError('QEMU', `${errorMessage(err)}${/--resume/.test(errorMessage(err)) ? '' : `; the VM pauses on I/O errors until it is finished: ${resumeHint(dir)}`}`, { cause: err });
  } finally {
    await Promise.all(exports.map((e) => e.close()));
  }
}

/** Finish an instant restore whose vmvault (and so its export) died: see the file comment. */
export async function resumeInstantRestore(repo: Repository, to: string, opts: { onProgress?: ProgressFn } = {}): Promise<InstantRestoreResult> {
  const started = Date.now();
  const dir = resolve(to);
  const state = await readState(dir);
  const manifest = await repo.loadManifest(state.backupId);
  const exports: NbdExport[] = [];
  try {
    for (const d of state.disks.filter((x) => !x.pivoted)) exports.push(await exportBackupDisk({ repo, backupId: state.backupId, disk: d.name, listen: `unix:${d.socket}` }));
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.connect(state.qmpSocket);
    } catch (err) {
      throw new VmvaultError('QEMU', `the VM of this instant restore is not reachable on ${state.qmpSocket} (${errorMessage(err)}): if QEMU has exited, its final images in ${dir} are incomplete; restore the backup again`, { cause: err });
    }
    try {
      const jobs = await qmp.execute<{ id: string; status: string; error?: string }[]>('query-jobs');
      for (const d of state.disks.filter((x) => !x.pivoted)) {
        const job = jobs.find((j) => j.id === d.job);
        if (job?.status === 'concluded') await qmp.execute('job-dismiss', { id: d.job });
        if (job && job.status !== 'concluded') continue; // Running or paused: revive() wakes it.
        if (await pivotedAlready(qmp, d)) {
          await dropSource(qmp, d);
          d.pivoted = true;
          await writeState(dir, state);
        } else {
          await startMirror(qmp, d, state.rate);
        }
      }
      await revive(qmp, state.disks);
      await finish(qmp, state, dir, opts.onProgress);
    } finally {
      await qmp.close();
    }
  } finally {
    await Promise.all(exports.map((e) => e.close()));
  }
  return result(state, manifest, dir, 0, started);
}

function result(state: InstantState, m: Manifest, dir: string, runningAfter: number, started: number): InstantRestoreResult {
  return {
    backup: m.id, vm: m.vm, directory: dir, disks: state.disks.map((d) => ({ name: d.name, path: d.target, format: d.format })),
    qmpSocket: state.userQmpSocket ?? state.qmpSocket, runningAfter, seconds: (Date.now() - started) / 1000,
  };
}

async function finish(qmp: QmpClient, state: InstantState, dir: string, onProgress?: ProgressFn): Promise<void> {
  await copyAndPivot(qmp, state.disks, resumeHint(dir), onProgress, async (d) => {
    d.pivoted = true;
    await writeState(dir, state);
  });
  for (const d of state.disks) await rm(d.overlay, { force: true });
  await rm(join(dir, STATE_FILE), { force: true });
}

function plan(m: Manifest, dir: string, req: InstantRestoreRequest): InstantState {
  const qmpSocket = 'start' in req.vm ? join(dir, '.vmvault-qmp.sock') : resolve(req.vm.qmp);
  const disks: InstantDisk[] = m.disks.map((d, i) => {
    const format = req.format ?? (d.format === 'raw' ? 'raw' : 'qcow2');
    const target = pathInside(dir, `${d.name}.${FORMAT_EXT[format]}`, 'disk name');
    return {
      name: d.name, size: d.virtualSize, format, pivoted: false,
      socket: join(dir, `.vv${i}.nbd.sock`),
      overlay: join(dir, `.${d.name}.overlay.qcow2`), // The disk name was checked just above.
      target,
      ...nodeNames(i),
    };
  });
  const state: InstantState = {
    version: 1, backupId: m.id, vm: m.vm, qmpSocket, rate: req.rate ?? 0, disks,
    ...('start' in req.vm ? { userQmpSocket: join(dir, 'qmp.sock'), pidFile: join(dir, 'qemu.pid') } : {}),
  };
  for (const s of [qmpSocket, state.userQmpSocket ?? '', ...disks.map((d) => d.socket)]) {
    if (Buffer.byteLength(s) > MAX_SOCKET_PATH) throw new VmvaultError('BAD_INPUT', `${dir} is too long a path for the unix sockets an instant restore puts in it (${s} has ${Buffer.byteLength(s)} bytes, at most ${MAX_SOCKET_PATH}): choose a shorter directory`);
  }
  return state;
}

/** The overlay (vmvault's own file; its backing is given to QEMU by node, never read from it) and the empty final image. */
async function prepareImages(d: InstantDisk, force: boolean): Promise<void> {
  if (force) await rm(d.target, { force: true });
  await rm(d.overlay, { force: true });
  const backing = `json:${JSON.stringify({ driver: 'nbd', server: { type: 'unix', path: d.socket }, export: d.name })}`;
  const timeoutMs = toolTimeoutMs('metadata');
  const r = await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F', 'raw', d.overlay, String(d.size)], { timeoutMs }).catch((err: unknown) => {
    if (!(err instanceof ToolTimeout)) throw err;
    throw new VmvaultError('QEMU', `qemu-img create did not make the overlay ${d.overlay} within ${boundText(timeoutMs)}: check that its directory is on storage that answers`, { cause: err });
  });
  if (r.exitCode !== 0) throw new VmvaultError('QEMU', `could not create the overlay ${d.overlay}: ${stderrText(r.stderr)}`);
  await chmod(d.overlay, 0o600);
  await createImage(d.target, d.format, d.size);
  await chmod(d.target, 0o600);
}

async function writeConfigs(m: Manifest, state: InstantState, dir: string, force: boolean): Promise<void> {
  const planned = state.disks.map((d) => ({ kind: 'disk' as const, name: d.name, path: d.target, format: d.format, disk: m.disks.find((x) => x.name === d.name)! }));
  for (const c of m.configs) {
    const path = pathInside(dir, c.name, 'config file name');
    if (!force && await exists(path)) throw new VmvaultError('ALREADY_EXISTS', `${path} already exists: choose another directory or pass --force to replace it`);
    await writeFile(path, adjustConfig(c.name, Buffer.from(c.data, 'base64'), planned), { mode: 0o600 });
  }
}

/** Memory (MiB) and vCPUs from a libvirt domain among the configuration files, if any. */
function sizing(m: Manifest): { memoryMiB?: number; cpus?: number } {
  for (const c of m.configs) {
    const xml = Buffer.from(c.data, 'base64').toString('utf8');
    if (!/<domain[\s>]/.test(xml)) continue;
    const mem = /<memory(?:\s+unit=['"](\w+)['"])?\s*>(\d+)<\/memory>/.exec(xml);
    const unit = { b: 1 / 1024 ** 2, bytes: 1 / 1024 ** 2, kib: 1 / 1024, k: 1 / 1024, mib: 1, m: 1, gib: 1024, g: 1024 }[(mem?.[1] ?? 'KiB').toLowerCase()] ?? 1 / 1024;
    const cpus = /<vcpu[^>]*>(\d+)<\/vcpu>/.exec(xml);
    return { ...(mem ? { memoryMiB: Math.max(16, Math.round(Number(mem[2]) * unit)) } : {}), ...(cpus ? { cpus: Number(cpus[1]) } : {}) };
  }
  return {};
}

/**
 * The serial log, made here, readable by its owner only, before QEMU opens it: QEMU
 * would create it under the umask (readable by all, in a directory that existed
 * before), or follow a symbolic link left at its name. What was there is removed, not
 * followed.
 */
async function makeSerialLog(dir: string): Promise<string> {
  const file = join(dir, 'serial.log');
  await rm(file, { force: true });
  await (await open(file, 'wx', 0o600)).close();
  return file;
}

async function startQemu(state: InstantState, m: Manifest, dir: string, o: StartOptions): Promise<QmpClient> {
  const fromConfig = sizing(m);
  const serialLog = await makeSerialLog(dir);
  const args = [
    '-name', `vmvault-restore-${m.vm.replace(/[^A-Za-z0-9_.-]/g, '_')}`,
    '-machine', o.machine ?? 'pc,accel=kvm:tcg', '-m', String(o.memoryMiB ?? fromConfig.memoryMiB ?? 512), '-smp', String(o.cpus ?? fromConfig.cpus ?? 1),
    '-nodefaults', '-no-user-config', '-display', 'none',
    '-qmp', `unix:${state.userQmpSocket},server=on,wait=off`, '-qmp', `unix:${state.qmpSocket},server=on,wait=off`,
    '-serial', `file:${serialLog}`, '-daemonize', '-pidfile', state.pidFile!,
  ];
  state.disks.forEach((d, i) => {
    for (const node of sourceNodes(d)) args.push('-blockdev', JSON.stringify(node));
    args.push('-device', JSON.stringify(deviceOptions(d, i === 0 ? 0 : undefined)));
  });
  // -daemonize: the command returns once the machine is set up (its disks opened through
  // the exports of this process). One that never does is stopped, and so is the QEMU it
  // forked. Its stderr goes straight to a file (a descriptor, not a pipe): that QEMU would
  // hold a pipe open, and a wait for the pipe's end would never finish.
  const timeoutMs = toolTimeoutMs('vm-start');
  const log = join(dir, '.qemu-start.log');
  const logFile = await open(log, 'w', 0o600);
  let r: { code: number | null; timedOut: boolean; error?: NodeJS.ErrnoException };
  try {
    const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', logFile.fd], env: toolEnv() });
    r = await new Promise((resolve) => {
      let timedOut = false;
      const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, timeoutMs);
      child.once('error', (error) => { clearTimeout(timer); resolve({ code: null, timedOut, error }); });
      child.once('exit', (code) => { clearTimeout(timer); resolve({ code, timedOut }); });
    });
  } finally {
    await logFile.close();
  }
  const stderr = await readFile(log, 'utf8').catch(() => '');
  const said = stderrText(stderr);
  await rm(log, { force: true });
  if (r.timedOut) {
    const stopped = await stopStarted(state.pidFile!);
    throw new VmvaultError('QEMU', `QEMU did not finish starting within ${boundText(timeoutMs)} and was stopped${stopped.length ? ` (and the QEMU it had forked, pid ${stopped.join(', ')})` : ''}` +
      `${stderr.trim() ? `; it said: ${said}` : ''}. Check the host's load and the backup's disks (vmvault export); nothing of the restore was kept`);
  }
  if (r.error) {
    throw new VmvaultError('QEMU', r.error.code === 'ENOENT'
      ? 'qemu-system-x86_64 is not installed: install qemu-system-x86, or give the disks to a running QEMU with --qmp'
      : `qemu-system-x86_64 could not be run: ${r.error.message}`, { cause: r.error });
  }
  if (r.code !== 0) throw new VmvaultError('QEMU', `QEMU did not start: ${said}`);
  return QmpClient.connect(state.qmpSocket);
}

/**
 * Kills (SIGKILL: no guest code has run) every process of this user started with
 * `-pidfile PIDFILE`: the QEMU a stopped -daemonize forked, which may not have written
 * that file yet. Their pids.
 */
async function stopStarted(pidFile: string): Promise<number[]> {
  const killed: number[] = [];
  for (const { pid } of await ownProcesses((args) => args.some((a, i) => a === pidFile && args[i - 1] === '-pidfile'))) {
    try {
      process.kill(pid, 'SIGKILL');
      killed.push(pid);
    } catch {
      // Gone meanwhile.
    }
  }
  return killed;
}

async function attach(socket: string, state: InstantState): Promise<QmpClient> {
  const qmp = await QmpClient.connect(socket);
  try {
    for (const d of state.disks) {
      await addNodes(qmp, sourceNodes(d));
      await qmp.execute('device_add', deviceOptions(d));
    }
    return qmp;
  } catch (err) {
    await qmp.close();
    throw err;
  }
}


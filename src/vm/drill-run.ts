/**
 * One restore drill's QEMU: boots disks served over NBD in an isolated
 * qemu-system-x86_64 and decides whether the guest came up.
 *
 * Isolation: `-nodefaults` (no NIC, no default devices), no network at all unless the
 * probe is a TCP port, and then only a user-mode network with `restrict=on` (the guest
 * reaches nothing outside) whose one forwarded port listens on 127.0.0.1. The NBD
 * disks are opened read-only; every guest write goes to a throwaway qcow2 overlay per
 * disk in the work directory (vmvault's own file: its backing is given to QEMU by node
 * name, never read from the file), removed at the end.
 *
 * Whatever the outcome, a screenshot of the console (QMP screendump, PPM) and the
 * serial log are kept in the work directory, and QEMU is stopped (quit, then SIGKILL).
 */
import { execa } from 'execa';
import { existsSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmvaultError } from '../errors.js';
import { toolEnv } from '../tool-env.js';
import { runTool, stderrText, ToolTimeout } from '../disk/qemu-run.js';
import { boundText, toolTimeoutMs } from '../disk/tool-timeouts.js';
import { GuestAgent } from './guest-agent.js';
import { QmpClient } from './qmp.js';

/** How a drill decides the guest is up. */
export type DrillProbe =
  | { kind: 'serial'; text: string }
  | { kind: 'guest-agent' }
  | { kind: 'tcp'; port: number };

export interface DrillDisk {
  /** `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`. */
  uri: string;
  /** Virtual size in bytes (the overlay's size). */
  size: number;
  /** Guest bus (default virtio). */
  bus?: 'virtio' | 'ide';
}

export interface DrillRunOptions {
  /** The first disk boots. */
  disks: DrillDisk[];
  probe: DrillProbe;
  timeoutMs: number;
  /** Where the overlays and sockets go (short: unix socket paths); emptied of them at the end. */
  workDir: string;
  /** What is kept: the serial console's log and the console's screenshot (PPM). */
  serialLog: string;
  screenshot: string;
  memoryMiB?: number;
  /** Default `pc,accel=kvm:tcg`. */
  machine?: string;
  /** Where a TCP probe's host port comes from: default a free port of 127.0.0.1, asked again when QEMU could not bind it. */
  hostPort?: () => Promise<number>;
}

export interface DrillOutcome {
  ok: boolean;
  /** Why it failed. */
  reason?: string;
  /** Description of the probe, e.g. `serial "login:"`. */
  probe: string;
  serialLog: string;
  /** Absent when QEMU could not take one (it had exited). */
  screenshot?: string;
  seconds: number;
}

export function describeProbe(p: DrillProbe): string {
  return p.kind === 'serial' ? `serial ${JSON.stringify(p.text)}` : p.kind === 'tcp' ? `tcp ${p.port}` : 'guest-ping';
}

/** The blockdev options of an NBD URI (only the two forms an export hands out). */
export function nbdBlockdev(uri: string, nodeName: string): Record<string, unknown> {
  const unix = /^nbd\+unix:\/\/\/([^?]*)\?socket=(\/.+)$/.exec(uri);
  if (unix) return { driver: 'nbd', 'node-name': nodeName, server: { type: 'unix', path: unix[2] }, export: decodeURIComponent(unix[1]!), 'read-only': true };
  const tcp = /^nbd:\/\/(\[[0-9a-fA-F:.]+\]|[^:/]+):(\d+)\/(.*)$/.exec(uri);
  if (tcp) return { driver: 'nbd', 'node-name': nodeName, server: { type: 'inet', host: tcp[1]!.replace(/^\[|\]$/g, ''), port: tcp[2] }, export: decodeURIComponent(tcp[3]!), 'read-only': true };
  throw new VmvaultError('BAD_INPUT', `${uri} is not an NBD URI a drill can use: expected nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME`);
}

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function qemuArgs(o: DrillRunOptions, paths: { qmp: string; serial: string; qga: string; overlays: string[] }, hostPort?: number): string[] {
  const args = [
    '-name', 'vmvault-drill', '-machine', o.machine ?? 'pc,accel=kvm:tcg', '-m', String(o.memoryMiB ?? 256),
    '-nodefaults', '-no-user-config', '-vga', 'std', '-display', 'none',
    '-qmp', `unix:${paths.qmp},server=on,wait=off`,
    '-chardev', `file,id=serial0,path=${paths.serial}`, '-serial', 'chardev:serial0',
  ];
  if (o.probe.kind === 'tcp') {
    args.push('-netdev', `user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:${hostPort}-:${o.probe.port}`, '-device', 'e1000,netdev=net0');
  }
  if (o.probe.kind === 'guest-agent') {
    args.push('-device', 'virtio-serial-pci,id=vser0', '-chardev', `socket,id=qga0,path=${paths.qga},server=on,wait=off`,
      '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0');
  }
  o.disks.forEach((d, i) => {
    args.push('-blockdev', JSON.stringify(nbdBlockdev(d.uri, `d${i}-nbd`)));
    args.push('-blockdev', JSON.stringify({ driver: 'raw', 'node-name': `d${i}-src`, file: `d${i}-nbd`, 'read-only': true }));
    args.push('-blockdev', JSON.stringify({ driver: 'file', 'node-name': `d${i}-ovf`, filename: paths.overlays[i] }));
    args.push('-blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': `d${i}-ovl`, file: `d${i}-ovf`, backing: `d${i}-src` }));
    const device = d.bus === 'ide' ? 'ide-hd' : 'virtio-blk-pci';
    args.push('-device', JSON.stringify({ driver: device, drive: `d${i}-ovl`, id: `disk${i}`, ...(i === 0 ? { bootindex: 0 } : {}) }));
  });
  return args;
}

/** Boots the disks and probes until success, QEMU's exit or the timeout. Throws only when QEMU cannot be started at all. */
export async function runDrill(o: DrillRunOptions): Promise<DrillOutcome> {
  if (!o.disks.length) throw new VmvaultError('BAD_INPUT', 'a drill needs at least one disk');
  const started = Date.now();
  const paths = {
    qmp: join(o.workDir, 'qmp.sock'), qga: join(o.workDir, 'qga.sock'), serial: o.serialLog,
    overlays: o.disks.map((_, i) => join(o.workDir, `.overlay${i}.qcow2`)),
  };
  const screenshot = o.screenshot;
  await Promise.all([rm(screenshot, { force: true }), rm(paths.serial, { force: true })]);
  for (const [i, d] of o.disks.entries()) {
    const timeoutMs = toolTimeoutMs('metadata');
    const r = await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', paths.overlays[i]!, String(d.size)], { timeoutMs }).catch((err: unknown) => {
      if (!(err instanceof ToolTimeout)) throw err;
      throw new VmvaultError('QEMU', `qemu-img create did not make the drill's overlay ${paths.overlays[i]} within ${boundText(timeoutMs)}: ` +
        `check that the drill's work directory ${o.workDir} is on storage that answers`, { cause: err });
    });
    if (r.exitCode !== 0) throw new VmvaultError('QEMU', `could not create the drill's overlay ${paths.overlays[i]}: ${stderrText(r.stderr)}`);
  }
  const removeFiles = () => Promise.all([paths.qmp, paths.qga, ...paths.overlays].map((p) => rm(p, { force: true })));
  const { proc, done, qmp, hostPort, exited } = await startQemu(o, paths).catch(async (err: unknown) => {
    await removeFiles();
    throw err;
  });
  try {
    const reason = await probe(o, paths, hostPort, exited, started);
    const shot = await qmp.execute('screendump', { filename: screenshot }).then(() => screenshot, () => undefined);
    const outcome: DrillOutcome = {
      ok: reason === undefined, probe: describeProbe(o.probe), serialLog: paths.serial,
      ...(reason !== undefined ? { reason } : {}), ...(shot && existsSync(shot) ? { screenshot: shot } : {}),
      seconds: (Date.now() - started) / 1000,
    };
    return outcome;
  } finally {
    await qmp.execute('quit').catch(() => undefined);
    qmp.close();
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await done;
    clearTimeout(timer);
    await removeFiles();
  }
}

/** How QEMU ended: its exit code or the signal that ended it, or that it could not be run at all. */
type Exit = { code?: number; signal?: string; notFound?: boolean; stderr: string };

/**
 * Starts QEMU and connects to its QMP socket. A TCP probe's host port is found free
 * and then bound by QEMU a moment later: when another process took it in between,
 * QEMU exits at once, and is started again on another port (three tries).
 */
async function startQemu(o: DrillRunOptions, paths: Parameters<typeof qemuArgs>[1]) {
  for (let attempt = 1; ; attempt++) {
    const hostPort = o.probe.kind === 'tcp' ? await (o.hostPort ?? freePort)() : undefined;
    // The guest is untrusted: its QEMU gets none of vmvault's secrets (tool-env.ts).
    const proc = execa('qemu-system-x86_64', qemuArgs(o, paths, hostPort), { reject: false, stdin: 'ignore', stdout: 'ignore', stderr: 'pipe', encoding: 'utf8', cleanup: true, env: toolEnv(), extendEnv: false });
    let gone: Exit | undefined;
    const exited = () => gone;
    const done = proc.then((r) => {
      gone = {
        ...(r.exitCode !== undefined ? { code: r.exitCode } : {}), ...(r.signal ? { signal: r.signal } : {}),
        ...((r as { code?: string }).code === 'ENOENT' ? { notFound: true } : {}), stderr: stderrText(String(r.stderr ?? '')),
      };
    });
    const qmp = await connectQmp(paths.qmp, exited);
    if (qmp) return { proc, done, qmp, hostPort, exited };
    const running = !exited();
    proc.kill('SIGKILL'); // no QMP socket in 10 s and still running: it will not come
    await done;
    await rm(paths.qmp, { force: true });
    const end = gone as Exit | undefined;
    if (end?.notFound) throw new VmvaultError('QEMU', 'qemu-system-x86_64 could not be run: install qemu-system-x86');
    if (running) throw new VmvaultError('QEMU', `QEMU did not open its QMP socket within 10 s and was stopped${end?.stderr ? `: ${end.stderr}` : ''}`);
    if (hostPort !== undefined && attempt < 3 && /host forwarding/i.test(end?.stderr ?? '')) continue;
    throw new VmvaultError('QEMU', `QEMU did not start for the drill: ${end?.stderr || (end?.signal ? `killed by ${end.signal}` : `exit ${end?.code}`)}`);
  }
}

async function connectQmp(socket: string, exited: () => unknown): Promise<QmpClient | undefined> {
  for (let i = 0; i < 200 && !exited(); i++) {
    if (existsSync(socket)) {
      try {
        return await QmpClient.connect(socket, { timeoutMs: 5000 });
      } catch {
        /* not listening yet */
      }
    }
    await sleep(50);
  }
  return undefined;
}

/** Undefined when the probe succeeded; otherwise why not. */
async function probe(o: DrillRunOptions, paths: { serial: string; qga: string }, hostPort: number | undefined, exited: () => Exit | undefined, started: number): Promise<string | undefined> {
  const deadline = started + o.timeoutMs;
  const seconds = Math.round(o.timeoutMs / 1000);
  while (Date.now() < deadline) {
    if (await once(o.probe, paths, hostPort)) return undefined;
    const gone = exited();
    if (gone) return `QEMU exited (${gone.stderr || `exit ${gone.code}`}) before the probe (${describeProbe(o.probe)}) succeeded`;
    await sleep(250);
  }
  switch (o.probe.kind) {
    case 'serial': return `${JSON.stringify(o.probe.text)} did not appear on the serial console within ${seconds} s`;
    case 'guest-agent': return `the guest agent did not answer guest-ping within ${seconds} s`;
    case 'tcp': return `nothing answered on guest TCP port ${o.probe.port} within ${seconds} s`;
  }
}

async function once(p: DrillProbe, paths: { serial: string; qga: string }, hostPort: number | undefined): Promise<boolean> {
  try {
    if (p.kind === 'serial') return (await readFile(paths.serial, 'utf8')).includes(p.text);
    if (p.kind === 'guest-agent') {
      const agent = await GuestAgent.connect(paths.qga, 1000);
      try {
        await agent.ping(1000);
        return true;
      } finally {
        agent.close();
      }
    }
    return await tcpAnswers(hostPort!);
  } catch {
    return false; // Not yet: the next round tries again.
  }
}

/**
 * User-mode networking accepts the host side of a forwarded port at once, whether or
 * not anything listens in the guest, and keeps it open while the guest stays silent: a
 * connection proves nothing, an answer does. The port answers when the guest sends a
 * byte within 5 s; a service that waits for the client (HTTP) is sent "\r\n" after 1 s
 * of silence, which such servers answer with an error, and that counts.
 */
function tcpAnswers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection({ host: '127.0.0.1', port });
    const timers: NodeJS.Timeout[] = [];
    const finish = (ok: boolean) => { timers.forEach(clearTimeout); s.destroy(); resolve(ok); };
    s.once('connect', () => {
      timers.push(setTimeout(() => s.write('\r\n'), 1000), setTimeout(() => finish(false), 5000));
    });
    s.once('data', () => finish(true));
    s.once('close', () => finish(false));
    s.once('error', () => finish(false));
  });
}

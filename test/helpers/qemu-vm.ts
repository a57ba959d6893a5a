/**
 * A real running VM for tests: qemu-system-x86_64 under software emulation (TCG),
 * no guest OS, its disks attached as virtio-blk devices so they are real guest block
 * devices. A QMP monitor allows one client at a time, so the VM gets two: `qmpSocket`
 * for the code under test and a private one the harness uses to write into the disks
 * (HMP `qemu-io -d DEVICE`, which goes through the guest's view: the active layer,
 * whatever overlay is on top) and to inspect the VM.
 */
import { execa } from 'execa';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../../src/vm/qmp.js';

export interface TestVm {
  /** The QMP socket for the code under test. */
  qmpSocket: string;
  /** With `guestAgent`: the host side of a guest-agent channel (no agent answers: there is no guest OS). */
  guestAgentSocket?: string;
  pid: number;
  /** Guest device ids, one per disk, in order (`vd0`, `vd1`, …). */
  devices: string[];
  /** The harness's own QMP connection (the second monitor). */
  qmp: QmpClient;
  /** `write -P pattern offset length` on disk `index`, as the guest would write it. */
  write(index: number, offset: number, length: number, pattern: number): Promise<void>;
  /** Throws unless disk `index` reads `pattern` over the range, as the guest sees it. */
  expect(index: number, offset: number, length: number, pattern: number): Promise<void>;
  /** Run-state from query-status (`running`, `paused`, `prelaunch`…). */
  status(): Promise<string>;
  /** The active layer's file of each disk, from query-block. */
  activeFiles(): Promise<string[]>;
  /** Quits QEMU (QMP quit: a clean exit, which stores persistent bitmaps) and removes its sockets. */
  stop(): Promise<void>;
  /** Kills QEMU with SIGKILL (no clean exit), then cleans up as `stop` does. */
  kill(): Promise<void>;
}

export interface TestVmOptions {
  /** Format of each disk (default qcow2). */
  formats?: string[];
  /** Leave the VM paused in prelaunch (default: it runs, with nothing to boot). */
  paused?: boolean;
  /** Add a virtio-serial guest-agent channel on a socket. */
  guestAgent?: boolean;
}

const hex = (n: number) => `0x${n.toString(16).padStart(2, '0')}`;

/** Start a VM with `disks` (image paths) attached; resolves once both monitors answer. */
export async function startTestVm(disks: string[], opts: TestVmOptions = {}): Promise<TestVm> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir().length <= 60 ? os.tmpdir() : '/tmp', 'vmvault-vm-'));
  const qmpSocket = path.join(dir, 'qmp.sock');
  const harnessSocket = path.join(dir, 'harness.sock');
  const devices = disks.map((_, i) => `vd${i}`);
  const args = [
    '-machine', 'q35,accel=tcg', '-nodefaults', '-no-user-config', '-display', 'none', '-m', '64', '-S',
    '-qmp', `unix:${qmpSocket},server=on,wait=off`, '-qmp', `unix:${harnessSocket},server=on,wait=off`,
  ];
  const guestAgentSocket = opts.guestAgent ? path.join(dir, 'qga.sock') : undefined;
  if (guestAgentSocket) {
    args.push('-device', 'virtio-serial-pci,id=ser0', '-chardev', `socket,path=${guestAgentSocket},server=on,wait=off,id=qga0`,
      '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0');
  }
  disks.forEach((file, i) => {
    const format = opts.formats?.[i] ?? 'qcow2';
    args.push('-blockdev', `driver=file,filename=${file.replaceAll(',', ',,')},node-name=file${i}`);
    args.push('-blockdev', `driver=${format},file=file${i},node-name=disk${i}`);
    args.push('-device', `virtio-blk-pci,drive=disk${i},id=${devices[i]}`);
  });
  // HMP qemu-io prints to QEMU's stdout, not to the monitor: line-buffer it (stdbuf) and read it here.
  const proc = execa('stdbuf', ['-oL', 'qemu-system-x86_64', ...args], { reject: false, stdin: 'ignore', cleanup: true, buffer: false, stderr: 'pipe' });
  let stdout = '';
  let stderr = '';
  proc.stdout?.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
  proc.stderr?.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
  let exited = false;
  void proc.then(() => { exited = true; });
  const deadline = Date.now() + 20_000;
  while (!(existsSync(qmpSocket) && existsSync(harnessSocket))) {
    if (exited) throw new Error(`qemu-system-x86_64 exited: ${stderr}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error('qemu-system-x86_64 did not create its QMP sockets within 20 s');
    }
    await sleep(20);
  }
  // QEMU binds its sockets a moment before it listens on them: connection refused means "not yet".
  // Whatever fails from here on, the VM must not outlive it: a stray QEMU keeps the test process alive.
  let qmp: QmpClient;
  try {
    for (;;) {
      try {
        qmp = await QmpClient.connect(harnessSocket);
        break;
      } catch (err) {
        if (exited || Date.now() > deadline || !/connection refused/.test(String((err as Error).message))) throw err;
        await sleep(20);
      }
    }
    if (!opts.paused) await qmp.execute('cont');
  } catch (err) {
    proc.kill('SIGKILL');
    await proc;
    await fs.rm(dir, { recursive: true, force: true });
    throw err;
  }

  const io = async (index: number, command: string) => {
    const from = stdout.length;
    // virtio-blk-pci is a proxy: the block backend belongs to its virtio-backend child.
    const said = await qmp.hmp(`qemu-io -d /machine/peripheral/${devices[index]}/virtio-backend "${command}"`);
    // The command has run when HMP replies; its last line ("read/wrote N/N bytes…") may still be in the pipe.
    const until = Date.now() + 5000;
    while (!/^(?:read|wrote) \d+\/\d+ bytes|error|fail/im.test(stdout.slice(from)) && Date.now() < until) await sleep(5);
    const out = said + stdout.slice(from);
    if (!/^(?:read|wrote) \d+\/\d+ bytes/m.test(out) || /error|fail|mismatch/i.test(out)) {
      throw new Error(`qemu-io ${command} on ${devices[index]}: ${out.trim() || '(no output)'}`);
    }
    return out;
  };
  let stopped: Promise<void> | undefined;
  const stop = () => (stopped ??= (async () => {
    await qmp.execute('quit').catch(() => {});
    await qmp.close();
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await proc;
    clearTimeout(timer);
    await fs.rm(dir, { recursive: true, force: true });
  })());
  return {
    qmpSocket, ...(guestAgentSocket ? { guestAgentSocket } : {}), pid: proc.pid!, devices, qmp,
    write: async (index, offset, length, pattern) => { await io(index, `write -P ${hex(pattern)} ${offset} ${length}`); },
    expect: async (index, offset, length, pattern) => { await io(index, `read -P ${hex(pattern)} ${offset} ${length}`); },
    status: async () => (await qmp.execute<{ status: string }>('query-status')).status,
    activeFiles: async () => {
      const blocks = await qmp.execute<{ qdev?: string; inserted?: { file: string } }[]>('query-block');
      return devices.map((d) => blocks.find((b) => b.qdev?.includes(`/${d}/`) || b.qdev === d)?.inserted?.file ?? '');
    },
    stop,
    kill: async () => {
      if (!exited) proc.kill('SIGKILL');
      await proc;
      await stop();
    },
  };
}

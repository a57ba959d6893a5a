/**
 * A real, private libvirt daemon for tests: `libvirtd` in session mode, run as the
 * unprivileged user `nobody` in a temporary directory (the privileged daemon would need
 * libvirt's system user, /etc configuration and systemd). `LIBVIRT_DEFAULT_URI` points
 * every `virsh` of this process, and so the libvirt driver, at it; QEMU runs as
 * `nobody` under software emulation, so the images it opens live in `imageDir`,
 * owned by `nobody` (`own()`).
 */
import { execa, type ResultPromise } from 'execa';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { waitFor } from './procs.js';

export interface TestLibvirt {
  uri: string;
  /** A directory QEMU (as nobody) may read and write. */
  imageDir: string;
  /** Hands a file or directory to the user QEMU runs as. */
  own(file: string): Promise<void>;
  /** virsh against this daemon; throws with virsh's words on failure. */
  virsh(...args: string[]): Promise<string>;
  /** The pid of the QEMU running `domain`. */
  qemuPid(domain: string): Promise<number>;
  stop(): Promise<void>;
}

/** Why libvirt cannot be tested here, or undefined when it can. */
export function libvirtMissing(): string | undefined {
  const missing = ['/usr/bin/virsh', '/usr/sbin/libvirtd'].filter((f) => !existsSync(f));
  return missing.length ? `${missing.join(' and ')} not installed (apt-get install libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu)` : undefined;
}

export async function startLibvirt(): Promise<TestLibvirt> {
  const uid = Number((await execa('id', ['-u', 'nobody'])).stdout);
  const gid = Number((await execa('id', ['-g', 'nobody'])).stdout);
  // Short: the daemon's sockets live under it (unix socket paths are limited to 108 bytes).
  const base = await fs.mkdtemp('/tmp/vv-lv-');
  const dirs = ['run', 'config', 'cache', 'home', 'images'].map((d) => path.join(base, d));
  for (const d of dirs) await fs.mkdir(d);
  for (const d of [base, ...dirs]) await fs.chown(d, uid, gid);
  await fs.chmod(base, 0o755);
  const [run, config, cache, home, imageDir] = dirs as [string, string, string, string, string];
  const socket = path.join(run, 'libvirt', 'libvirt-sock');
  const daemon: ResultPromise = execa('setpriv', [`--reuid=${uid}`, `--regid=${gid}`, '--clear-groups', 'libvirtd'], {
    env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', HOME: home, XDG_RUNTIME_DIR: run, XDG_CONFIG_HOME: config, XDG_CACHE_HOME: cache },
    extendEnv: false, reject: false, stdin: 'ignore', all: true,
  });
  let said = '';
  daemon.all?.on('data', (d: Buffer) => { said += d.toString(); });
  const uri = `qemu:///session?socket=${socket}`;
  process.env.LIBVIRT_DEFAULT_URI = uri;
  const virsh = async (...args: string[]): Promise<string> => {
    const r = await execa('virsh', args, { reject: false, stdin: 'ignore' });
    if (r.exitCode !== 0) throw new Error(`virsh ${args.join(' ')}: ${r.stderr.trim()}`);
    return r.stdout;
  };
  await waitFor('libvirtd to answer', async () => (await execa('virsh', ['version'], { reject: false })).exitCode === 0, 30_000, () => said.slice(-2000), 200);
  return {
    uri, imageDir, virsh,
    own: (file) => fs.chown(file, uid, gid),
    qemuPid: async (domain) => Number((await fs.readFile(path.join(run, 'libvirt', 'qemu', 'run', `${domain}.pid`), 'utf8')).trim()),
    stop: async () => {
      const names = (await virsh('list', '--all', '--name').catch(() => '')).split('\n').map((n) => n.trim()).filter(Boolean);
      for (const n of names) {
        await execa('virsh', ['destroy', n], { reject: false });
        await execa('virsh', ['undefine', n, '--checkpoints-metadata'], { reject: false });
      }
      daemon.kill('SIGTERM');
      await daemon;
      if (process.env.LIBVIRT_DEFAULT_URI === uri) delete process.env.LIBVIRT_DEFAULT_URI;
      await fs.rm(base, { recursive: true, force: true });
    },
  };
}

/** A persistent domain (so it can be started again after a stop or a kill) with qcow2 disks vda, vdb…, started paused. */
export async function defineDomain(lv: TestLibvirt, name: string, disks: { path: string; format: string }[]): Promise<string> {
  const devs = disks.map((d, i) => `<disk type='file' device='disk'><driver name='qemu' type='${d.format}'/><source file='${d.path}'/><target dev='vd${String.fromCharCode(97 + i)}' bus='virtio'/></disk>`);
  const xml = `<domain type='qemu'><name>${name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>${devs.join('')}</devices></domain>`;
  const file = path.join(lv.imageDir, `${name}.xml`);
  await fs.writeFile(file, xml);
  await lv.virsh('define', file);
  await lv.virsh('start', name, '--paused');
  return xml;
}

/**
 * A write through the guest's virtio device (HMP qemu-io on the device; the guest's
 * view), then a flush, as a guest's fsync would (a killed QEMU loses unflushed qcow2
 * metadata). HMP qemu-io prints to QEMU's stdout, not to the monitor: the tests check
 * the data by restoring it.
 */
export async function guestWrite(lv: TestLibvirt, domain: string, disk: number, offset: number, length: number, pattern: number): Promise<void> {
  for (const cmd of [`write -P ${pattern} ${offset} ${length}`, 'flush']) {
    await lv.virsh('qemu-monitor-command', domain, '--hmp', `qemu-io -d /machine/peripheral/virtio-disk${disk}/virtio-backend "${cmd}"`);
  }
}

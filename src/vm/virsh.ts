/** Running `virsh` for the libvirt driver, with errors an operator can act on. */
import { execa } from 'execa';
import { NotFoundError, VmvaultError } from '../errors.js';
import { toolEnv } from '../tool-env.js';

let available: Promise<boolean> | undefined;
/** True when `virsh` can be run here. */
export function virshAvailable(): Promise<boolean> {
  available ??= execa('virsh', ['--version'], { reject: false, stdin: 'ignore', env: toolEnv(), extendEnv: false }).then((r) => r.exitCode === 0, () => false);
  return available;
}

/** Runs `virsh ARGS` about `domain` and returns its stdout; NotFoundError for an unknown domain, QEMU otherwise. */
export async function virsh(args: string[], domain: string): Promise<string> {
  const r = await execa('virsh', args, { reject: false, stdin: 'ignore', encoding: 'utf8', env: toolEnv(), extendEnv: false });
  if (r.exitCode === undefined) {
    throw new VmvaultError('UNSUPPORTED', `the libvirt driver needs virsh, which ${(r.cause as NodeJS.ErrnoException | undefined)?.code === 'ENOENT' ? 'is not installed (install libvirt-clients)' : `could not be run: ${r.shortMessage}`}`);
  }
  if (r.exitCode !== 0) {
    const said = r.stderr.trim().replace(/\s+/g, ' ');
    if (/failed to get domain|Domain not found/i.test(said)) throw new NotFoundError(`libvirt has no domain "${domain}" (virsh: ${said}): check the VM's name in the inventory`);
    throw new VmvaultError('QEMU', `virsh ${args[0]} on domain "${domain}" failed: ${said || `exit ${r.exitCode}`}`);
  }
  return r.stdout;
}

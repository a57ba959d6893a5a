/** Running `virsh` for the libvirt driver, with errors an operator can act on. */
import { execa } from 'execa';
import { NotFoundError, VmvaultError } from '../errors.js';
import { toolEnv } from '../tool-env.js';
import { boundText, toolTimeoutMs, type ToolBound } from '../disk/tool-timeouts.js';

/**
 * virsh pings libvirtd every 5 s and drops the connection after 3 pings go unanswered:
 * a libvirtd that died or hangs is noticed in about 20 s instead of never.
 */
const KEEPALIVE = ['-k', '5', '-K', '3'];

/**
 * Subcommands that wait on QEMU or the guest, with their bound (tool-timeouts.ts);
 * every other one is a query. blockcommit --wait copies the overlay's data.
 */
const SLOW: Record<string, ToolBound> = {
  'backup-begin': 'virsh-job', domjobabort: 'virsh-job', 'checkpoint-delete': 'virsh-job',
  domfsfreeze: 'virsh-job', domfsthaw: 'virsh-job', blockcommit: 'virsh-commit',
};

/** virsh was stopped after its subcommand's bound. */
export class VirshTimeout extends VmvaultError {
  constructor(message: string) {
    super('QEMU', message);
    this.name = 'VirshTimeout';
  }
}

let available: Promise<boolean> | undefined;
/** True when `virsh` can be run here. */
export function virshAvailable(): Promise<boolean> {
  available ??= execa('virsh', ['--version'], { reject: false, stdin: 'ignore', timeout: toolTimeoutMs('virsh-query'), env: toolEnv(), extendEnv: false }).then((r) => r.exitCode === 0, () => false);
  return available;
}

/**
 * Runs `virsh ARGS` about `domain` and returns its stdout; NotFoundError for an unknown
 * domain, VirshTimeout when it was stopped after its subcommand's bound, QEMU otherwise.
 */
export async function virsh(args: string[], domain: string): Promise<string> {
  const bound = SLOW[args[0] ?? ''] ?? 'virsh-query';
  const timeoutMs = toolTimeoutMs(bound);
  const r = await execa('virsh', [...KEEPALIVE, ...args], { reject: false, stdin: 'ignore', encoding: 'utf8', timeout: timeoutMs, env: toolEnv(), extendEnv: false });
  if (r.timedOut) {
    const job = args[0] === 'blockcommit' ? `virsh blockjob ${domain} ${args[2] ?? ''} --info` : `virsh domjobinfo ${domain}`;
    const still = bound === 'virsh-query' ? '' : `; what it asked for may still be under way in libvirt (${job})`;
    throw new VirshTimeout(`virsh ${args[0]} on domain "${domain}" did not finish within ${boundText(timeoutMs)} and was stopped: libvirtd, ` +
      `the domain's QEMU or its guest agent is not answering. Check "virsh domstate ${domain}" and libvirtd's log${still}`);
  }
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

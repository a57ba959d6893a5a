/** `vmvault drill ID|VM`: boot a backup in an isolated QEMU and record whether it came up (vm/drill.ts). */
import type { Command } from 'commander';
import { VmvaultError } from '../../errors.js';
import { configPathFrom, loadConfig } from '../../config/load.js';
import { DEFAULT_STATE_DIR } from '../../config/schema.js';
import { DEFAULT_DRILL_MEMORY_MIB, DEFAULT_DRILL_TEXT, drillBackup, drillFailure, resolveDrillTarget, type DrillProbe } from '../../vm/drill.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { print } from '../output.js';

interface DrillFlags {
  serial?: string; guestAgent?: boolean; tcp?: string; timeout: string; stateDir?: string; config?: string;
  memory?: string; machine?: string; bus?: string; host?: string; json?: boolean;
}

/** The probe from the flags: at most one of --serial, --guest-agent, --tcp; serial "login:" by default. */
export function probeFromFlags(o: Pick<DrillFlags, 'serial' | 'guestAgent' | 'tcp'>): DrillProbe {
  const given = [o.serial !== undefined, !!o.guestAgent, o.tcp !== undefined].filter(Boolean).length;
  if (given > 1) throw new VmvaultError('BAD_INPUT', 'give one probe: --serial TEXT, --guest-agent or --tcp PORT');
  if (o.tcp !== undefined) {
    const port = Number(o.tcp);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new VmvaultError('BAD_INPUT', `--tcp ${o.tcp}: give the guest's TCP port, 1-65535`);
    return { kind: 'tcp', port };
  }
  if (o.guestAgent) return { kind: 'guest-agent' };
  if (o.serial === '') throw new VmvaultError('BAD_INPUT', '--serial needs the text to wait for on the serial console');
  return { kind: 'serial', text: o.serial ?? DEFAULT_DRILL_TEXT };
}

function positive(flag: string, text: string): number {
  const n = Number(text);
  if (!Number.isFinite(n) || n <= 0) throw new VmvaultError('BAD_INPUT', `${flag} ${text}: give a positive number`);
  return n;
}

export function registerDrillCommand(program: Command, globals: () => GlobalOptions): void {
  program
    .command('drill <idOrVm>')
    .description('boot a backup (or a VM\'s newest backup) from the repository in an isolated QEMU, without copying it, and record boot-verified or boot-failed')
    .option('--serial <text>', `succeed when the serial console shows this text (the default probe, "${DEFAULT_DRILL_TEXT}")`)
    .option('--guest-agent', 'succeed when the guest agent answers guest-ping')
    .option('--tcp <port>', 'succeed when this guest TCP port answers (user-mode network with no outside route, forwarded on 127.0.0.1)')
    .option('--timeout <seconds>', 'give up after this long', '300')
    .option('--state-dir <dir>', `where the serial log, screenshot and result are kept, under drills/<backup id>/ (default: the configuration's stateDir, else ${DEFAULT_STATE_DIR})`)
    .option('--config <file>', 'configuration file (for its stateDir; env VMVAULT_CONFIG)')
    .option('--memory <MiB>', `guest memory in MiB (default ${DEFAULT_DRILL_MEMORY_MIB})`)
    .option('--machine <type>', 'QEMU machine (default pc,accel=kvm:tcg)')
    .option('--bus <bus>', 'guest disk bus: virtio or ide (guests without virtio drivers); default: as the backup\'s libvirt XML says, else virtio')
    .option('--host <name>', 'host name recorded with the result')
    .option('--json', 'print the result as JSON')
    .action(async (idOrVm: string, o: DrillFlags) => {
      const probe = probeFromFlags(o);
      const timeoutMs = positive('--timeout', o.timeout) * 1000;
      const memoryMiB = o.memory === undefined ? undefined : Math.round(positive('--memory', o.memory));
      if (o.bus !== undefined && o.bus !== 'virtio' && o.bus !== 'ide') throw new VmvaultError('BAD_INPUT', `--bus ${o.bus}: virtio or ide`);
      const configFile = configPathFrom(o.config);
      const stateDir = o.stateDir ?? (configFile ? (await loadConfig(configFile)).stateDir : DEFAULT_STATE_DIR);
      const repo = await openRepository(globals());
      const backupId = await resolveDrillTarget(repo, idOrVm);
      const r = await drillBackup(repo, {
        backupId, probe, timeoutMs, stateDir, ...(memoryMiB ? { memoryMiB } : {}),
        ...(o.machine ? { machine: o.machine } : {}), ...(o.bus ? { bus: o.bus as 'virtio' | 'ide' } : {}), ...(o.host ? { host: o.host } : {}),
      });
      print(o.json, r, () => [
        `${r.status === 'boot-verified' ? 'boot-verified' : 'BOOT-FAILED'}: backup ${r.backup} of ${r.vm} (${r.probe}, ${r.seconds.toFixed(1)}s)${r.reason ? `: ${r.reason}` : ''}`,
        `  serial log  ${r.serialLog}`, ...(r.screenshot ? [`  screenshot  ${r.screenshot}`] : []),
      ].join('\n'));
      if (r.status === 'boot-failed') {
        process.stderr.write(`vmvault: error: ${drillFailure(r).message}\n`);
        process.exitCode = 1;
      }
    });
}

/**
 * `vmvault snapshot create|list|revert|delete`: on-demand snapshots of an inventory
 * VM on this host, e.g. before an update. The VM comes from the configuration
 * (`--config FILE` or VMVAULT_CONFIG); labels and expiry are kept in its stateDir.
 * `create --export` also backs the VM up, into the repository given by --repo (or
 * VMVAULT_REPOSITORY), else the configuration's.
 */
import type { Command } from 'commander';
import { configPathFrom, loadConfig } from '../../config/load.js';
import type { Config, VmConfig } from '../../config/schema.js';
import { VmvaultError } from '../../errors.js';
import { Repository } from '../../repo/repository.js';
import { openStorage } from '../../storage/open.js';
import {
  createSnapshot, deleteSnapshot, findVm, listSnapshots, revertSnapshot, snapshotTargetOf, type SnapshotInfo,
} from '../../vm/snapshots.js';
import { exportSnapshotBackup } from '../../vm/snapshot-export.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { table } from '../format.js';
import { print } from '../output.js';

interface Flags { config?: string; json?: boolean }

async function inventoryVm(flags: Flags, name: string): Promise<{ config: Config; vm: VmConfig }> {
  const file = configPathFrom(flags.config);
  if (!file) throw new VmvaultError('BAD_INPUT', 'no configuration: pass --config FILE or set VMVAULT_CONFIG (snapshots are taken of the VMs of its inventory)');
  const config = await loadConfig(file);
  const vm = findVm(config, name);
  if (vm.host !== config.host) {
    throw new VmvaultError('BAD_INPUT', `VM "${vm.name}" is on host "${vm.host}", not on this host ("${config.host}"): its disks are there, so run this command on ${vm.host} (or through the API)`);
  }
  return { config, vm };
}

/** The repository for --export: the global flags or environment first, then the configuration's. */
async function exportRepository(globals: GlobalOptions, config: Config): Promise<Repository> {
  if (globals.repo ?? process.env.VMVAULT_REPOSITORY) return openRepository(globals);
  if (!config.repository) throw new VmvaultError('BAD_INPUT', '--export needs a repository: pass --repo URL, set VMVAULT_REPOSITORY, or add repository: { url, passwordFile } to the configuration');
  const { repositoryFrom } = await import('../../service/service.js'); // loaded only here: it brings the whole service
  const where = await repositoryFrom(config);
  return Repository.open(openStorage(where.url), where.passphrase);
}

function line(s: SnapshotInfo): string[] {
  return [
    s.name, s.label ?? '-', s.created, s.expiresAt ?? 'never', s.vmState ? 'yes' : 'no',
    s.missingDisks.length ? `${s.disks.join(',')} (missing on ${s.missingDisks.join(',')})` : s.disks.join(','), s.backup?.slice(0, 12) ?? '-',
  ];
}

export function registerSnapshotCommands(program: Command, globals: () => GlobalOptions): void {
  const snapshot = program
    .command('snapshot')
    .description('on-demand snapshots of a VM\'s disks (qcow2 internal snapshots, all disks under one name), e.g. before an update');

  snapshot
    .command('create <vm>')
    .description('snapshot every disk of VM; with --export, also back it up labelled like the snapshot')
    .requiredOption('--name <name>', 'snapshot name (letters, digits, ".", "_", "-"; not starting with "vmvault-")')
    .option('--label <label>', 'label of the snapshot and of its exported backup', 'pre-update')
    .option('--expire-in <duration>', 'delete it automatically after this long (e.g. 7d, 12h, 30min, 2w; units y, mo, w, d, h, min)')
    .option('--export', 'also take a backup of the VM into the repository, with the label')
    .option('-c, --config <file>', 'configuration file with the VM inventory (env VMVAULT_CONFIG)')
    .option('--json', 'print the snapshot as JSON')
    .action(async (vmName: string, o: Flags & { name: string; label: string; expireIn?: string; export?: boolean }) => {
      const { config, vm } = await inventoryVm(o, vmName);
      const target = snapshotTargetOf(vm);
      const exportBackup = o.export
        ? async (label: string) => exportSnapshotBackup(await exportRepository(globals(), config), target, { label, host: config.host, configs: vm.configFiles })
        : undefined;
      const s = await createSnapshot(target, {
        name: o.name, label: o.label, ...(o.expireIn !== undefined ? { expireIn: o.expireIn } : {}), ...(exportBackup ? { exportBackup } : {}),
      }, { stateDir: config.stateDir });
      print(o.json, s, () => `created snapshot ${s.name} of ${s.vm} (${s.disks.length} disk(s), label ${s.label ?? '-'}, ` +
        `${s.expiresAt ? `expires ${s.expiresAt}` : 'no expiry'}${s.vmState ? ', with VM state' : ''})` +
        (s.backup ? `\nexported as backup ${s.backup}` : ''));
    });

  snapshot
    .command('list <vm>')
    .description('list the snapshots of VM, oldest first')
    .option('-c, --config <file>', 'configuration file with the VM inventory (env VMVAULT_CONFIG)')
    .option('--json', 'print a JSON array')
    .action(async (vmName: string, o: Flags) => {
      const { config, vm } = await inventoryVm(o, vmName);
      const list = await listSnapshots(snapshotTargetOf(vm), { stateDir: config.stateDir });
      print(o.json, list, () => list.length === 0 ? `no snapshots of ${vm.name}` : table([
        ['NAME', 'LABEL', 'CREATED', 'EXPIRES', 'VM STATE', 'DISKS', 'BACKUP'], ...list.map(line),
      ]));
    });

  snapshot
    .command('revert <vm> <name>')
    .description('revert every disk of VM to snapshot NAME (a running VM with the qemu driver is reverted by its QEMU; otherwise the VM must be stopped)')
    .option('-c, --config <file>', 'configuration file with the VM inventory (env VMVAULT_CONFIG)')
    .option('--json', 'print the snapshot as JSON')
    .action(async (vmName: string, snap: string, o: Flags) => {
      const { config, vm } = await inventoryVm(o, vmName);
      const s = await revertSnapshot(snapshotTargetOf(vm), snap, { stateDir: config.stateDir });
      print(o.json, s, () => `reverted ${s.vm} to snapshot ${s.name} (taken ${s.created}); the snapshot is kept`);
    });

  snapshot
    .command('delete <vm> <name>')
    .description('delete snapshot NAME from every disk of VM')
    .option('-c, --config <file>', 'configuration file with the VM inventory (env VMVAULT_CONFIG)')
    .option('--json', 'print the deleted snapshot as JSON')
    .action(async (vmName: string, snap: string, o: Flags) => {
      const { config, vm } = await inventoryVm(o, vmName);
      const s = await deleteSnapshot(snapshotTargetOf(vm), snap, { stateDir: config.stateDir });
      print(o.json, s, () => `deleted snapshot ${s.name} of ${s.vm}`);
    });
}

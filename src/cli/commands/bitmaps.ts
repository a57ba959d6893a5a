/**
 * `vmvault bitmaps list|remove`: the dirty bitmaps that vmvault's change tracking keeps
 * on a VM's disks, by repository tag, and the removal of those of a repository that is
 * gone (src/vm/bitmaps.ts). The VM comes from the configuration's inventory, or its
 * qcow2 images are named with --qcow2 (and its running QEMU with --qmp).
 */
import path from 'node:path';
import type { Command } from 'commander';
import { configPathFrom, loadConfig } from '../../config/load.js';
import { VmvaultError, errorMessage } from '../../errors.js';
import { listBitmaps, removeBitmaps, repositoryTag, summary, type BitmapSelector, type VmvaultBitmap } from '../../vm/bitmaps.js';
import type { SnapshotTarget } from '../../vm/snapshot-drivers.js';
import { findVm, snapshotTargetOf } from '../../vm/snapshots.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { table } from '../format.js';
import { print } from '../output.js';

interface Flags { config?: string; qcow2?: string[]; qmp?: string; json?: boolean }

const collect = (v: string, prev: string[] = []) => [...prev, v];

/** The inventory VM `vm`, or the images given with --qcow2 (a VM outside any inventory, as `backup --disk` takes it). */
async function targetOf(vm: string | undefined, o: Flags): Promise<SnapshotTarget> {
  if (o.qcow2?.length) {
    if (vm) throw new VmvaultError('BAD_INPUT', 'give either a VM of the inventory or its images with --qcow2, not both');
    return {
      vm: o.qmp ? `the VM on ${o.qmp}` : 'the images given', driver: o.qmp ? 'qemu' : 'image',
      // Named by file name, or by path where two share one.
      disks: o.qcow2.map((p, _, all) => ({
        path: p, name: all.filter((q) => path.basename(q) === path.basename(p)).length > 1 ? p : path.basename(p), format: 'qcow2' as const,
      })),
      ...(o.qmp ? { qmpSocket: o.qmp } : {}),
    };
  }
  if (o.qmp) throw new VmvaultError('BAD_INPUT', '--qmp goes with --qcow2: name the images the QEMU on that socket runs');
  if (!vm) throw new VmvaultError('BAD_INPUT', 'which VM? Name one of the inventory (with --config FILE or VMVAULT_CONFIG), or its images with --qcow2 FILE');
  const file = configPathFrom(o.config);
  if (!file) throw new VmvaultError('BAD_INPUT', `no configuration to find VM "${vm}" in: pass --config FILE or set VMVAULT_CONFIG (or name its images with --qcow2 FILE)`);
  const config = await loadConfig(file);
  const found = findVm(config, vm);
  if (found.host !== config.host) {
    throw new VmvaultError('BAD_INPUT', `VM "${found.name}" is on host "${found.host}", not on this host ("${config.host}"): its disks are there, so run this command on ${found.host}`);
  }
  return snapshotTargetOf(found);
}

/**
 * The tag of the repository given by --repo or VMVAULT_REPOSITORY, if one is and it
 * opens: its bitmaps are marked as this repository's. One that does not open (deleted:
 * the very case of this cleanup) is a warning, and the list goes on unmarked.
 */
async function givenRepositoryTag(globals: GlobalOptions): Promise<string | undefined> {
  if (!(globals.repo ?? process.env.VMVAULT_REPOSITORY)) return undefined;
  try {
    return repositoryTag((await openRepository({ ...globals, lock: false })).id);
  } catch (err) {
    process.stderr.write(`vmvault: warning: the repository given could not be opened (${errorMessage(err)}): no bitmap is marked as its own\n`);
    return undefined;
  }
}

function rows(list: VmvaultBitmap[], own: string | undefined): string[][] {
  return list.map((b) => [
    b.disk, b.tag ?? '(none)', own === undefined ? '-' : b.tag === own ? 'yes' : 'no', b.state, b.backupId?.slice(0, 12) ?? '-', b.name,
  ]);
}

function withOptions(cmd: Command): Command {
  return cmd
    .option('-c, --config <file>', 'configuration file with the VM inventory (env VMVAULT_CONFIG)')
    .option('--qcow2 <file>', 'instead of an inventory VM: a qcow2 image of the VM (repeatable)', collect)
    .option('--qmp <socket>', 'with --qcow2: the VM is running, reach its QEMU through this QMP socket')
    .option('--json', 'print JSON');
}

export function registerBitmapCommands(program: Command, globals: () => GlobalOptions): void {
  const bitmaps = program
    .command('bitmaps')
    .description('the dirty bitmaps change tracking keeps on a VM\'s disks, one per repository; remove those of a repository that is gone');

  withOptions(bitmaps
    .command('list [vm]')
    .description('list vmvault\'s bitmaps on each disk of VM, with the tag of the repository each belongs to ' +
      '(with --repo or VMVAULT_REPOSITORY, that repository\'s are marked)'))
    .action(async (vm: string | undefined, o: Flags) => {
      const target = await targetOf(vm, o);
      const own = await givenRepositoryTag(globals());
      const list = await listBitmaps(target);
      const result = { vm: target.vm, ...(own ? { repositoryTag: own } : {}), bitmaps: list };
      print(o.json, result, () => {
        if (list.length === 0) return `no vmvault bitmaps on the disks of ${target.vm}`;
        const others = new Set(list.filter((b) => b.tag !== own).map((b) => b.tag ?? b.name));
        return table([['DISK', 'REPOSITORY TAG', 'THIS REPOSITORY', 'STATE', 'BACKUP', 'NAME'], ...rows(list, own)]) +
          (own !== undefined && others.size
            ? `\n${others.size === 1 ? '1 other repository keeps' : `${others.size} other repositories keep`} bitmaps here: if one is gone, remove its bitmaps with ` +
              `"vmvault bitmaps remove ... --tag TAG" (QEMU updates each one on every write of the VM)`
            : '');
      });
    });

  withOptions(bitmaps
    .command('remove [vm]')
    .description('remove the bitmaps of repository tag TAG (or the one named NAME) from the disks of VM. ' +
      'A repository that still uses them loses nothing: its next backup of those disks reads them in full')
    .option('--tag <tag>', 'repository tag: the first 8 hex digits of the repository id, as "bitmaps list" shows it')
    .option('--name <name>', 'one bitmap, by its full name'))
    .action(async (vm: string | undefined, o: Flags & { tag?: string; name?: string }) => {
      if ((o.tag === undefined) === (o.name === undefined)) throw new VmvaultError('BAD_INPUT', 'say what to remove: --tag TAG (a repository\'s bitmaps) or --name NAME (one bitmap)');
      const select: BitmapSelector = o.tag !== undefined ? { tag: o.tag.toLowerCase() } : { name: o.name! };
      const target = await targetOf(vm, o);
      const removed = await removeBitmaps(target, select);
      print(o.json, { vm: target.vm, removed }, () =>
        `removed ${removed.length} bitmap(s) from ${target.vm}: ${summary(removed)}`);
    });
}

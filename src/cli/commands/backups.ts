/** `vmvault backup`, `backups`, `show`, `restore` (verify and repair: repair.ts). */
import { Option, type Command } from 'commander';
import { VmvaultError } from '../../errors.js';
import { IMAGE_FORMATS, type ImageFormat } from '../../disk/qemu.js';
import { summarise, type Manifest } from '../../repo/manifest.js';
import type { BackupDisk, FrozenDisk } from '../../pipeline/backup.js';
import { auditFailures, backupVm } from '../../vm/drivers.js';
import { restore } from '../../pipeline/restore.js';
import { verificationStates, type VerificationState } from '../../repo/health.js';
import { openRepository, warn, type GlobalOptions } from '../context.js';
import { formatBytes, table } from '../format.js';
import { print } from '../output.js';
import { progressBar } from '../progress-bar.js';
import { describeVerification } from './repair.js';
import { runInstant, type InstantOptions } from './instant.js';
import { onInterrupt } from '../interrupt.js';
import type { Overlay } from '../../vm/overlays.js';
import { readdirSync } from 'node:fs';
import path from 'node:path';

const collect = (v: string, prev: string[] = []) => [...prev, v];

/** `--disk PATH` or `--disk NAME=PATH`. */
function parseDisk(spec: string): BackupDisk {
  const eq = spec.indexOf('=');
  if (eq > 0 && !spec.slice(0, eq).includes('/')) return { name: spec.slice(0, eq), path: spec.slice(eq + 1) };
  return { path: spec };
}

/** restore's `--disk NAME` and `--disk NAME=PATH`: the disks to restore, and where those with a path go. */
function restoreDisks(specs: string[]): { disks: string[]; diskPaths: Record<string, string> } {
  const disks: string[] = [];
  const diskPaths: Record<string, string> = {};
  for (const spec of specs) {
    const eq = spec.indexOf('=');
    const name = eq < 0 ? spec : spec.slice(0, eq);
    if (!name || (eq >= 0 && eq === spec.length - 1)) throw new VmvaultError('BAD_INPUT', `--disk ${spec}: expected NAME or NAME=PATH`);
    if (disks.includes(name)) throw new VmvaultError('BAD_INPUT', `--disk ${name} is given twice`);
    disks.push(name);
    if (eq >= 0) diskPaths[name] = spec.slice(eq + 1);
  }
  return { disks, diskPaths };
}

function verifiedColumn(v: VerificationState | null): string {
  if (!v) return '-';
  if (v.status === 'damaged') return `DAMAGED (${v.damagedDisks.join(',')})`;
  if (v.status === 'boot-failed') return `BOOT-FAILED ${v.boot!.time}`;
  return `${v.status} ${v.status === 'boot-verified' ? v.boot!.time : v.lastVerified}`;
}

/** What a backup that exits without its cleanup leaves, and how it goes. */
function backupLeftovers(vm: string, given: readonly BackupDisk[], frozen: readonly FrozenDisk[], overlays: readonly Overlay[]): string[] {
  const out: string[] = [];
  for (const ov of overlays) {
    out.push(`VM "${vm}" writes disk ${ov.path} into the temporary overlay ${ov.file}: the next backup of the VM merges it back first (its qemu must keep running until then)`);
  }
  for (const d of frozen) {
    // A disk found unchanged takes no snapshot and keeps its previous bitmap: nothing of it is left.
    if (!d.snapshot) continue;
    out.push(`internal snapshot ${d.snapshot}${d.bitmap ? ` and dirty bitmap ${d.bitmap}` : ''} in ${d.path}: the next backup of this image removes them ` +
      `(or by hand, while nothing uses the image: qemu-img snapshot -d ${d.snapshot} ${d.path}${d.bitmap ? `; qemu-img bitmap --remove ${d.path} ${d.bitmap}` : ''})`);
  }
  if (!frozen.length && !overlays.length) {
    out.push(`the point in time was perhaps being taken: a snapshot or bitmap named vmvault-… in ${given.map((d) => d.path).join(', ')} is removed by the next backup`);
  }
  return out;
}

/** The temporary files of this process's restore (.NAME.vmvault-tmp-PID-…) in its directories. */
function restoreLeftovers(to: string, diskPaths: readonly string[]): string[] {
  const dirs = new Set([path.resolve(to), ...diskPaths.map((p) => path.dirname(path.resolve(to, p)))]);
  const mine = `.vmvault-tmp-${process.pid}-`;
  const files: string[] = [];
  for (const dir of dirs) {
    let names: string[] = [];
    try {
      names = readdirSync(dir);
    } catch {
      continue; // not created yet
    }
    files.push(...names.filter((n) => n.startsWith('.') && n.includes(mine)).map((n) => path.join(dir, n)));
  }
  return files.map((f) => `temporary file ${f}: remove it (rm), or a later restore of the same files removes it once it is 10 minutes old`);
}

function listing(m: Manifest) {
  const { configs: _c, ...s } = summarise(m);
  return s;
}

/**
 * `--disk` with the `--format` and `--allow-chain` that follow it: each applies to the
 * disk given just before it, in command-line order.
 */
function diskOptions(cmd: Command): () => BackupDisk[] {
  const disks: BackupDisk[] = [];
  const last = (flag: string): BackupDisk => {
    const d = disks.at(-1);
    if (!d) throw new VmvaultError('BAD_INPUT', `${flag} applies to the --disk given before it: put it after that --disk`);
    return d;
  };
  cmd.on('option:disk', (v: string) => disks.push(parseDisk(v)));
  cmd.on('option:format', (v: string) => {
    const d = last('--format');
    if (d.format) throw new VmvaultError('BAD_INPUT', `--format given twice for disk ${d.path}`);
    d.format = v as ImageFormat;
  });
  cmd.on('option:allow-chain', () => { last('--allow-chain').allowChain = true; });
  return () => disks;
}

export function registerBackupCommands(program: Command, globals: () => GlobalOptions): void {
  const backupCmd = program
    .command('backup')
    .description("back up a VM's disk images")
    .requiredOption('--vm <name>', 'VM name')
    .option('--disk <path>', 'disk image, or NAME=PATH (repeatable)')
    .addOption(new Option('--format <format>', 'format of the --disk before it, as the VM uses it (default: detected once by vmvault, then pinned)').choices([...IMAGE_FORMATS]))
    .option('--allow-chain', 'the --disk before it is a linked clone: read its backing files (or vmdk extents) through it')
    .option('--full-read', 'read every disk in full, whatever change tracking says')
    .option('--audit', 'read every disk in full and compare with what change tracking says (differences are reported)')
    .option('--config <file>', 'configuration file to store with the backup (repeatable)', collect)
    .option('--label <label>', 'label (repeatable)', collect)
    .option('--host <name>', 'host name recorded in the backup')
    .option('--policy <name>', 'policy name recorded in the backup (its retention will govern it)')
    .option('--qmp <socket>', "the VM is running: reach it through this QMP socket (the disks are its images, all taken at one instant)")
    .option('--guest-agent <socket>', "with --qmp: freeze the guest's filesystems through this guest-agent socket")
    .option('--overlay-dir <dir>', 'with --qmp: where the temporary overlays go (default: next to each image)')
    .option('--json', 'print the result as JSON')
  const givenDisks = diskOptions(backupCmd);
  backupCmd
    .action(async (o: {
      vm: string; config?: string[]; fullRead?: boolean; audit?: boolean; label?: string[]; host?: string; policy?: string; json?: boolean;
      qmp?: string; guestAgent?: string; overlayDir?: string;
    }) => {
      const disks = givenDisks();
      if (!disks.length) throw new VmvaultError('BAD_INPUT', 'no disk given: pass --disk PATH (repeatable)');
      if (!o.qmp && (o.guestAgent || o.overlayDir)) throw new VmvaultError('BAD_INPUT', '--guest-agent and --overlay-dir apply to a running VM only: pass --qmp SOCKET too');
      // Ctrl-C or SIGTERM stops the backup cleanly: its snapshot is removed, a running VM's
      // overlays are merged back, nothing is committed. A second signal exits at once.
      const interrupt = new AbortController();
      const repo = await openRepository(globals(), { signal: interrupt.signal });
      const bar = progressBar(!o.json);
      let frozen: readonly FrozenDisk[] = [];
      let overlays: readonly Overlay[] = [];
      const stop = onInterrupt({
        what: 'the backup', outcome: 'nothing was saved', controller: interrupt,
        stopping: `stopping the backup and cleaning up (${o.qmp ? 'merging the overlays back' : 'removing its snapshot'})`,
        leftovers: () => backupLeftovers(o.vm, disks, frozen, overlays),
      });
      let result;
      try {
        result = await backupVm(repo, {
          vm: o.vm, driver: o.qmp ? 'qemu' : 'image', disks, configs: o.config ?? [], labels: o.label ?? [], ...(o.fullRead ? { fullRead: true } : {}), ...(o.audit ? { audit: true } : {}),
          ...(o.host ? { host: o.host } : {}), ...(o.policy ? { policy: o.policy } : {}), onProgress: bar.update, signal: stop.signal,
          ...(o.qmp ? { qmpSocket: o.qmp } : {}), ...(o.guestAgent ? { guestAgentSocket: o.guestAgent } : {}), ...(o.overlayDir ? { overlayDir: o.overlayDir } : {}),
          onFrozen: (d) => { frozen = d; }, onPointInTime: (ov) => { overlays = ov; },
        });
      } finally {
        stop.dispose();
      }
      const { manifest, stats } = result;
      bar.done();
      for (const m of auditFailures(manifest)) process.stderr.write(`vmvault: ${m}\n`);
      print(o.json, { ...listing(manifest), stats }, () =>
        `backup ${manifest.id} of ${manifest.vm}: ${manifest.disks.length} disk(s), read ${formatBytes(stats.bytesRead)}, ` +
        `uploaded ${formatBytes(stats.bytesUploaded)} in ${stats.chunksNew} new chunk(s), ${stats.chunksReused} reused, ${stats.chunksUnchanged ?? 0} unchanged (not read), ` +
        `${stats.chunksZero} zero, ${stats.seconds.toFixed(1)}s`);
    });

  program
    .command('backups')
    .description('list backups')
    .option('--vm <name>', 'only this VM')
    .option('--json', 'print a JSON array')
    .action(async (o: { vm?: string; json?: boolean }) => {
      const repo = await openRepository(globals());
      const [{ manifests, damaged }, states] = await Promise.all([repo.readManifests(), verificationStates(repo)]);
      const all = manifests.filter((m) => !o.vm || m.vm === o.vm).map((m) => ({ ...listing(m), verification: states.get(m.id) ?? null }));
      // A damaged manifest cannot say which VM it belongs to: it is listed whatever --vm says.
      const broken = damaged.map((d) => ({ id: d.id, damaged: d.problem }));
      for (const d of damaged) warn(`${d.problem}: backup ${d.id.slice(0, 12)} cannot be listed or restored; every other backup is unaffected`);
      print(o.json, [...all, ...broken], () => all.length + broken.length === 0 ? 'no backups' : table([
        ['ID', 'TIME', 'VM', 'HOST', 'DISKS', 'LABELS', 'VERIFIED'],
        ...all.map((b) => [
          b.id.slice(0, 12), b.time, b.vm, b.host, b.disks.map((d) => `${d.name} (${d.format}, ${formatBytes(d.virtualSize)})`).join(' '), b.labels.join(','),
          verifiedColumn(b.verification),
        ]),
        ...broken.map((b) => [b.id.slice(0, 12), '-', '(damaged)', '-', '-', '-', '-']),
      ]));
    });

  program
    .command('show <id>')
    .description('show one backup (any unique prefix of its id)')
    .option('--json', 'print JSON')
    .action(async (id: string, o: { json?: boolean }) => {
      const repo = await openRepository(globals());
      const m = await repo.loadManifest(await repo.resolveBackupId(id));
      const s = { ...summarise(m), stats: m.stats, verification: (await verificationStates(repo, new Set([m.id]))).get(m.id) ?? null };
      print(o.json, s, () => [
        `backup   ${s.id}`, `vm       ${s.vm}`, `host     ${s.host}`, `time     ${s.time}`,
        `labels   ${s.labels.join(', ') || '-'}`, ...(s.policy ? [`policy   ${s.policy}`] : []),
        ...(s.consistency ? [`instant  ${s.consistency}-consistent`] : []),
        ...m.disks.map((d) => `disk     ${d.name}: ${d.format}${d.formatSource ? ` (${d.formatSource})` : ''}, ${formatBytes(d.virtualSize)}, ` +
          `${d.chunks.filter(Boolean).length}/${d.chunks.length} chunks with data, from ${d.sourcePath}${d.chain ? ` through ${d.chain.join(', ')}` : ''}` +
          `${d.mode ? `\n         read ${d.mode === 'incremental' ? 'incrementally' : 'in full'}: ${d.reason ?? ''}` : ''}` +
          `${d.audit ? `\n         audit: ${d.audit.differing === 0 ? `change tracking agreed on all ${d.audit.unchanged} unchanged chunk(s)` : `CHANGE TRACKING MISSED ${d.audit.differing} of ${d.audit.unchanged} chunk(s)`}` : ''}`),
        ...m.configs.map((c) => `config   ${c.name} (from ${c.sourcePath})`),
        `verified ${describeVerification(s.verification ?? undefined)}`,
      ].join('\n'));
    });

  program
    .command('restore [id]')
    .description('restore a backup into a directory (--instant: run the VM from the backup at once and copy underneath it)')
    .option('--to <dir>', 'target directory')
    .addOption(new Option('--format <format>', 'disk format to write (default: as backed up)').choices([...IMAGE_FORMATS]))
    .option('--disk <name>', 'restore only this disk, or NAME=PATH: only this disk, at PATH (inside --to; relative to it) (repeatable)', collect)
    .option('--name <vm>', 'restore as a new VM: the libvirt domain XML gets this name, a fresh UUID and fresh MAC addresses')
    .option('--force', 'replace existing files')
    .option('--no-sync', 'do not make the restored files durable (no fdatasync): faster, for a restore to be compared or tested and thrown away; a crash of this host can lose them')
    .option('--json', 'print the result as JSON')
    .option('--instant', 'start the VM on overlays backed by an NBD export of the backup, then copy to the final images and pivot')
    .option('--start', '--instant: run QEMU (qemu-system-x86_64) with the restored configuration; its QMP monitor is DIR/qmp.sock')
    .option('--qmp <socket>', '--instant: give the disks to this running QEMU instead')
    .option('--rate <bytes>', '--instant: copy at most this many bytes per second (e.g. 50M)')
    .option('--machine <type>', '--start: QEMU machine (default pc,accel=kvm:tcg)')
    .option('--memory <size>', '--start: guest memory (default: from the libvirt domain, else 512M)')
    .option('--resume <dir>', 'finish an instant restore whose vmvault or export died')
    .action(async (id: string | undefined, o: InstantOptions & { to?: string; format?: ImageFormat; disk?: string[]; force?: boolean; json?: boolean; name?: string; sync: boolean }) => {
      if ((o.instant || o.resume !== undefined) && o.name !== undefined) throw new VmvaultError('BAD_INPUT', '--name applies to a plain restore only: leave out --instant');
      if ((o.instant || o.resume !== undefined) && !o.sync) throw new VmvaultError('BAD_INPUT', '--no-sync applies to a plain restore only: an instant restore\'s images are the running VM\'s, always made durable');
      if (o.instant || o.resume !== undefined) return runInstant(id, o, globals());
      for (const flag of ['start', 'qmp', 'rate', 'machine', 'memory'] as const) {
        if (o[flag] !== undefined) throw new VmvaultError('BAD_INPUT', `--${flag} applies to --instant restores only`);
      }
      if (id === undefined || !o.to) throw new VmvaultError('BAD_INPUT', 'restore needs the backup id and --to DIR');
      const { disks, diskPaths } = restoreDisks(o.disk ?? []);
      // As for backup: the first signal stops the restore and removes its temporary files; a second exits at once.
      const interrupt = new AbortController();
      const repo = await openRepository(globals(), { signal: interrupt.signal });
      const bar = progressBar(!o.json);
      const to = o.to;
      const stop = onInterrupt({
        what: 'the restore', outcome: 'its partly written files were removed', controller: interrupt,
        stopping: 'stopping the restore and removing its partly written files',
        leftovers: () => restoreLeftovers(to, Object.values(diskPaths)),
      });
      let result;
      try {
        result = await restore(repo, {
          backupId: await repo.resolveBackupId(id), to, ...(o.format ? { format: o.format } : {}),
          ...(disks.length ? { disks } : {}), ...(Object.keys(diskPaths).length ? { diskPaths } : {}), ...(o.name !== undefined ? { name: o.name } : {}),
          force: !!o.force, forceHint: 'pass --force to replace them', onProgress: bar.update, signal: stop.signal, sync: o.sync,
        });
      } finally {
        stop.dispose();
      }
      bar.done();
      print(o.json, result, () => [
        `restored backup ${result.backup} of ${result.vm}${result.clone ? ` as new VM ${result.clone.name} (uuid ${result.clone.uuid})` : ''}:`,
        ...result.files.map((f) => `  ${f.path}`),
        ...(result.leftoversRemoved ?? []).map((f) => `removed ${f}, left by a restore that was interrupted`),
        ...(result.durable ? [] : ['not synced (--no-sync): a crash of this host before the kernel writes them back can lose these files; run "sync" to make them durable']),
      ].join('\n'));
    });
}

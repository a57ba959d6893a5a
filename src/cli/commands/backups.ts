/** `vmvault backup`, `backups`, `show`, `restore`, `verify`. */
import { Option, type Command } from 'commander';
import { VmvaultError } from '../../errors.js';
import { IMAGE_FORMATS, type ImageFormat } from '../../disk/qemu.js';
import { summarise, type Manifest } from '../../repo/manifest.js';
import { backup } from '../../pipeline/backup.js';
import { backupRunningVm } from '../../vm/live.js';
import { restore } from '../../pipeline/restore.js';
import { verify } from '../../pipeline/verify.js';
import { openRepository, warn, type GlobalOptions } from '../context.js';
import { formatBytes, table } from '../format.js';
import { print } from '../output.js';
import { progressBar } from '../progress-bar.js';

const collect = (v: string, prev: string[] = []) => [...prev, v];

/** `--disk PATH` or `--disk NAME=PATH`. */
function parseDisk(spec: string): { path: string; name?: string } {
  const eq = spec.indexOf('=');
  if (eq > 0 && !spec.slice(0, eq).includes('/')) return { name: spec.slice(0, eq), path: spec.slice(eq + 1) };
  return { path: spec };
}

function listing(m: Manifest) {
  const { configs: _c, ...s } = summarise(m);
  return s;
}

export function registerBackupCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('backup')
    .description("back up a VM's disk images")
    .requiredOption('--vm <name>', 'VM name')
    .option('--disk <path>', 'disk image, or NAME=PATH (repeatable)', collect)
    .option('--config <file>', 'configuration file to store with the backup (repeatable)', collect)
    .option('--label <label>', 'label (repeatable)', collect)
    .option('--host <name>', 'host name recorded in the backup')
    .option('--policy <name>', 'policy name recorded in the backup (its retention will govern it)')
    .option('--qmp <socket>', "the VM is running: reach it through this QMP socket (the disks are its images, all taken at one instant)")
    .option('--guest-agent <socket>', "with --qmp: freeze the guest's filesystems through this guest-agent socket")
    .option('--overlay-dir <dir>', 'with --qmp: where the temporary overlays go (default: next to each image)')
    .option('--json', 'print the result as JSON')
    .action(async (o: {
      vm: string; disk?: string[]; config?: string[]; label?: string[]; host?: string; policy?: string; json?: boolean;
      qmp?: string; guestAgent?: string; overlayDir?: string;
    }) => {
      if (!o.disk?.length) throw new VmvaultError('BAD_INPUT', 'no disk given: pass --disk PATH (repeatable)');
      if (!o.qmp && (o.guestAgent || o.overlayDir)) throw new VmvaultError('BAD_INPUT', '--guest-agent and --overlay-dir apply to a running VM only: pass --qmp SOCKET too');
      const repo = await openRepository(globals());
      const bar = progressBar(!o.json);
      // Ctrl-C or SIGTERM stops the backup cleanly: its snapshot is removed, a running VM's
      // overlays are merged back, nothing is committed. A second signal exits at once.
      const stop = new AbortController();
      const onSignal = (sig: NodeJS.Signals) => {
        if (stop.signal.aborted) process.exit(130);
        process.stderr.write(`\nvmvault: ${sig}: stopping the backup and cleaning up (${o.qmp ? 'merging the overlays back' : 'removing its snapshot'}); send it again to exit at once\n`);
        stop.abort(new VmvaultError('BAD_INPUT', `the backup was interrupted (${sig}): nothing was saved`));
      };
      process.on('SIGINT', onSignal);
      process.on('SIGTERM', onSignal);
      const req = {
        vm: o.vm, disks: o.disk.map(parseDisk), configs: o.config ?? [], labels: o.label ?? [],
        ...(o.host ? { host: o.host } : {}), ...(o.policy ? { policy: o.policy } : {}), onProgress: bar.update, signal: stop.signal,
      };
      let result;
      try {
        result = o.qmp
          ? await backupRunningVm(repo, { ...req, qmpSocket: o.qmp, ...(o.guestAgent ? { guestAgentSocket: o.guestAgent } : {}), ...(o.overlayDir ? { overlayDir: o.overlayDir } : {}) })
          : await backup(repo, req);
      } finally {
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
      }
      const { manifest, stats } = result;
      bar.done();
      print(o.json, { ...listing(manifest), stats }, () =>
        `backup ${manifest.id} of ${manifest.vm}: ${manifest.disks.length} disk(s), read ${formatBytes(stats.bytesRead)}, ` +
        `uploaded ${formatBytes(stats.bytesUploaded)} in ${stats.chunksNew} new chunk(s), ${stats.chunksReused} reused, ` +
        `${stats.chunksZero} zero, ${stats.seconds.toFixed(1)}s`);
    });

  program
    .command('backups')
    .description('list backups')
    .option('--vm <name>', 'only this VM')
    .option('--json', 'print a JSON array')
    .action(async (o: { vm?: string; json?: boolean }) => {
      const repo = await openRepository(globals());
      const { manifests, damaged } = await repo.readManifests();
      const all = manifests.filter((m) => !o.vm || m.vm === o.vm).map(listing);
      // A damaged manifest cannot say which VM it belongs to: it is listed whatever --vm says.
      const broken = damaged.map((d) => ({ id: d.id, damaged: d.problem }));
      for (const d of damaged) warn(`${d.problem}: backup ${d.id.slice(0, 12)} cannot be listed or restored; every other backup is unaffected`);
      print(o.json, [...all, ...broken], () => all.length + broken.length === 0 ? 'no backups' : table([
        ['ID', 'TIME', 'VM', 'HOST', 'DISKS', 'LABELS'],
        ...all.map((b) => [b.id.slice(0, 12), b.time, b.vm, b.host, b.disks.map((d) => `${d.name} (${d.format}, ${formatBytes(d.virtualSize)})`).join(' '), b.labels.join(',')]),
        ...broken.map((b) => [b.id.slice(0, 12), '-', '(damaged)', '-', '-', '-']),
      ]));
    });

  program
    .command('show <id>')
    .description('show one backup (any unique prefix of its id)')
    .option('--json', 'print JSON')
    .action(async (id: string, o: { json?: boolean }) => {
      const repo = await openRepository(globals());
      const m = await repo.loadManifest(await repo.resolveBackupId(id));
      const s = { ...summarise(m), stats: m.stats };
      print(o.json, s, () => [
        `backup   ${s.id}`, `vm       ${s.vm}`, `host     ${s.host}`, `time     ${s.time}`,
        `labels   ${s.labels.join(', ') || '-'}`, ...(s.policy ? [`policy   ${s.policy}`] : []),
        ...(s.consistency ? [`instant  ${s.consistency}-consistent`] : []),
        ...m.disks.map((d) => `disk     ${d.name}: ${d.format}, ${formatBytes(d.virtualSize)}, ${d.chunks.filter(Boolean).length}/${d.chunks.length} chunks with data, from ${d.sourcePath}`),
        ...m.configs.map((c) => `config   ${c.name} (from ${c.sourcePath})`),
      ].join('\n'));
    });

  program
    .command('restore <id>')
    .description('restore a backup into a directory')
    .requiredOption('--to <dir>', 'target directory')
    .addOption(new Option('--format <format>', 'disk format to write (default: as backed up)').choices(IMAGE_FORMATS as unknown as string[]))
    .option('--disk <name>', 'restore only this disk (repeatable)', collect)
    .option('--force', 'replace existing files')
    .option('--json', 'print the result as JSON')
    .action(async (id: string, o: { to: string; format?: ImageFormat; disk?: string[]; force?: boolean; json?: boolean }) => {
      const repo = await openRepository(globals());
      const bar = progressBar(!o.json);
      const result = await restore(repo, {
        backupId: await repo.resolveBackupId(id), to: o.to, ...(o.format ? { format: o.format } : {}),
        ...(o.disk ? { disks: o.disk } : {}), force: !!o.force, onProgress: bar.update,
      });
      bar.done();
      print(o.json, result, () => [`restored backup ${result.backup} of ${result.vm}:`, ...result.files.map((f) => `  ${f.path}`)].join('\n'));
    });

  program
    .command('verify [id]')
    .description('check that backups are complete (and with --read-data, intact)')
    .option('--read-data', 'download, decrypt and re-hash every chunk')
    .option('--json', 'print the report as JSON')
    .action(async (id: string | undefined, o: { readData?: boolean; json?: boolean }) => {
      const repo = await openRepository(globals());
      const bar = progressBar(!o.json);
      const ids = id ? [await repo.resolveBackupId(id)] : undefined;
      const report = await verify(repo, { ...(ids ? { backupIds: ids } : {}), readData: !!o.readData, onProgress: bar.update });
      bar.done();
      print(o.json, report, () => report.ok
        ? `ok: ${report.backupsChecked} backup(s), ${report.chunksChecked} chunk(s) ${report.readData ? 'read and verified' : 'present'}`
        : [`FAILED: ${report.problems.length} problem(s) in ${report.backupsChecked} backup(s):`,
          ...report.problems.map((p) => `  ${p.object}: ${p.problem}\n    needed by backup(s) ${p.backups.join(', ')}`)].join('\n'));
      if (!report.ok) process.exitCode = 1;
    });
}

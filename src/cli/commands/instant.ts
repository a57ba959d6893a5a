/** `vmvault restore ID --instant --to DIR --start|--qmp SOCKET` and `vmvault restore --resume DIR` (issue 13). */
import { VmvaultError } from '../../errors.js';
import { instantRestore, resumeInstantRestore, type InstantRestoreResult } from '../../vm/instant-restore.js';
import { openRepository, type GlobalOptions } from '../context.js';
import { parseSize } from '../format.js';
import { print } from '../output.js';
import { progressBar } from '../progress-bar.js';

export interface InstantOptions {
  to?: string; format?: string; force?: boolean; json?: boolean; disk?: string[];
  instant?: boolean; resume?: string; qmp?: string; start?: boolean; rate?: string; machine?: string; memory?: string;
}

function rate(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseSize(text);
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `--rate ${text}: ${(err as Error).message} bytes per second`);
  }
}

function report(json: boolean | undefined, r: InstantRestoreResult): void {
  print(json, r, () => [
    `restored backup ${r.backup} of ${r.vm}: the VM runs on its final images (QMP ${r.qmpSocket})`,
    ...r.disks.map((d) => `  ${d.path}`),
  ].join('\n'));
}

/**
 * Ctrl-C (or SIGTERM) during an instant restore: once the VM runs, it reads what is not
 * copied yet from this process's exports, so exiting pauses it on an I/O error until a
 * resume. The first signal then only says so; a second exits, naming the command that
 * finishes the restore. Before the VM runs, a signal exits at once, as before.
 */
function guardRunningVm(dir: string, runs: boolean): { running(): void; dispose(): void } {
  let warned = false;
  const resume = `vmvault restore --resume ${dir}`;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (!runs) {
      process.stderr.write(`\nvmvault: ${sig}: the instant restore stopped before the VM started\n`);
      process.exit(130);
    }
    if (warned) {
      process.stderr.write(`\nvmvault: ${sig} again: exiting; a VM running on this restore pauses on its next read of an uncopied block. Finish the restore with "${resume}"\n`);
      process.exit(130);
    }
    warned = true;
    process.stderr.write(`\nvmvault: ${sig}: the VM reads the disks' uncopied blocks from this process: exiting now pauses it (I/O error) until "${resume}". ` +
      'The restore goes on; send the signal again to exit anyway\n');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    running: () => { runs = true; },
    dispose: () => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

export async function runInstant(id: string | undefined, o: InstantOptions, globals: GlobalOptions): Promise<void> {
  if (o.resume !== undefined) {
    if (id !== undefined || o.instant || o.to) throw new VmvaultError('BAD_INPUT', '--resume DIR takes no backup id, --instant or --to: everything is recorded in DIR');
    const repo = await openRepository(globals);
    const bar = progressBar(!o.json);
    // The VM of a resumed restore runs (paused) already.
    const guard = guardRunningVm(o.resume, true);
    let r;
    try {
      r = await resumeInstantRestore(repo, o.resume, { onProgress: bar.update });
    } finally {
      guard.dispose();
    }
    bar.done();
    report(o.json, r);
    return;
  }
  if (id === undefined || !o.to) throw new VmvaultError('BAD_INPUT', 'an instant restore needs the backup id and --to DIR');
  if (!!o.start === (o.qmp !== undefined)) throw new VmvaultError('BAD_INPUT', '--instant needs exactly one of --start (vmvault runs QEMU) or --qmp SOCKET (a running QEMU gets the disks)');
  if (o.disk?.length) throw new VmvaultError('BAD_INPUT', '--instant restores every disk of the backup: leave out --disk');
  if (o.format !== undefined && o.format !== 'qcow2' && o.format !== 'raw') throw new VmvaultError('BAD_INPUT', `--instant writes qcow2 or raw final images, not ${o.format}`);
  const memoryMiB = o.memory === undefined ? undefined : Math.round(parseSize(o.memory.match(/^\d+$/) ? `${o.memory}M` : o.memory) / 1024 ** 2);
  const repo = await openRepository(globals);
  const bar = progressBar(!o.json);
  const guard = guardRunningVm(o.to, false);
  let r;
  try {
    r = await instantRestore(repo, {
      backupId: await repo.resolveBackupId(id), to: o.to, force: !!o.force,
      vm: o.start ? { start: { ...(o.machine ? { machine: o.machine } : {}), ...(memoryMiB ? { memoryMiB } : {}) } } : { qmp: o.qmp! },
      ...(o.format ? { format: o.format as 'qcow2' | 'raw' } : {}), ...(rate(o.rate) ? { rate: rate(o.rate)! } : {}),
      onProgress: bar.update,
      // Said as soon as it is true, on stderr: stdout carries the result (JSON with --json).
      onRunning: (w) => {
        guard.running();
        process.stderr.write(`vmvault: the VM runs from the backup; QMP at ${w.qmpSocket}; copying its disks underneath\n`);
      },
    });
  } finally {
    guard.dispose();
  }
  bar.done();
  report(o.json, r);
}

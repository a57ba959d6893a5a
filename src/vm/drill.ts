/**
 * Restore drills: prove a backup boots, without copying it. Each disk is served
 * straight from the repository over NBD (pipeline/nbd-export.ts, unix sockets in a
 * private temporary directory), booted in an isolated QEMU on throwaway overlays
 * (drill-run.ts), and the outcome is recorded in the repository as the backup's
 * verification state (repo/health.ts: boot-verified, or boot-failed with the reason).
 *
 * The serial log, a screenshot of the console and the result are kept in
 * `STATE_DIR/drills/<backup id>/` (serial.log, screen.ppm, result.json), replaced by
 * the next drill of the same backup.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { NotFoundError, VmvaultError } from '../errors.js';
import { exportBackupDisk, type NbdExport } from '../pipeline/nbd-export.js';
import { newRunId, writeDrill, type DrillRecord } from '../repo/health.js';
import type { Repository } from '../repo/repository.js';
import type { DiskEntry, Manifest } from '../repo/manifest.js';
import { libvirtDisks } from '../pipeline/libvirt-xml.js';
import { diskNameFromPath } from '../pipeline/names.js';
import { runDrill, type DrillProbe } from './drill-run.js';

export type { DrillProbe } from './drill-run.js';

/** The serial text a drill waits for when no probe is given: a Linux getty's prompt. */
export const DEFAULT_DRILL_TEXT = 'login:';
export const DEFAULT_DRILL_TIMEOUT_MS = 300_000;
export const DEFAULT_DRILL_MEMORY_MIB = 512;

export interface DrillRequest {
  backupId: string;
  /** Default: the serial console shows DEFAULT_DRILL_TEXT. */
  probe?: DrillProbe;
  timeoutMs?: number;
  /** Results go to `stateDir/drills/<backup id>/`. */
  stateDir: string;
  /** Recorded with the result (default: this machine's name). */
  host?: string;
  memoryMiB?: number;
  machine?: string;
  /**
   * Guest disk bus: virtio, or ide for guests without virtio drivers. Default: as the
   * backup's libvirt domain XML says (virtio stays virtio, sata/ide/scsi become ide), else virtio.
   */
  bus?: 'virtio' | 'ide';
  now?: () => Date;
}

export interface DrillResult {
  backup: string;
  vm: string;
  status: 'boot-verified' | 'boot-failed';
  reason?: string;
  probe: string;
  time: string;
  seconds: number;
  /** The directory of the kept files, and the files. */
  directory: string;
  serialLog: string;
  screenshot?: string;
}

/**
 * A backup id (or unique prefix) as it is, or a VM name: that VM's newest backup.
 * NOT_FOUND naming both readings when neither matches.
 */
export async function resolveDrillTarget(repo: Repository, idOrVm: string): Promise<string> {
  if (/^[0-9a-fA-F]{4,64}$/.test(idOrVm)) {
    try {
      return await repo.resolveBackupId(idOrVm);
    } catch (err) {
      if (!(err instanceof NotFoundError)) throw err;
    }
  }
  const newest = (await repo.vmBackups(idOrVm)).at(-1);
  if (!newest) throw new NotFoundError(`"${idOrVm}" is neither a backup id nor a VM with backups: see "vmvault backups"`);
  return newest.id;
}

/** Drills one backup and records the result. A failed boot is a result, not an exception: see `status`. */
export async function drillBackup(repo: Repository, req: DrillRequest): Promise<DrillResult> {
  const manifest = await repo.loadManifest(req.backupId);
  const probe = req.probe ?? { kind: 'serial', text: DEFAULT_DRILL_TEXT };
  if (probe.kind === 'serial' && !probe.text) throw new VmvaultError('BAD_INPUT', 'the serial probe needs a non-empty text to wait for');
  const directory = join(req.stateDir, 'drills', manifest.id);
  await mkdir(directory, { recursive: true, mode: 0o700 });
  const time = (req.now ?? (() => new Date()))().toISOString();
  // Unix socket paths hold 107 bytes: a short private directory, not the state directory.
  const work = await mkdtemp(join(tmpdir().length <= 40 ? tmpdir() : '/tmp', 'vmvault-drill-'));
  const exports: NbdExport[] = [];
  try {
    for (const [i, d] of manifest.disks.entries()) {
      exports.push(await exportBackupDisk({ repo, backupId: manifest.id, disk: d.name, listen: `unix:${join(work, `d${i}.nbd`)}` }));
    }
    const outcome = await runDrill({
      disks: exports.map((e, i) => ({ uri: e.uri, size: e.size, bus: req.bus ?? busFromConfig(manifest, manifest.disks[i]!) })),
      probe, timeoutMs: req.timeoutMs ?? DEFAULT_DRILL_TIMEOUT_MS, workDir: work,
      serialLog: join(directory, 'serial.log'), screenshot: join(directory, 'screen.ppm'),
      memoryMiB: req.memoryMiB ?? DEFAULT_DRILL_MEMORY_MIB, ...(req.machine ? { machine: req.machine } : {}),
    });
    const record: DrillRecord = {
      backup: manifest.id, run: newRunId(), time, host: req.host ?? hostname(),
      status: outcome.ok ? 'boot-verified' : 'boot-failed', ...(outcome.reason ? { reason: outcome.reason } : {}),
      probe: outcome.probe, seconds: Math.round(outcome.seconds * 10) / 10,
    };
    const result: DrillResult = {
      backup: manifest.id, vm: manifest.vm, status: record.status, ...(record.reason ? { reason: record.reason } : {}),
      probe: record.probe, time, seconds: record.seconds, directory, serialLog: outcome.serialLog,
      ...(outcome.screenshot ? { screenshot: outcome.screenshot } : {}),
    };
    await writeFile(join(directory, 'result.json'), `${JSON.stringify(result, null, 2)}\n`, { mode: 0o600 });
    await writeDrill(repo, record);
    return result;
  } finally {
    await Promise.all(exports.map((e) => e.close()));
    await rm(work, { recursive: true, force: true });
  }
}

/** The bus the VM's libvirt domain gives this disk (matched by its path or disk name), as a drill can offer it. */
function busFromConfig(m: Manifest, disk: DiskEntry): 'virtio' | 'ide' {
  for (const c of m.configs) {
    const xml = Buffer.from(c.data, 'base64').toString('utf8');
    if (!/\.xml$/i.test(c.name) || !/<domain[\s>]/.test(xml)) continue;
    let disks;
    try {
      disks = libvirtDisks(xml);
    } catch {
      continue;
    }
    const d = disks.find((x) => x.device === 'disk' && (x.path === disk.sourcePath || diskNameFromPath(x.path) === disk.name));
    if (d?.bus) return d.bus === 'virtio' ? 'virtio' : 'ide';
  }
  return 'virtio';
}

/** The error a failed drill becomes where failing matters (the CLI's exit status, a job). */
export function drillFailure(r: DrillResult): VmvaultError {
  return new VmvaultError('DRILL_FAILED', `the drill of backup ${r.backup.slice(0, 12)} of ${r.vm} failed: ${r.reason ?? 'unknown reason'}; recorded as boot-failed; serial log ${r.serialLog}${r.screenshot ? `, screenshot ${r.screenshot}` : ''}`);
}

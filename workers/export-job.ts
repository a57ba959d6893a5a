/**
 * NBD exports started by export jobs (POST /v1/backups/{id}/exports). The job only
 * starts the export and answers where to connect and until when; the export then
 * lives in the worker's process until its time is up or the worker stops, so a long
 * export never holds the host's job slot.
 */
import { isIP } from 'node:net';
import type { Logger } from 'pino';
import { VmvaultError } from '../src/errors.js';
import { exportBackupDisk, type NbdExport } from '../src/pipeline/nbd-export.js';
import type { Repository } from '../src/repo/repository.js';
import type { ExportPayload } from '../src/queue/payloads.js';

export interface ExportJobResult { backup: string; disk: string; uri: string; size: number; expiresAt: string }

/** Loopback, and the host's configured export address: nowhere else. */
export function exportAddressAllowed(address: string, configured: string | undefined): boolean {
  if (isIP(address) === 0) return false;
  return address === '::1' || /^127\./.test(address) || (configured !== undefined && address === configured);
}

export class HostExports {
  private readonly live = new Set<{ exp: NbdExport; timer: NodeJS.Timeout }>();

  constructor(private readonly repo: Repository, private readonly log: Logger, private readonly configured: string | undefined) {}

  async start(p: ExportPayload): Promise<ExportJobResult> {
    if (!exportAddressAllowed(p.address, this.configured)) {
      throw new VmvaultError('BAD_INPUT', `exports may listen on loopback (127.0.0.1, ::1)${this.configured ? ` or ${this.configured}` : ''} only, not on "${p.address}": set hosts.<host>.exportAddress in the configuration to allow one more address`);
    }
    const backupId = await this.repo.resolveBackupId(p.backupId);
    const host = p.address.includes(':') ? `[${p.address}]` : p.address;
    const exp = await exportBackupDisk({ repo: this.repo, backupId, disk: p.disk, listen: `${host}:0`, log: this.log });
    const expiresAt = new Date(Date.now() + p.ttlSeconds * 1000);
    const entry = { exp, timer: setTimeout(() => void this.stop(entry), p.ttlSeconds * 1000) };
    entry.timer.unref();
    this.live.add(entry);
    this.log.info({ backup: backupId, disk: p.disk, uri: exp.shownUri, expiresAt }, 'NBD export started');
    return { backup: backupId, disk: p.disk, uri: exp.uri, size: exp.size, expiresAt: expiresAt.toISOString() };
  }

  private async stop(entry: { exp: NbdExport; timer: NodeJS.Timeout }): Promise<void> {
    clearTimeout(entry.timer);
    if (!this.live.delete(entry)) return;
    await entry.exp.close().catch((err: unknown) => this.log.warn({ err: String(err) }, 'NBD export did not close cleanly'));
    this.log.info({ uri: entry.exp.shownUri }, 'NBD export stopped');
  }

  /** Stop every export (the worker is shutting down). */
  async closeAll(): Promise<void> {
    await Promise.all([...this.live].map((e) => this.stop(e)));
  }
}

/**
 * A backup's disk served read-only over NBD, straight from the repository: the bytes
 * come through a DiskReader (chunks fetched, decrypted and re-hashed on the fly, a
 * small LRU cache shared by every client) and zero chunks come from the manifest, so
 * clients see them as holes without anything being read. Nothing is written to the
 * local disk. The export holds a shared repository lock while it runs, so gc does
 * not collect its chunks under it.
 */
import { randomBytes } from 'node:crypto';
import { NotFoundError, VmvaultError } from '../errors.js';
import { NbdServer, type ListenAddress, type NbdSource, type ServerLog, type SourceRun } from '../disk/nbd-server.js';
import type { Repository } from '../repo/repository.js';
import type { DiskEntry } from '../repo/manifest.js';
import { withReadLock } from '../repo/locks.js';
import { DiskReader } from './disk-reader.js';

export interface NbdExport {
  /**
   * Where to connect: `nbd+unix:///DISK?socket=PATH`, or on TCP `nbd://HOST:PORT/DISK.SECRET`,
   * whose name is the only way in (a random secret: anyone who can reach a TCP port could
   * otherwise read the disk; a unix socket is the owner's only, mode 0600).
   */
  uri: string;
  /** The URI to print in logs: the secret replaced by `…`. */
  shownUri: string;
  /** The disk's virtual size in bytes. */
  size: number;
  /** Stop serving: connections are dropped, the socket file removed, the lock released. */
  close(): Promise<void>;
}

export interface ExportOptions {
  repo: Repository;
  backupId: string;
  disk: string;
  /** `unix:/path` or `HOST:PORT` (port 0: any free port, reported in `uri`). */
  listen: string;
  log?: ServerLog;
  /** Decrypted chunks kept in the cache (DiskReader's default, 8). */
  cacheChunks?: number;
}

/** `unix:/path`, `HOST:PORT` or `[V6]:PORT`; BAD_INPUT with the expected forms otherwise. */
export function parseListen(listen: string): ListenAddress {
  if (listen.startsWith('unix:')) {
    const path = listen.slice(5);
    if (!path.startsWith('/')) throw new VmvaultError('BAD_INPUT', `--listen ${listen}: give an absolute socket path, as in unix:/run/vmvault/disk.sock`);
    return { path };
  }
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(listen);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new VmvaultError('BAD_INPUT', `--listen ${listen}: expected unix:/PATH or HOST:PORT (e.g. 127.0.0.1:10809)`);
  return { host: (m[1] ?? m[2])!, port };
}

export function exportUri(address: ListenAddress, disk: string): string {
  const name = encodeURIComponent(disk);
  if ('path' in address) return `nbd+unix:///${name}?socket=${address.path}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}/${name}`;
}

/** `uri` with the secret of a TCP export's name (`DISK.SECRET`) replaced by `…`: for logs and job listings. */
export function shownExportUri(uri: string): string {
  return uri.replace(/\.[0-9a-f]{32}$/, '.…');
}

/** The disk as an NbdSource: layout from the manifest, bytes from the reader. */
export function diskSource(reader: DiskReader, disk: DiskEntry, chunkSize: number): NbdSource {
  return {
    size: disk.virtualSize,
    layout(offset, length) {
      const runs: SourceRun[] = [];
      const end = offset + length;
      for (let at = offset; at < end;) {
        const index = Math.floor(at / chunkSize);
        const next = Math.min(end, (index + 1) * chunkSize);
        const zero = disk.chunks[index] === null;
        const last = runs[runs.length - 1];
        if (zero && last?.zero) last.length += next - at;
        else runs.push({ offset: at, length: next - at, zero });
        at = next;
      }
      return runs;
    },
    async read(offset, length) {
      const index = Math.floor(offset / chunkSize);
      const data = await reader.chunk(disk, index, chunkSize);
      const from = offset - index * chunkSize;
      return data.subarray(from, from + length);
    },
  };
}

/**
 * Serve disk `disk` of backup `backupId` until `close()`. Resolves once the server
 * listens; rejects when the backup or disk does not exist, the address is taken, or
 * the repository is locked exclusively (gc).
 */
export function exportBackupDisk(opts: ExportOptions): Promise<NbdExport> {
  const address = parseListen(opts.listen);
  return new Promise<NbdExport>((resolveExport, rejectExport) => {
    let finish!: () => void;
    const closed = new Promise<void>((resolve) => { finish = resolve; });
    const held: Promise<void> = withReadLock(opts.repo, `export of backup ${opts.backupId.slice(0, 12)}`, async () => {
      const manifest = await opts.repo.loadManifest(opts.backupId);
      const disk = manifest.disks.find((d) => d.name === opts.disk);
      if (!disk) throw new NotFoundError(`backup ${manifest.id.slice(0, 12)} has no disk "${opts.disk}"; its disks are: ${manifest.disks.map((d) => d.name).join(', ')}`);
      const reader = new DiskReader(opts.repo, opts.cacheChunks);
      const secret = 'host' in address ? randomBytes(16).toString('hex') : undefined;
      let server: NbdServer;
      try {
        server = await NbdServer.listen(address, {
          source: diskSource(reader, disk, manifest.chunkSize), name: secret ? `${disk.name}.${secret}` : disk.name, ...(secret ? { secretName: true } : {}),
          description: `vmvault backup ${manifest.id.slice(0, 12)} of ${manifest.vm}, disk ${disk.name}`,
          ...(opts.log ? { log: opts.log } : {}),
        });
      } catch (err) {
        await reader.close();
        throw err;
      }
      const uri = exportUri(server.address, secret ? `${disk.name}.${secret}` : disk.name);
      const shownUri = shownExportUri(uri);
      opts.log?.info({ backup: manifest.id, disk: disk.name, uri: shownUri }, 'NBD export listening');
      let closing: Promise<void> | undefined;
      resolveExport({
        uri,
        shownUri,
        size: disk.virtualSize,
        close: () => closing ??= (async () => {
          await server.close();
          await reader.close();
          finish();
          await held;
        })(),
      });
      await closed;
    });
    held.catch(rejectExport);
  });
}

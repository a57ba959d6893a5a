/**
 * A cache of backup summaries for services that answer many listing requests (the
 * API). The repository stays the source of truth: each refresh lists `backups/`
 * (one LIST) and loads only the manifests it has not seen, or whose listing changed
 * since it read them (another size, time or S3 ETag: a manifest is never rewritten by
 * vmvault, so that is damage or a copy put back), and forgets those that are gone
 * (pruned). Refreshes are at most `maxAgeMs` apart and never run twice at once.
 * Only summaries are kept: a manifest's chunk list can weigh megabytes.
 * A manifest that cannot be read costs only its own backup: it is left out of the
 * listing, reported once, kept apart (unreadable(), which the status report, the
 * metrics and the alerts show) and read again at each refresh, in case a good copy was
 * put back.
 */
import { IntegrityError, NotFoundError } from '../errors.js';
import { backupName, summarise, UnreadableManifestError, type BackupStats, type BackupSummary } from './manifest.js';
import { mapLimit, resolvePrefix, type DamagedObject, type ListedBackup, type Repository } from './repository.js';

export interface CatalogueEntry extends BackupSummary { stats: BackupStats }

/**
 * A backup whose manifest cannot be read, and why:
 * - damaged: it does not authenticate or parse (cut short, altered, of another repository);
 * - other-version: it authenticates, but another version of vmvault wrote it in a format
 *   this one cannot read (not damage: a vmvault that reads it does);
 * - stray: what lies at its name is no file (a directory repository's FIFO, symlink or
 *   directory, Repository.strayManifests).
 * Until it is put back or removed, gc deletes no chunk (any may be its).
 */
export interface UnreadableBackup extends DamagedObject { kind: 'damaged' | 'other-version' | 'stray' }

export class Catalogue {
  private readonly entries = new Map<string, CatalogueEntry>();
  private readonly broken = new Map<string, UnreadableBackup>();
  /** What the listing said of each entry's manifest when it was read (stampOf). */
  private readonly stamps = new Map<string, string>();
  private refreshedAt = 0;
  private refreshing: Promise<void> | undefined;

  constructor(private readonly repo: Repository, private readonly maxAgeMs = 2000) {}

  /** Every backup, newest first. */
  async list(): Promise<CatalogueEntry[]> {
    await this.fresh();
    return [...this.entries.values()].sort((a, b) => b.time.localeCompare(a.time) || b.id.localeCompare(a.id));
  }

  /** Backups whose manifest cannot be read (damaged, of another version, or a stray at its name), by id. */
  async unreadable(): Promise<UnreadableBackup[]> {
    await this.fresh();
    return [...this.broken.values()].sort((a, b) => a.id.localeCompare(b.id));
  }

  /** One backup by id or unique prefix; NotFoundError / AMBIGUOUS / INTEGRITY (damaged manifest) otherwise. */
  async get(idOrPrefix: string): Promise<CatalogueEntry> {
    await this.fresh();
    const known = () => [...this.entries.keys(), ...this.broken.keys()];
    let id: string;
    try {
      id = resolvePrefix(idOrPrefix, known(), 'backup');
    } catch {
      // A backup committed since the last refresh: look again once.
      this.refreshedAt = 0;
      await this.fresh();
      id = resolvePrefix(idOrPrefix, known(), 'backup');
    }
    const broken = this.broken.get(id);
    if (broken) throw new IntegrityError(broken.problem);
    return this.entries.get(id)!;
  }

  private fresh(): Promise<void> {
    if (Date.now() - this.refreshedAt < this.maxAgeMs) return Promise.resolve();
    return (this.refreshing ??= this.refresh().finally(() => { this.refreshing = undefined; }));
  }

  private async refresh(): Promise<void> {
    const started = Date.now();
    const listed = new Map((await this.repo.listBackups()).map((b) => [b.id, stampOf(b)]));
    const ids = new Set(listed.keys());
    // What a directory repository holds at a manifest's name that is no file: a damaged manifest, as readManifests counts it.
    const strays = await this.repo.strayManifests();
    const strayIds = new Set(strays.map((d) => d.id));
    // Gone (pruned), or changed since it was read: read again below.
    for (const id of this.entries.keys()) if (listed.get(id) !== this.stamps.get(id)) this.entries.delete(id);
    for (const id of this.stamps.keys()) if (!this.entries.has(id)) this.stamps.delete(id);
    for (const id of this.broken.keys()) if (!ids.has(id) && !strayIds.has(id)) this.broken.delete(id);
    for (const d of strays) {
      if (this.broken.get(d.id)?.problem !== d.problem) this.repo.warn(`${d.problem}: backup ${d.id} is left out of the listing; every other backup is unaffected`);
      this.broken.set(d.id, { ...d, kind: 'stray' });
    }
    const missing = [...ids].filter((id) => !this.entries.has(id));
    const loaded = await mapLimit(missing, 16, async (id) => {
      try {
        const m = await this.repo.loadManifest(id);
        return { ...summarise(m), stats: m.stats };
      } catch (err) {
        if (err instanceof NotFoundError) return undefined; // Pruned between the listing and the read.
        if (!(err instanceof IntegrityError)) throw err;
        if (!this.broken.has(id)) this.repo.warn(`${err.message}: backup ${id} is left out of the listing; every other backup is unaffected`);
        this.broken.set(id, { id, name: backupName(id), problem: err.message, kind: err instanceof UnreadableManifestError ? 'other-version' : 'damaged' });
        return undefined;
      }
    });
    for (const e of loaded) {
      if (!e) continue;
      this.entries.set(e.id, e);
      this.stamps.set(e.id, listed.get(e.id)!);
      this.broken.delete(e.id);
    }
    this.refreshedAt = started;
  }
}

/** What a listing says of a manifest: a change means its bytes may have changed. */
const stampOf = (b: ListedBackup) => `${b.size}:${b.modified ?? ''}:${b.etag ?? ''}`;

/**
 * A cache of backup summaries for services that answer many listing requests (the
 * API). The repository stays the source of truth: each refresh lists `backups/`
 * (one LIST) and loads only the manifests it has not seen, and forgets those that
 * are gone (pruned). Refreshes are at most `maxAgeMs` apart and never run twice at once.
 * Only summaries are kept: a manifest's chunk list can weigh megabytes.
 */
import { NotFoundError } from '../errors.js';
import { summarise, type BackupStats, type BackupSummary } from './manifest.js';
import { mapLimit, resolvePrefix, type Repository } from './repository.js';

export interface CatalogueEntry extends BackupSummary { stats: BackupStats }

export class Catalogue {
  private readonly entries = new Map<string, CatalogueEntry>();
  private refreshedAt = 0;
  private refreshing: Promise<void> | undefined;

  constructor(private readonly repo: Repository, private readonly maxAgeMs = 2000) {}

  /** Every backup, newest first. */
  async list(): Promise<CatalogueEntry[]> {
    await this.fresh();
    return [...this.entries.values()].sort((a, b) => b.time.localeCompare(a.time) || b.id.localeCompare(a.id));
  }

  /** One backup by id or unique prefix; NotFoundError / AMBIGUOUS otherwise. */
  async get(idOrPrefix: string): Promise<CatalogueEntry> {
    await this.fresh();
    let id: string;
    try {
      id = resolvePrefix(idOrPrefix, [...this.entries.keys()], 'backup');
    } catch {
      // A backup committed since the last refresh: look again once.
      this.refreshedAt = 0;
      await this.fresh();
      id = resolvePrefix(idOrPrefix, [...this.entries.keys()], 'backup');
    }
    return this.entries.get(id)!;
  }

  private fresh(): Promise<void> {
    if (Date.now() - this.refreshedAt < this.maxAgeMs) return Promise.resolve();
    return (this.refreshing ??= this.refresh().finally(() => { this.refreshing = undefined; }));
  }

  private async refresh(): Promise<void> {
    const started = Date.now();
    const ids = new Set(await this.repo.backupIds());
    for (const id of this.entries.keys()) if (!ids.has(id)) this.entries.delete(id);
    const missing = [...ids].filter((id) => !this.entries.has(id));
    const loaded = await mapLimit(missing, 16, async (id) => {
      try {
        const m = await this.repo.loadManifest(id);
        return { ...summarise(m), stats: m.stats };
      } catch (err) {
        if (err instanceof NotFoundError) return undefined; // Pruned between the listing and the read.
        throw err;
      }
    });
    for (const e of loaded) if (e) this.entries.set(e.id, e);
    this.refreshedAt = started;
  }
}

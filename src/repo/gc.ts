/**
 * Garbage collection: deletes the chunks no manifest references. It runs under the
 * repository's exclusive lock, so no backup is running (backups hold shared locks)
 * and every chunk a finished backup uses is in its manifest. Any manifest that
 * cannot be read aborts the collection: deleting on partial knowledge loses data.
 */
import { chunkName } from './chunk.js';
import { removeOrphanHealth } from './health.js';
import { withLock } from './locks.js';
import { mapLimit, type Repository } from './repository.js';

export interface GcReport { dryRun: boolean; backups: number; chunksTotal: number; chunksReferenced: number; chunksDeleted: number; bytesDeleted: number }

export async function collectGarbage(repo: Repository, opts: { dryRun?: boolean } = {}): Promise<GcReport> {
  return withLock(repo, 'exclusive', { purpose: 'garbage collection' }, async () => {
    const manifests = await repo.manifests();
    const referenced = new Set<string>();
    for (const m of manifests) for (const d of m.disks) for (const id of d.chunks) if (id) referenced.add(id);
    const sizes = new Map<string, number>();
    for await (const { name, size } of repo.storage.list('chunks/')) sizes.set(name, size);
    const garbage = [...sizes.keys()].filter((name) => !referenced.has(name.slice(name.lastIndexOf('/') + 1)) || chunkName(name.slice(name.lastIndexOf('/') + 1)) !== name);
    if (!opts.dryRun) await mapLimit(garbage, 16, (name) => repo.storage.delete(name));
    // Verification records of pruned backups, quarantine entries of chunks nothing uses.
    if (!opts.dryRun) await removeOrphanHealth(repo, new Set(manifests.map((m) => m.id)), referenced);
    return {
      dryRun: !!opts.dryRun,
      backups: manifests.length,
      chunksTotal: sizes.size,
      chunksReferenced: referenced.size,
      chunksDeleted: garbage.length,
      bytesDeleted: garbage.reduce((n, name) => n + sizes.get(name)!, 0),
    };
  });
}

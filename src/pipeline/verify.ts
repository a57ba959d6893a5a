/**
 * Verification. Without readData: every manifest opens and every chunk it
 * references exists. With readData: every referenced chunk is downloaded,
 * decrypted, decompressed and re-hashed. Each problem names the object and the
 * backups that depend on it.
 */
import { errorMessage } from '../errors.js';
import { chunkName } from '../repo/chunk.js';
import { backupName, type Manifest } from '../repo/manifest.js';
import type { Repository } from '../repo/repository.js';
import { ChunkPool } from './pool.js';
import { TaskWindow } from './window.js';
import { ProgressMeter, type ProgressFn } from './progress.js';
import { withReadLock } from '../repo/locks.js';

export interface VerifyProblem { object: string; problem: string; backups: string[] }
export interface VerifyReport { ok: boolean; backupsChecked: number; chunksChecked: number; readData: boolean; problems: VerifyProblem[] }

export interface VerifyOptions { backupIds?: string[]; readData?: boolean; onProgress?: ProgressFn }

/** Under a shared lock, so that garbage collection does not make chunks vanish mid-check. */
export function verify(repo: Repository, opts: VerifyOptions = {}): Promise<VerifyReport> {
  return withReadLock(repo, 'verify', () => run(repo, opts));
}

async function run(repo: Repository, opts: VerifyOptions): Promise<VerifyReport> {
  const problems: VerifyProblem[] = [];
  const manifests: Manifest[] = [];
  for (const id of opts.backupIds ?? (await repo.backupIds())) {
    try {
      manifests.push(await repo.loadManifest(id));
    } catch (err) {
      problems.push({ object: backupName(id), problem: errorMessage(err), backups: [id] });
    }
  }
  const users = new Map<string, Set<string>>();
  for (const m of manifests) {
    for (const d of m.disks) {
      for (const id of d.chunks) {
        if (id === null) continue;
        let set = users.get(id);
        if (!set) users.set(id, (set = new Set()));
        set.add(m.id);
      }
    }
  }
  const bad = (id: string, problem: string) => problems.push({ object: chunkName(id), problem, backups: [...users.get(id)!].sort() });
  const stored = await repo.chunkIds();
  const present: string[] = [];
  for (const id of users.keys()) {
    if (stored.has(id)) present.push(id);
    else bad(id, 'missing');
  }
  if (opts.readData) {
    const chunkSize = manifests[0]?.chunkSize ?? repo.chunkSize;
    const meter = new ProgressMeter('verify', present.length * chunkSize, opts.onProgress);
    const pool = new ChunkPool(repo.workerInit());
    const window = new TaskWindow(8);
    try {
      for (const id of present) {
        await window.add(async () => {
          try {
            await pool.open(id, await repo.getChunkSealed(id));
          } catch (err) {
            if ((err as { code?: string }).code !== 'INTEGRITY') throw err;
            bad(id, errorMessage(err));
          }
          meter.add(chunkSize);
        });
      }
      await window.drain();
    } finally {
      await pool.close();
    }
    meter.finish();
  }
  return { ok: problems.length === 0, backupsChecked: manifests.length, chunksChecked: users.size, readData: !!opts.readData, problems };
}

/**
 * Verification, and the healing it starts. Without readData: every manifest opens and
 * every chunk it references exists. With readData, or a subset of it (subset.ts):
 * those chunks are downloaded, decrypted, decompressed and re-hashed. Quarantined
 * chunks are always read again (they are few), since a backup may have replaced them.
 * Each problem names the object and the backups that depend on it.
 *
 * Findings are recorded (repo/health.ts): a chunk found missing or damaged goes into
 * quarantine, so the next backup that produces it uploads it again; one read intact
 * again leaves quarantine; every backup checked gets a verification record. When the
 * repository cannot be written (read-only mount or credentials), the report is still
 * complete and says, in a warning, that nothing was recorded: verify never fails for that.
 */
import { hostname } from 'node:os';
import { errorMessage } from '../errors.js';
import { chunkName, implausibleChunkSize } from '../repo/chunk.js';
import {
  newRunId, nextRecord, quarantine, quarantinedChunkIds, readQuarantine, readRecords, release, writeRecord, type QuarantineEntry,
} from '../repo/health.js';
import { backupName, type Manifest } from '../repo/manifest.js';
import { mapLimit, type Repository } from '../repo/repository.js';
import { ChunkPool, openStoredChunk } from './pool.js';
import { TaskWindow } from './window.js';
import { ProgressMeter, type ProgressFn } from './progress.js';
import { formatSubset, selectSubset, type Subset } from './subset.js';
import { withReadLock } from '../repo/locks.js';

export interface VerifyProblem { object: string; problem: string; backups: string[] }
export interface BackupVerdict { id: string; vm: string; time: string; ok: boolean; damagedDisks: string[] }
export interface VerifyReport {
  ok: boolean;
  backupsChecked: number;
  /** Chunks the checked backups reference. */
  chunksChecked: number;
  /** Of those, chunks downloaded and re-hashed. */
  chunksRead: number;
  readData: boolean;
  /** The subset read, e.g. 1/7 or 10%, when not all. */
  readDataSubset?: string;
  problems: VerifyProblem[];
  backups: BackupVerdict[];
  /** Quarantined chunks found intact again (a backup uploaded them since) and released. */
  healed: number;
  /** Whether quarantine and verification records were written. */
  recorded: boolean;
  warnings: string[];
}

export interface VerifyOptions {
  backupIds?: string[];
  readData?: boolean;
  /** Read only this subset of the chunks (ignored with readData). */
  readDataSubset?: Subset;
  onProgress?: ProgressFn;
  /** Clock, for tests. */
  now?: () => Date;
  /** For percentage subsets; tests pass a seeded one. */
  random?: () => number;
}

type Finding = { problem: QuarantineEntry['problem']; detail: string };

/** Under a shared lock, so that garbage collection does not make chunks vanish mid-check. */
export function verify(repo: Repository, opts: VerifyOptions = {}): Promise<VerifyReport> {
  return withReadLock(repo, 'verify', () => run(repo, opts));
}

/**
 * The chunks a run reads: all with readData, else its subset, plus in every mode the
 * quarantined ones (to notice those a backup has healed). Pure.
 */
export function chunksToRead(
  present: readonly string[], quarantined: ReadonlySet<string>, opts: Pick<VerifyOptions, 'readData' | 'readDataSubset' | 'random'>,
): Set<string> {
  if (opts.readData) return new Set(present);
  const out = new Set(opts.readDataSubset ? selectSubset(present, opts.readDataSubset, opts.random) : []);
  for (const id of present) if (quarantined.has(id)) out.add(id);
  return out;
}

/**
 * A chunk found missing in a directory repository may be there as something that is no
 * file (a FIFO, a symbolic link, a directory: Storage.strays): its finding says what it
 * is. One look per chunk directory that has missing chunks, however many they are.
 */
async function nameStrays(repo: Repository, found: Map<string, Finding>): Promise<void> {
  const strays = repo.storage.strays?.bind(repo.storage);
  if (!strays) return;
  const missing = [...found].filter(([, f]) => f.problem === 'missing').map(([id]) => chunkName(id));
  const dirs = [...new Set(missing.map((name) => name.slice(0, name.lastIndexOf('/') + 1)))];
  const kinds = new Map<string, string>();
  await mapLimit(dirs, 8, async (dir) => {
    for (const s of await strays(dir)) kinds.set(s.name, s.kind);
  });
  for (const [id, f] of found) {
    const kind = f.problem === 'missing' ? kinds.get(chunkName(id)) : undefined;
    if (kind) f.detail = `missing: ${chunkName(id)} is ${kind}, not a chunk vmvault wrote (move it out of the repository; the next backup that needs the chunk stores it again)`;
  }
}

async function run(repo: Repository, opts: VerifyOptions): Promise<VerifyReport> {
  const started = (opts.now ?? (() => new Date()))().toISOString();
  const problems: VerifyProblem[] = [];
  const manifests = await loadManifests(repo, opts.backupIds, problems);
  const users = chunkUsers(manifests);
  const [stored, entries] = await Promise.all([repo.storedChunks(), readQuarantine(repo)]);
  const quarantined = new Map(entries.map((e) => [e.chunk, e]));
  const found = new Map<string, Finding>();
  const present: string[] = [];
  const largest = manifests.reduce((n, m) => Math.max(n, m.chunkSize), repo.chunkSize);
  for (const id of users.keys()) {
    const size = stored.get(id);
    // A stored object of a size no sealed chunk has is damaged without reading it (an empty file after a crash).
    const implausible = size === undefined ? undefined : implausibleChunkSize(size, largest);
    if (size === undefined) found.set(id, { problem: 'missing', detail: 'missing' });
    else if (implausible) found.set(id, { problem: 'damaged', detail: implausible });
    else present.push(id);
  }
  await nameStrays(repo, found);
  const toRead = chunksToRead(present, new Set(quarantined.keys()), opts);
  // Reading everything, read the chunks no readable manifest uses too: one may belong to a
  // manifest that cannot be read or is not listed (a damaged backups/ object), and a backup
  // must not deduplicate against it damaged. Those found damaged are quarantined, not
  // reported as problems (gc would delete them anyway once every manifest reads).
  const unused = opts.readData && !opts.backupIds ? [...stored.keys()].filter((id) => !users.has(id)) : [];
  const all = [...toRead, ...unused];
  const intact = await readStoredChunks(repo, all, manifests[0]?.chunkSize ?? repo.chunkSize, found, opts.onProgress);
  const healed = [...quarantined.keys()].filter((id) => intact.has(id));
  for (const [id, f] of found) if (users.has(id)) problems.push({ object: chunkName(id), problem: f.detail, backups: [...users.get(id)!].sort() });
  const unusedDamaged = unused.filter((id) => found.has(id));
  const readData = opts.readData ? 'all' : opts.readDataSubset ? formatSubset(opts.readDataSubset) : 'none';
  const { recorded, warnings } = await record(repo, { started, readData, manifests, found, healed, quarantined });
  if (unusedDamaged.length) {
    warnings.push(`${unusedDamaged.length} chunk(s) that no readable backup uses are damaged (${unusedDamaged.slice(0, 3).map(chunkName).join(', ')}` +
      `${unusedDamaged.length > 3 ? ', …' : ''}): they were quarantined, so no new backup reuses them; "vmvault gc" deletes them once every backup manifest reads`);
  }
  return {
    ok: problems.length === 0,
    backupsChecked: manifests.length,
    chunksChecked: users.size,
    chunksRead: all.length,
    readData: !!opts.readData,
    ...(!opts.readData && opts.readDataSubset ? { readDataSubset: readData } : {}),
    problems,
    backups: manifests.map((m) => {
      const damagedDisks = m.disks.filter((d) => d.chunks.some((c) => c !== null && found.has(c))).map((d) => d.name);
      return { id: m.id, vm: m.vm, time: m.time, ok: damagedDisks.length === 0, damagedDisks };
    }),
    healed: healed.length,
    recorded,
    warnings,
  };
}

async function loadManifests(repo: Repository, ids: string[] | undefined, problems: VerifyProblem[]): Promise<Manifest[]> {
  const loaded = await mapLimit(ids ?? (await repo.backupIds()), 16, async (id) => {
    try {
      return await repo.loadManifest(id);
    } catch (err) {
      problems.push({ object: backupName(id), problem: errorMessage(err), backups: [id] });
      return undefined;
    }
  });
  return loaded.filter((m): m is Manifest => m !== undefined);
}

function chunkUsers(manifests: readonly Manifest[]): Map<string, Set<string>> {
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
  return users;
}

/** Reads and re-hashes `ids`; damaged ones go into `found`. Returns the intact ones. */
export async function readStoredChunks(repo: Repository, ids: string[], chunkSize: number, found: Map<string, Finding>, onProgress?: ProgressFn): Promise<Set<string>> {
  const intact = new Set<string>();
  if (ids.length === 0) return intact;
  const meter = new ProgressMeter('verify', ids.length * chunkSize, onProgress);
  const pool = new ChunkPool(repo.workerInit());
  const window = new TaskWindow(8);
  try {
    for (const id of ids) {
      await window.add(async () => {
        try {
          (await openStoredChunk(repo, pool, id)).release();
          intact.add(id);
        } catch (err) {
          if ((err as { code?: string }).code !== 'INTEGRITY') throw err;
          // getChunkSealedInto says INTEGRITY for a chunk deleted since the listing too.
          found.set(id, { problem: (await repo.storage.stat(chunkName(id))) ? 'damaged' : 'missing', detail: errorMessage(err) });
        }
        meter.add(chunkSize);
      });
    }
    await window.drain();
  } finally {
    await pool.close();
  }
  meter.finish();
  return intact;
}

interface Outcome {
  started: string;
  readData: string;
  manifests: readonly Manifest[];
  found: ReadonlyMap<string, Finding>;
  healed: readonly string[];
  quarantined: ReadonlyMap<string, QuarantineEntry>;
}

/** Writes the findings; any failure to write becomes a warning (the report stands). */
async function record(repo: Repository, o: Outcome): Promise<{ recorded: boolean; warnings: string[] }> {
  const host = hostname();
  try {
    const fresh = [...o.found].filter(([id]) => !o.quarantined.has(id))
      .map(([chunk, f]): QuarantineEntry => ({ chunk, found: o.started, problem: f.problem, detail: f.detail, host }));
    await quarantine(repo, fresh);
    await release(repo, o.healed);
    const previous = await readRecords(repo, new Set(o.manifests.map((m) => m.id)));
    // Listed after the records: a concurrent run quarantines before it writes a record, so
    // every finding in a record read above is in this list unless a backup healed it since.
    const now = await quarantinedChunkIds(repo);
    const stillQuarantined = (c: string) => o.found.has(c) || now.has(c);
    const run = newRunId();
    await mapLimit(o.manifests, 8, async (m) => {
      const found = new Map(m.disks.map((d) => [d.name, new Set(d.chunks.filter((c): c is string => c !== null && o.found.has(c)))]));
      const prev = previous.get(m.id) ?? [];
      const rec = nextRecord({
        backup: m.id, run, time: o.started, host, readData: o.readData, disks: m.disks.map((d) => d.name),
        found, previous: prev.map((p) => p.record), quarantined: stillQuarantined,
      });
      await writeRecord(repo, rec, prev.map((p) => p.name));
    });
    return { recorded: true, warnings: [] };
  } catch (err) {
    return {
      recorded: false,
      warnings: [`the results could not be recorded in the repository (${errorMessage(err)}): the report is complete, but quarantine and ` +
        'verification states may not show them, so the next backups may still reuse damaged chunks. If the repository is read-only here, ' +
        'run verify again where it can be written'],
    };
  }
}

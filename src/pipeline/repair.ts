/**
 * Repair: which backups are damaged beyond healing, and, when asked, their removal.
 *
 * A backup that references a quarantined chunk heals by itself when a later backup
 * produces that chunk again (repo/health.ts). It is beyond healing once that is not
 * to be expected: every disk whose backups use the chunk (a VM's disk, by name: a VM's
 * disks may be backed up one at a time) has been backed up since the chunk was
 * quarantined, and none of those backups produced it (one that had would have taken it
 * out of quarantine). A backup whose manifest cannot be opened is beyond healing too.
 * Only what verify has recorded counts: run `verify --read-data` first for the full
 * picture. Quarantined chunks are read again first, as verify does: an entry a chunk
 * has outlived (put back, or uploaded by a backup racing verify) decides nothing, and
 * `--remove` releases it. Deciding is a pure function.
 */
import { IntegrityError, NotFoundError } from '../errors.js';
import { readQuarantine, release, type QuarantineEntry } from '../repo/health.js';
import { withReadLock } from '../repo/locks.js';
import { readStoredChunks } from './verify.js';
import { UnreadableManifestError, type Manifest } from '../repo/manifest.js';
import { mapLimit, type Repository } from '../repo/repository.js';

export type RepairBackup = Pick<Manifest, 'id' | 'vm' | 'time'> & { disks: { name: string; chunks: (string | null)[] }[] };

export interface RepairVerdict {
  id: string;
  vm?: string;
  time?: string;
  /** False: beyond healing, removed by `repair --remove`. */
  healable: boolean;
  /** Its manifest authenticates but this vmvault cannot read it (another version's format): never removed, whatever `healable` says of its chunks. */
  otherVersion?: true;
  /** Why, in words an operator can act on. */
  reason: string;
  damagedDisks: string[];
  damagedChunks: number;
}

export interface RepairReport {
  /** Damaged backups only, beyond healing first. */
  backups: RepairVerdict[];
  /** Ids removed (with `remove`). */
  removed: string[];
  /** Chunks still quarantined: read again, and damaged or missing still (or used by no backup). */
  quarantinedChunks: number;
  /** Quarantined chunks read intact again (put back, or uploaded again since verify): no backup is judged by them. */
  intactAgain: number;
  /** Of those, taken out of quarantine (with `remove`). */
  released?: number;
}

const short = (id: string) => id.slice(0, 12);

export function planRepair(
  backups: readonly RepairBackup[], unreadable: readonly { id: string; problem: string; otherVersion?: boolean }[], quarantine: readonly QuarantineEntry[],
): RepairVerdict[] {
  const entries = new Map(quarantine.map((e) => [e.chunk, e]));
  // By disk: "VM/disk". A backup of one disk says nothing of the VM's other disks.
  const diskKey = (vm: string, disk: string) => `${vm}/${disk}`;
  const latest = new Map<string, number>();
  const disksOf = new Map<string, Set<string>>();
  for (const b of backups) {
    for (const d of b.disks) {
      const key = diskKey(b.vm, d.name);
      latest.set(key, Math.max(latest.get(key) ?? -Infinity, Date.parse(b.time)));
      for (const c of d.chunks) if (c !== null && entries.has(c)) disksOf.set(c, (disksOf.get(c) ?? new Set()).add(key));
    }
  }
  // A chunk cannot heal when every disk using it has a backup that started after it was quarantined.
  const hopeless = (c: string) => [...disksOf.get(c)!].every((key) => latest.get(key)! > Date.parse(entries.get(c)!.found));
  const out: RepairVerdict[] = unreadable.map((u) => (u.otherVersion
    ? { id: u.id, healable: true, otherVersion: true as const, reason: `kept: ${u.problem}`, damagedDisks: [], damagedChunks: 0 }
    : { id: u.id, healable: false, reason: `its manifest cannot be opened (${u.problem})`, damagedDisks: [], damagedChunks: 0 }));
  for (const b of backups) {
    const damaged = new Set<string>();
    const damagedDisks = b.disks.filter((d) => {
      const mine = d.chunks.filter((c): c is string => c !== null && entries.has(c));
      mine.forEach((c) => damaged.add(c));
      return mine.length > 0;
    }).map((d) => d.name);
    if (damaged.size === 0) continue;
    const lost = [...damaged].filter(hopeless);
    const sources = [...new Set([...damaged].flatMap((c) => [...disksOf.get(c)!]))].sort().map((k) => `disk ${k.slice(k.indexOf('/') + 1)} of ${k.slice(0, k.indexOf('/'))}`);
    const first = entries.get(lost[0] ?? [...damaged][0]!)!;
    const reason = lost.length
      ? `${lost.length} of its ${damaged.size} damaged chunk(s) (e.g. ${short(first.chunk)}, ${first.problem} since ${first.found}) were not produced again by the backups of ${sources.join(', ')} taken since: no source is expected to have them`
      : `${damaged.size} chunk(s) (e.g. ${short(first.chunk)}, ${first.problem} since ${first.found}) may come back with the next backup of ${sources.join(', ')}`;
    out.push({ id: b.id, vm: b.vm, time: b.time, healable: lost.length === 0, reason, damagedDisks, damagedChunks: damaged.size });
  }
  return out.sort((a, b) => Number(a.healable) - Number(b.healable) || (a.time ?? '').localeCompare(b.time ?? '') || a.id.localeCompare(b.id));
}

export async function repair(repo: Repository, opts: { remove?: boolean } = {}): Promise<RepairReport> {
  // A shared lock: gc does not delete chunks while the quarantined ones are read again.
  return withReadLock(repo, 'repair', () => run(repo, opts));
}

async function run(repo: Repository, opts: { remove?: boolean }): Promise<RepairReport> {
  const unreadable: { id: string; problem: string }[] = [];
  const loaded = await mapLimit(await repo.backupIds(), 16, async (id) => {
    try {
      return await repo.loadManifest(id);
    } catch (err) {
      if (err instanceof NotFoundError) return undefined; // deleted meanwhile
      // Only damage counts: a network error says nothing about the backup.
      if (!(err instanceof IntegrityError)) throw err;
      unreadable.push({ id, problem: err.message, ...(err instanceof UnreadableManifestError ? { otherVersion: true } : {}) });
      return undefined;
    }
  });
  const manifests = loaded.filter((m): m is Manifest => m !== undefined);
  const entries = await readQuarantine(repo);
  // The quarantined chunks some backup uses, read again: one intact now is no damage.
  const quarantined = new Set(entries.map((e) => e.chunk));
  const used = new Set<string>();
  for (const m of manifests) for (const d of m.disks) for (const c of d.chunks) if (c !== null && quarantined.has(c)) used.add(c);
  const intact = await readStoredChunks(repo, [...used], repo.chunkSize, new Map());
  const quarantine = entries.filter((e) => !intact.has(e.chunk));
  const backups = planRepair(manifests, unreadable, quarantine);
  const removed = opts.remove ? backups.filter((b) => !b.healable && !b.otherVersion).map((b) => b.id) : [];
  await mapLimit(removed, 8, (id) => repo.deleteManifest(id));
  // Listing only reads (a read-only repository too); --remove writes, and takes intact chunks out of quarantine.
  if (opts.remove && intact.size) await release(repo, [...intact]);
  return { backups, removed, quarantinedChunks: quarantine.length, intactAgain: intact.size, ...(opts.remove ? { released: intact.size } : {}) };
}

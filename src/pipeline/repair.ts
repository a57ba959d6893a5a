/**
 * Repair: which backups are damaged beyond healing, and, when asked, their removal.
 *
 * A backup that references a quarantined chunk heals by itself when a later backup
 * produces that chunk again (repo/health.ts). It is beyond healing once that is not
 * to be expected: every VM whose backups use the chunk has been backed up since the
 * chunk was quarantined, and none of those backups produced it (one that had would
 * have taken it out of quarantine). A backup whose manifest cannot be opened is beyond
 * healing too. Only what verify has recorded counts: run `verify --read-data` first
 * for the full picture. Deciding is a pure function; removal is the only I/O.
 */
import { IntegrityError, NotFoundError } from '../errors.js';
import { readQuarantine, type QuarantineEntry } from '../repo/health.js';
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
  quarantinedChunks: number;
}

const short = (id: string) => id.slice(0, 12);

export function planRepair(
  backups: readonly RepairBackup[], unreadable: readonly { id: string; problem: string; otherVersion?: boolean }[], quarantine: readonly QuarantineEntry[],
): RepairVerdict[] {
  const entries = new Map(quarantine.map((e) => [e.chunk, e]));
  const latest = new Map<string, number>();
  const vmsOf = new Map<string, Set<string>>();
  for (const b of backups) {
    latest.set(b.vm, Math.max(latest.get(b.vm) ?? -Infinity, Date.parse(b.time)));
    for (const d of b.disks) for (const c of d.chunks) if (c !== null && entries.has(c)) vmsOf.set(c, (vmsOf.get(c) ?? new Set()).add(b.vm));
  }
  // A chunk cannot heal when every VM using it has a backup that started after it was quarantined.
  const hopeless = (c: string) => [...vmsOf.get(c)!].every((vm) => latest.get(vm)! > Date.parse(entries.get(c)!.found));
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
    const vms = [...new Set([...damaged].flatMap((c) => [...vmsOf.get(c)!]))].sort();
    const first = entries.get(lost[0] ?? [...damaged][0]!)!;
    const reason = lost.length
      ? `${lost.length} of its ${damaged.size} damaged chunk(s) (e.g. ${short(first.chunk)}, ${first.problem} since ${first.found}) were not produced again by the backups of ${vms.join(', ')} taken since: no source is expected to have them`
      : `${damaged.size} chunk(s) (e.g. ${short(first.chunk)}, ${first.problem} since ${first.found}) may come back with the next backup of ${vms.join(', ')}`;
    out.push({ id: b.id, vm: b.vm, time: b.time, healable: lost.length === 0, reason, damagedDisks, damagedChunks: damaged.size });
  }
  return out.sort((a, b) => Number(a.healable) - Number(b.healable) || (a.time ?? '').localeCompare(b.time ?? '') || a.id.localeCompare(b.id));
}

export async function repair(repo: Repository, opts: { remove?: boolean } = {}): Promise<RepairReport> {
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
  const quarantine = await readQuarantine(repo);
  const backups = planRepair(loaded.filter((m): m is Manifest => m !== undefined), unreadable, quarantine);
  const removed = opts.remove ? backups.filter((b) => !b.healable && !b.otherVersion).map((b) => b.id) : [];
  await mapLimit(removed, 8, (id) => repo.deleteManifest(id));
  return { backups, removed, quarantinedChunks: quarantine.length };
}

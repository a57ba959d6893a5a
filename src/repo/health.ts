/**
 * Repository health: what verify found, kept beside the backups without touching
 * their manifests (immutable, written last). Two kinds of sealed objects:
 *
 * - Quarantine, `health/chunks/<chunk id>`: one per chunk a verify found missing or
 *   damaged. A backup never deduplicates against a quarantined chunk
 *   (Repository.chunkIndex): the next backup that produces it uploads it again,
 *   over the damaged object (storage puts replace), and then deletes the entry. That
 *   heals every backup referencing the chunk at once. A verify that reads a
 *   quarantined chunk intact deletes its entry too.
 * - Verification records, `health/backups/<backup id>/<run id>`: one per backup per
 *   verify run: when, what was read, and which chunks of each disk were damaged. A run
 *   carries the still-quarantined findings of the records it replaces into its own
 *   and only then deletes them, so concurrent runs never lose a finding (each deletes
 *   only records it has merged). Readers merge a backup's records and keep only the
 *   chunks still quarantined, so a healed backup reads ok with no record rewritten.
 *
 * - Drill records, `health/backups/<backup id>/drill/<run id>`: what a restore drill
 *   (vm/drill.ts) found when it booted the backup: `boot-verified` or `boot-failed`
 *   with the reason. The newest counts; a drill deletes the older ones after writing.
 *
 * No object is shared and rewritten (no read-modify-write): two verifies, or a verify
 * and a backup, may run at once on different hosts. The worst a race leaves is a
 * stale quarantine entry for a chunk already re-uploaded, which costs one more upload
 * or is cleared by the next verify that reads it. Names carry only chunk and backup
 * ids, which the storage sees anyway. Records go with their backup
 * (Repository.deleteManifest), and gc removes any left over (removeOrphanHealth).
 */
import { randomBytes } from 'node:crypto';
import * as z from 'zod';
import { IntegrityError, NotFoundError, errorMessage } from '../errors.js';
import { additionalData, open, seal } from '../crypto/seal.js';
import type { Storage } from '../storage/storage.js';
import { isChunkId } from './chunk.js';
import { RECORD_READ_BUDGET, SMALL_OBJECT_MAX_BYTES, VERIFICATION_RECORD_MAX_BYTES } from './object-limits.js';
import { ByteBudget } from '../byte-budget.js';

/** What this module needs of a repository (Repository has it). */
export interface HealthRepo {
  readonly id: string;
  readonly keys: { readonly encKey: Uint8Array };
  readonly storage: Storage;
}

const CHUNKS = 'health/chunks/';
const BACKUPS = 'health/backups/';
const hex64 = z.string().regex(/^[0-9a-f]{64}$/);

const quarantineSchema = z.object({
  chunk: hex64,
  /** When the verify that found it recorded it. */
  found: z.string(),
  problem: z.enum(['missing', 'damaged']),
  detail: z.string(),
  host: z.string(),
});
export type QuarantineEntry = z.infer<typeof quarantineSchema>;

const recordSchema = z.object({
  backup: hex64,
  run: z.string(),
  time: z.string(),
  host: z.string(),
  /** What the run read: none, all, or a subset such as 1/7 or 10%. */
  readData: z.string(),
  disks: z.array(z.object({ name: z.string(), damaged: z.array(hex64) })),
});
export type VerificationRecord = z.infer<typeof recordSchema>;

const drillSchema = z.object({
  backup: hex64,
  run: z.string(),
  time: z.string(),
  host: z.string(),
  status: z.enum(['boot-verified', 'boot-failed']),
  /** Why it failed (boot-failed only). */
  reason: z.string().optional(),
  /** How success was decided, e.g. `serial "login:"`, `guest-ping`, `tcp 22`. */
  probe: z.string(),
  seconds: z.number(),
});
export type DrillRecord = z.infer<typeof drillSchema>;

/** The newest restore drill of a backup, as listings show it. */
export type BootState = Omit<DrillRecord, 'backup' | 'run'>;

/** A backup's verification state, as listings show it. */
export interface VerificationState {
  /** The newest verify or drill of this backup. */
  lastVerified: string;
  /** What the last verify read: none (existence only, or no verify but a drill), all, or a subset such as 1/7. */
  readData: string;
  /**
   * damaged while a chunk it uses is quarantined; otherwise the newest drill's result
   * when it was drilled (boot-verified, boot-failed), else ok.
   */
  status: 'ok' | 'damaged' | 'boot-verified' | 'boot-failed';
  /** The newest restore drill, if any. */
  boot?: BootState;
  /** Disks with at least one chunk still missing or damaged. */
  damagedDisks: string[];
  damagedChunks: number;
}

export const quarantineName = (chunk: string) => `${CHUNKS}${chunk}`;
const recordName = (backup: string, run: string) => `${BACKUPS}${backup}/${run}`;

export function newRunId(): string {
  return randomBytes(8).toString('hex');
}

function sealed(repo: HealthRepo, name: string, value: unknown): Uint8Array {
  return seal(repo.keys.encKey, 'health', Buffer.from(JSON.stringify(value)), additionalData(repo.id, 'health', name));
}

/**
 * The object's content; undefined when it is gone (deleted meanwhile). Throws IntegrityError
 * when damaged, or larger than `maxBytes` (then it is not read: repo/object-limits.ts).
 */
async function opened<T>(repo: HealthRepo, name: string, schema: z.ZodType<T>, maxBytes: number): Promise<T | undefined> {
  let raw: Uint8Array;
  try {
    raw = await repo.storage.get(name, { maxBytes });
  } catch (err) {
    if (err instanceof NotFoundError) return undefined;
    throw err;
  }
  const plain = open(repo.keys.encKey, 'health', raw, additionalData(repo.id, 'health', name), name);
  let parsed: unknown;
  try {
    parsed = JSON.parse(plain.toString('utf8'));
  } catch {
    throw new IntegrityError(`${name} is damaged: it is not valid JSON`);
  }
  const r = schema.safeParse(parsed);
  if (!r.success) throw new IntegrityError(`${name} is not a valid health object: ${r.error.issues[0]?.message ?? 'unknown shape'}`);
  return r.data;
}

async function eachLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

// ---- quarantine ----

/** Ids of the quarantined chunks: one LIST, names only. */
export async function quarantinedChunkIds(repo: HealthRepo): Promise<Set<string>> {
  const ids = new Set<string>();
  for await (const { name } of repo.storage.list(CHUNKS)) {
    const id = name.slice(CHUNKS.length);
    if (isChunkId(id)) ids.add(id);
  }
  return ids;
}

/**
 * Every quarantine entry. One that cannot be opened still quarantines its chunk (its
 * name says which): it reads as damaged, found at the epoch.
 */
export async function readQuarantine(repo: HealthRepo): Promise<QuarantineEntry[]> {
  const ids = [...(await quarantinedChunkIds(repo))];
  const out: QuarantineEntry[] = [];
  await eachLimit(ids, 16, async (chunk) => {
    try {
      const e = await opened(repo, quarantineName(chunk), quarantineSchema, SMALL_OBJECT_MAX_BYTES);
      if (e) out.push(e);
    } catch (err) {
      if (!(err instanceof IntegrityError)) throw err;
      out.push({ chunk, found: new Date(0).toISOString(), problem: 'damaged', detail: `its quarantine entry is unreadable (${errorMessage(err)})`, host: '' });
    }
  });
  return out.sort((a, b) => a.chunk.localeCompare(b.chunk));
}

export async function quarantine(repo: HealthRepo, entries: readonly QuarantineEntry[]): Promise<void> {
  await eachLimit(entries, 16, (e) => repo.storage.put(quarantineName(e.chunk), sealed(repo, quarantineName(e.chunk), e)));
}

/** Takes chunks out of quarantine: they were uploaded again, or read intact. */
export async function release(repo: HealthRepo, chunks: readonly string[]): Promise<void> {
  await eachLimit(chunks, 16, (c) => repo.storage.delete(quarantineName(c)));
}

// ---- verification records ----

export interface StoredRecord { name: string; record: VerificationRecord }

/**
 * The verification records of `backups` (all when undefined), by backup id. Records
 * that cannot be opened are skipped: they are advice, and the next run replaces them.
 * `cache` keeps records by name across calls (a record never changes once written).
 */
export async function readRecords(
  repo: HealthRepo, backups?: ReadonlySet<string>, cache?: Map<string, VerificationRecord>,
): Promise<Map<string, StoredRecord[]>> {
  const names: string[] = [];
  const sizes = new Map<string, number>();
  for await (const { name, size } of repo.storage.list(BACKUPS)) {
    const [backup, run, extra] = name.slice(BACKUPS.length).split('/');
    if (backup && run && extra === undefined && isChunkId(backup) && (!backups || backups.has(backup))) {
      names.push(name);
      sizes.set(name, size);
    }
  }
  const out = new Map<string, StoredRecord[]>();
  const seen = new Set(names);
  for (const name of cache?.keys() ?? []) if (!seen.has(name)) cache!.delete(name);
  // Each record is bounded; together, as manifests, they stay within a byte budget.
  const budget = new ByteBudget(RECORD_READ_BUDGET);
  await eachLimit(names, 16, async (name) => {
    let record = cache?.get(name);
    if (!record) {
      try {
        record = await budget.run(sizes.get(name) ?? 0, () => opened(repo, name, recordSchema, VERIFICATION_RECORD_MAX_BYTES));
      } catch (err) {
        if (!(err instanceof IntegrityError)) throw err;
      }
      if (!record || name !== recordName(record.backup, record.run)) return;
      cache?.set(name, record);
    }
    const list = out.get(record.backup) ?? [];
    list.push({ name, record });
    out.set(record.backup, list);
  });
  return out;
}

export interface NextRecordInput {
  backup: string;
  run: string;
  time: string;
  host: string;
  readData: string;
  /** Every disk of the backup, in manifest order. */
  disks: readonly string[];
  /** Chunks this run found missing or damaged, by disk. */
  found: ReadonlyMap<string, ReadonlySet<string>>;
  /** The backup's records this one replaces. */
  previous: readonly VerificationRecord[];
  /** Whether a chunk is still in quarantine after this run. */
  quarantined: (chunk: string) => boolean;
}

/** A run's record for one backup: its own findings plus the earlier ones still quarantined. */
export function nextRecord(i: NextRecordInput): VerificationRecord {
  return {
    backup: i.backup, run: i.run, time: i.time, host: i.host, readData: i.readData,
    disks: i.disks.map((name) => {
      const damaged = new Set(i.found.get(name) ?? []);
      for (const p of i.previous) {
        for (const d of p.disks) if (d.name === name) for (const c of d.damaged) if (i.quarantined(c)) damaged.add(c);
      }
      return { name, damaged: [...damaged].sort() };
    }),
  };
}

/** Writes `record`, then deletes the records it replaces (in that order: a crash between leaves both, which readers merge). */
export async function writeRecord(repo: HealthRepo, record: VerificationRecord, replaces: readonly string[]): Promise<void> {
  const name = recordName(record.backup, record.run);
  await repo.storage.put(name, sealed(repo, name, record));
  await eachLimit(replaces.filter((n) => n !== name), 4, (n) => repo.storage.delete(n));
}

/**
 * A backup's state from its records: the newest says when and what was read; a chunk
 * any of them found damaged counts while it is still quarantined.
 */
export function verificationState(records: readonly VerificationRecord[], quarantined: ReadonlySet<string>): VerificationState | undefined {
  if (records.length === 0) return undefined;
  const newest = records.reduce((a, b) => (b.time > a.time ? b : a));
  const byDisk = new Map<string, Set<string>>();
  for (const r of records) {
    for (const d of r.disks) {
      const still = d.damaged.filter((c) => quarantined.has(c));
      if (still.length === 0) continue;
      const set = byDisk.get(d.name) ?? new Set<string>();
      still.forEach((c) => set.add(c));
      byDisk.set(d.name, set);
    }
  }
  const damagedChunks = new Set([...byDisk.values()].flatMap((s) => [...s])).size;
  return {
    lastVerified: newest.time,
    readData: newest.readData,
    status: damagedChunks ? 'damaged' : 'ok',
    damagedDisks: newest.disks.map((d) => d.name).filter((n) => byDisk.has(n)),
    damagedChunks,
  };
}

/** Verification state of every backup (of `backups`, when given) that has one. */
export async function verificationStates(
  repo: HealthRepo, backups?: ReadonlySet<string>, cache?: Map<string, VerificationRecord>,
): Promise<Map<string, VerificationState>> {
  const [records, quarantined, drills] = await Promise.all([readRecords(repo, backups, cache), quarantinedChunkIds(repo), readDrills(repo, backups)]);
  const out = new Map<string, VerificationState>();
  for (const id of new Set([...records.keys(), ...drills.keys()])) {
    const s = withDrill(verificationState((records.get(id) ?? []).map((r) => r.record), quarantined), drills.get(id)?.record);
    if (s) out.set(id, s);
  }
  return out;
}

/** A verify's state with the newest drill merged in (see VerificationState.status). */
export function withDrill(state: VerificationState | undefined, drill: DrillRecord | undefined): VerificationState | undefined {
  if (!drill) return state;
  const { backup: _b, run: _r, ...boot } = drill;
  const base = state ?? { lastVerified: drill.time, readData: 'none', status: 'ok' as const, damagedDisks: [], damagedChunks: 0 };
  return {
    ...base, boot,
    lastVerified: drill.time > base.lastVerified ? drill.time : base.lastVerified,
    status: base.status === 'damaged' ? 'damaged' : drill.status,
  };
}

// ---- drill records ----

const drillPrefix = (backup: string) => `${BACKUPS}${backup}/drill/`;

/** The newest drill record of each backup (of `backups`, when given), with its object name. */
export async function readDrills(repo: HealthRepo, backups?: ReadonlySet<string>): Promise<Map<string, { name: string; record: DrillRecord }>> {
  const names: string[] = [];
  for await (const { name } of repo.storage.list(BACKUPS)) {
    const [backup, kind, run, extra] = name.slice(BACKUPS.length).split('/');
    if (backup && kind === 'drill' && run && extra === undefined && isChunkId(backup) && (!backups || backups.has(backup))) names.push(name);
  }
  const out = new Map<string, { name: string; record: DrillRecord }>();
  await eachLimit(names, 16, async (name) => {
    let record: DrillRecord | undefined;
    try {
      record = await opened(repo, name, drillSchema, SMALL_OBJECT_MAX_BYTES);
    } catch (err) {
      if (!(err instanceof IntegrityError)) throw err; // Advice, like verification records: an unreadable one is skipped.
    }
    if (!record || name !== `${drillPrefix(record.backup)}${record.run}`) return;
    const have = out.get(record.backup);
    if (!have || record.time > have.record.time) out.set(record.backup, { name, record });
  });
  return out;
}

/** Writes a drill's record, then deletes the backup's older drill records (a crash between leaves both; the newest counts). */
export async function writeDrill(repo: HealthRepo, record: DrillRecord): Promise<void> {
  const name = `${drillPrefix(record.backup)}${record.run}`;
  const older: string[] = [];
  for await (const o of repo.storage.list(drillPrefix(record.backup))) if (o.name !== name) older.push(o.name);
  await repo.storage.put(name, sealed(repo, name, drillSchema.parse(record)));
  await eachLimit(older, 4, (n) => repo.storage.delete(n));
}

/**
 * States for a service that answers many listings (the API): refreshed at most every
 * `maxAgeMs` (two LISTs), loading only records it has not seen.
 */
export class VerificationCache {
  private readonly records = new Map<string, VerificationRecord>();
  private states: Promise<Map<string, VerificationState>> | undefined;
  private at = 0;

  constructor(private readonly repo: HealthRepo, private readonly maxAgeMs = 2000) {}

  get(): Promise<Map<string, VerificationState>> {
    if (!this.states || Date.now() - this.at >= this.maxAgeMs) {
      this.at = Date.now();
      const next = verificationStates(this.repo, undefined, this.records);
      // A failed refresh is not kept: the next request tries again.
      next.catch(() => { if (this.states === next) this.states = undefined; });
      this.states = next;
    }
    return this.states;
  }
}

// ---- removal ----

/** Deletes a backup's verification records (its manifest is gone). */
export async function removeVerification(repo: HealthRepo, backup: string): Promise<void> {
  const names: string[] = [];
  for await (const { name } of repo.storage.list(`${BACKUPS}${backup}/`)) names.push(name);
  await eachLimit(names, 8, (n) => repo.storage.delete(n));
}

/**
 * For gc (which holds the exclusive lock, so no verify is writing): deletes records of
 * backups that no longer exist and quarantine entries of chunks no backup references.
 * Returns how many objects it deleted.
 */
export async function removeOrphanHealth(repo: HealthRepo, backups: ReadonlySet<string>, referenced: ReadonlySet<string>): Promise<number> {
  const gone: string[] = [];
  for await (const { name } of repo.storage.list('health/')) {
    if (name.startsWith(CHUNKS)) {
      if (!referenced.has(name.slice(CHUNKS.length))) gone.push(name);
    } else if (name.startsWith(BACKUPS)) {
      if (!backups.has(name.slice(BACKUPS.length).split('/')[0]!)) gone.push(name);
    }
  }
  await eachLimit(gone, 16, (n) => repo.storage.delete(n));
  return gone.length;
}

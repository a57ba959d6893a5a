/**
 * Copies backups from one repository to another (an off-site copy: restic's `copy`,
 * Proxmox Backup Server's sync jobs). The two repositories have their own keys, so
 * their chunk ids differ for the same data: each chunk is read from the source,
 * authenticated and re-hashed there (openChunk), named with the destination's id key,
 * sealed with its key and uploaded unless the destination has it (its chunk index,
 * then one stat, as a backup does). A copy keeps its backup's id, so that what the
 * two repositories share can be told at a glance, and so that the copies already made
 * say how the source's chunk ids map to the destination's: a VM's next backup is
 * copied by reading only the chunks the copied backup nearest to it in time does not
 * have (bounded by that disk, like an incremental backup), the others taken on the
 * destination's word after one stat. A run copies, per VM, the backups newer than the
 * newest one the destination has (as Proxmox Backup Server's sync does), so that what
 * the destination's own retention pruned is not copied again; backups named by id are
 * copied whatever their age.
 *
 * Commits as a backup does: the chunks first, then their index entries, then the
 * manifest, under the destination's shared lock (gc cannot delete what the copy
 * reuses) and the source's read lock. A chunk the source cannot produce (missing,
 * damaged) fails that backup's copy, naming it: nothing of it is committed, and the
 * run goes on with the next backup (and reports the failure at its end). A backup
 * named by id that the destination lists but cannot read (its manifest damaged there)
 * is copied again, which puts back a good manifest. A copy carries no dirty bitmap or
 * file stamp: those speak of the source's chain, and the first backup made into the
 * destination itself reads its disks in full.
 */
import { IntegrityError, NotFoundError, VmvaultError } from '../errors.js';
import { chunkId } from '../crypto/chunk-id.js';
import { openChunk, sealChunk, sealedChunkBound } from '../repo/chunk.js';
import type { ChunkIndex } from '../repo/chunk-index.js';
import { withLock, withReadLock, type HeldLock } from '../repo/locks.js';
import { UnreadableManifestError, type BackupSummary, type DiskEntry, type Manifest } from '../repo/manifest.js';
import { mapLimit, resolvePrefix, type Repository } from '../repo/repository.js';

/** Chunks read, sealed and uploaded at once (each needs three chunk-sized buffers). */
const IN_FLIGHT = 4;

export interface CopyOptions {
  /** Backups to copy, by id or unique prefix; none: every backup (of `vms`, when given). */
  ids?: readonly string[];
  /** Only these VMs' backups. */
  vms?: readonly string[];
  signal?: AbortSignal;
  /** Called after each backup copied or skipped. */
  onBackup?: (b: CopiedBackup | SkippedBackup) => void;
}

export interface CopiedBackup {
  id: string;
  vm: string;
  time: string;
  /** Chunks read from the source (decrypted and re-hashed). */
  chunksRead: number;
  /** Of those, chunks the destination did not have: sealed and uploaded. */
  chunksUploaded: number;
  bytesUploaded: number;
  /** Chunks known from a copy made before (the destination's word, checked by one stat each): not read. */
  chunksKnown: number;
  /** The destination had this backup, but its manifest there could not be read: the copy replaced it. */
  replaced?: true;
}

/**
 * A backup not copied, and why. `failed`: the source cannot produce it (its manifest or
 * one of its chunks cannot be read): worth a look, and the run's exit status says so.
 * Otherwise the destination has it, or a newer backup of its VM (the destination's
 * retention pruned it, or it was never wanted there), or it was pruned meanwhile.
 */
export interface SkippedBackup { id: string; vm?: string; time?: string; skipped: string; failed: boolean }

export interface CopyResult { copied: CopiedBackup[]; skipped: SkippedBackup[] }

export async function copyBackups(from: Repository, to: Repository, opts: CopyOptions = {}): Promise<CopyResult> {
  if (from.id === to.id) {
    throw new VmvaultError('BAD_INPUT', `the source and the destination are the same repository (${from.id.slice(0, 12)}): a copy needs another one`);
  }
  if (from.chunkSize !== to.chunkSize) {
    throw new VmvaultError('BAD_INPUT', `the source repository's chunks are ${from.chunkSize} bytes and the destination's ${to.chunkSize}: ` +
      'a copy keeps chunk boundaries; make the destination with "vmvault init --chunk-size" equal to the source\'s; nothing was copied');
  }
  return withReadLock(from, 'copy (source)', () =>
    withLock(to, 'shared', { purpose: `copy from repository ${from.id.slice(0, 12)}` }, (lock) => run(from, to, opts, lock)));
}

async function run(from: Repository, to: Repository, opts: CopyOptions, lock: HeldLock): Promise<CopyResult> {
  const sourceIds = await from.backupIds();
  const listed = new Set(await to.backupIds());
  const chosen = new Set((opts.ids ?? []).map((p) => resolvePrefix(p, sourceIds, 'backup')));
  // What the destination has: a backup named by id is also read there, and copied again
  // when its manifest cannot be read, which puts a good one back (the others are taken
  // on the listing's word: reading every manifest at each run would cost too much). One
  // another vmvault wrote (it authenticates) is never replaced.
  const have = new Set(listed);
  await mapLimit([...chosen].filter((id) => listed.has(id)), 8, async (id) => {
    try {
      await to.loadManifest(id);
    } catch (err) {
      if (err instanceof IntegrityError && !(err instanceof UnreadableManifestError)) have.delete(id);
      else if (!(err instanceof NotFoundError || err instanceof IntegrityError)) throw err;
    }
  });
  const result: CopyResult = { copied: [], skipped: [] };
  const skip = (s: SkippedBackup) => {
    result.skipped.push(s);
    opts.onBackup?.(s);
  };
  // Summaries select and order; each manifest is read whole only when its turn comes.
  const summaries = await from.backupSummaries(sourceIds);
  const readable = new Set(summaries.map((s) => s.id));
  // A manifest that cannot be read is not copied, and said so: "every backup" must not
  // quietly mean fewer. (Gone since the listing: pruned, nothing to say.)
  for (const id of chosen.size ? chosen : opts.vms?.length ? [] : sourceIds) {
    if (readable.has(id)) continue;
    const problem = await from.loadManifest(id).then(() => undefined, (err: unknown) => {
      if (err instanceof NotFoundError) return null;
      if (err instanceof IntegrityError) return err.message;
      throw err;
    });
    if (problem) skip({ id, skipped: problem, failed: true });
  }
  const wanted = summaries
    .filter((m) => (!chosen.size || chosen.has(m.id)) && (!opts.vms?.length || opts.vms.includes(m.vm)))
    .sort((a, b) => a.vm.localeCompare(b.vm) || a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  if (opts.vms?.length) {
    const found = new Set(wanted.map((m) => m.vm));
    const unknown = opts.vms.filter((vm) => !found.has(vm));
    if (unknown.length) throw new NotFoundError(`the source repository has no backup of ${unknown.map((v) => `"${v}"`).join(', ')}${chosen.size ? ' among those given' : ''}; nothing was copied`);
  }
  // What the destination's backups are, once (the chunk maps below look for pairs among them).
  const inDestination = await to.backupSummaries([...listed]);
  const inSource = new Set(sourceIds);
  // Per VM, the newest backup the destination has: older ones are not copied again unless named.
  const newest = new Map<string, string>();
  for (const s of summaries) if (have.has(s.id) && s.time > (newest.get(s.vm) ?? '')) newest.set(s.vm, s.time);
  const known = await to.chunkIndex({ beforeWrite: () => lock.check() });
  const slots = Array.from({ length: IN_FLIGHT }, () => ({
    sealed: Buffer.allocUnsafeSlow(sealedChunkBound(from.chunkSize)),
    plain: Buffer.allocUnsafeSlow(from.chunkSize),
    out: Buffer.allocUnsafeSlow(sealedChunkBound(to.chunkSize)),
  }));
  /** Source chunk id → destination chunk id, for the VM being copied. */
  let map = new Map<string, string>();
  let vm: string | undefined;
  for (const summary of wanted) {
    opts.signal?.throwIfAborted();
    const brief = { id: summary.id, vm: summary.vm, time: summary.time };
    if (have.has(summary.id)) {
      skip({ ...brief, skipped: 'the destination has it', failed: false });
      continue;
    }
    if (!chosen.has(summary.id) && summary.time < (newest.get(summary.vm) ?? '')) {
      skip({ ...brief, skipped: 'the destination has a newer backup of this VM (this one was pruned there, or not wanted): copy it by id to have it', failed: false });
      continue;
    }
    let m: Manifest;
    try {
      m = await from.loadManifest(summary.id);
    } catch (err) {
      if (!(err instanceof NotFoundError || err instanceof IntegrityError)) throw err;
      const gone = err instanceof NotFoundError;
      skip({ ...brief, skipped: gone ? 'pruned from the source meanwhile' : err.message, failed: !gone });
      continue;
    }
    if (m.vm !== vm) {
      vm = m.vm;
      map = await mapFromCopies(from, to, m, inDestination.filter((b) => b.vm === m.vm && have.has(b.id) && inSource.has(b.id)));
    }
    let copied: Awaited<ReturnType<typeof copyOne>>;
    try {
      copied = await copyOne(from, to, m, map, known, slots, opts.signal);
    } catch (err) {
      // A chunk the source cannot produce costs this backup only: the next one may not use it.
      if (!(err instanceof IntegrityError) || opts.signal?.aborted) throw err;
      skip({ ...brief, skipped: err.message, failed: true });
      continue;
    }
    if (listed.has(m.id)) copied.report.replaced = true;
    await known.flush(true);
    await lock.confirm();
    await to.saveManifest(copied.manifest);
    have.add(m.id);
    result.copied.push(copied.report);
    opts.onBackup?.(copied.report);
  }
  return result;
}

/**
 * How the source's chunk ids map to the destination's, from the backup of `m`'s VM
 * nearest to it in time that both repositories hold (`both`: its backups in the
 * destination that the source has too): its two manifests, disk by disk and chunk by
 * chunk. Empty when there is none, or the two do not line up (then every chunk is read).
 */
async function mapFromCopies(from: Repository, to: Repository, m: Manifest, both: BackupSummary[]): Promise<Map<string, string>> {
  const map = new Map<string, string>();
  const at = Date.parse(m.time);
  const apart = (b: { time: string }) => Math.abs(Date.parse(b.time) - at);
  const pair = both.filter((b) => b.id !== m.id).sort((a, b) => apart(a) - apart(b))[0];
  if (!pair) return map;
  let mine: Manifest;
  let theirs: Manifest;
  try {
    [mine, theirs] = await Promise.all([from.loadManifest(pair.id), to.loadManifest(pair.id)]);
  } catch (err) {
    if (err instanceof NotFoundError || err instanceof IntegrityError) return map; // read in full instead
    throw err;
  }
  for (const d of mine.disks) {
    const other = theirs.disks.find((x) => x.name === d.name);
    if (!other || other.chunks.length !== d.chunks.length) continue;
    d.chunks.forEach((id, i) => {
      const to = other.chunks[i];
      if (id && to) map.set(id, to);
    });
  }
  return map;
}

interface Slot { sealed: Buffer; plain: Buffer; out: Buffer }

async function copyOne(from: Repository, to: Repository, m: Manifest, map: Map<string, string>, known: ChunkIndex, slots: Slot[], signal: AbortSignal | undefined): Promise<{ manifest: Manifest; report: CopiedBackup }> {
  const report: CopiedBackup = { id: m.id, vm: m.vm, time: m.time, chunksRead: 0, chunksUploaded: 0, bytesUploaded: 0, chunksKnown: 0 };
  const fromKeys = from.workerInit().keys;
  const toKeys = to.workerInit().keys;
  const unique = [...new Set(m.disks.flatMap((d) => d.chunks.filter((c): c is string => c !== null)))];
  // A chunk mapped by an earlier copy stands on the destination's word (a stat, once per session).
  const taken = unique.filter((id) => map.has(id));
  const lacking = new Set<string>();
  await mapLimit(taken, 16, async (id) => {
    signal?.throwIfAborted();
    if (await known.present(map.get(id)!)) report.chunksKnown++;
    else lacking.add(id);
  });
  const toRead = unique.filter((id) => !map.has(id) || lacking.has(id));
  const free = [...slots];
  // The first failure stops the other tasks (their requests cut), and every task has
  // ended before it is thrown: none still uses a slot, or writes, once the caller goes on.
  let failure: unknown;
  const stop = new AbortController();
  const cut = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
  await mapLimit(toRead, slots.length, async (id) => {
    if (failure !== undefined) return;
    const slot = free.pop()!;
    try {
      cut.throwIfAborted();
      const n = await from.getChunkSealedInto(id, slot.sealed, { signal: cut });
      const plain = openChunk(fromKeys, from.id, id, slot.sealed.subarray(0, n), slot.plain);
      report.chunksRead++;
      const theirs = chunkId(toKeys, plain);
      if (!(await known.present(theirs))) {
        const sealed = sealChunk(toKeys, to.id, theirs, plain, to.compressionLevel, slot.out);
        await to.putChunk(theirs, sealed, { signal: cut });
        known.add(theirs);
        report.chunksUploaded++;
        report.bytesUploaded += sealed.length;
        await known.flush(false); // a long copy indexes as it goes, and checks its lock doing so
      }
      map.set(id, theirs);
    } catch (err) {
      failure ??= err;
      stop.abort(err);
    } finally {
      free.push(slot);
    }
  });
  if (failure !== undefined) {
    if (signal?.aborted) throw signal.reason;
    if (failure instanceof IntegrityError) {
      throw new IntegrityError(`backup ${m.id.slice(0, 12)} of ${m.vm} cannot be copied: ${failure.message}; nothing of it was committed ` +
        '(run "vmvault verify" on the source repository)', { cause: failure });
    }
    throw failure;
  }
  const disks: DiskEntry[] = m.disks.map(({ bitmap: _b, fileStamp: _f, chainStamps: _c, ...d }) => ({
    ...d,
    chunks: d.chunks.map((id) => (id === null ? null : map.get(id)!)),
  }));
  return { manifest: { ...m, disks }, report };
}

/**
 * Prune: applies a policy's retention to the backups it governs and deletes the
 * manifests of those it does not keep. Chunks are reclaimed later by garbage
 * collection (repo/gc.ts). Planning is a pure function; deletion is the only I/O.
 *
 * A policy governs a backup when the backup was taken under it (manifest.policy),
 * or when the backup was taken under no policy (on demand, e.g. pre-update) and the
 * policy selects its VM (by name, or by tag through the caller's inventory:
 * policy/select.ts). Backups taken under another policy are never touched.
 * Retention applies per VM and per label: a backup carrying a label with its own
 * rules (retention.byLabel) is planned with the other backups of that label only.
 *
 * Retention alone would remove restorable backups in some cases; prune keeps them
 * instead (when in doubt, it keeps):
 * - A backup verify found damaged (a chunk it uses is quarantined: repo/health.ts) is
 *   never removed, and takes no retention slot: retention is planned over the others,
 *   so a damaged newest backup does not take the place of a restorable one. It may
 *   still heal (the next backup that produces the chunk uploads it again);
 *   `vmvault repair --remove` removes those beyond healing.
 * - A backup dated more than FUTURE_SLACK_MS after now was made on a host whose clock
 *   is wrong: counted, it would hold count slots until its date comes, and every
 *   correct backup would go. It is kept, with a warning, and takes no slot. A backup
 *   whose time cannot be read is kept the same way (and the others are still planned).
 * - An on-demand backup is removed only when every policy selecting its VM would
 *   remove it (`policies`): each keeps what its own rules keep, instead of the union
 *   of their removals applying. A policy whose selection of the VM is unknown (tags
 *   without an inventory that lists the VM) counts as selecting it.
 * - Retention groups by VM, not by disk. After it, every disk a governed backup of a
 *   VM holds must still be held, undamaged on that disk, by a backup this plan keeps;
 *   otherwise the newest governed backup holding it is kept (`last of disk NAME`).
 *   Backups this policy does not govern do not count: another policy's prune, which
 *   takes no lock and may run at the same time on another host, could be counting on
 *   this one's, and both copies would go. So each policy keeps its own last copy of
 *   each disk, and a disk removed from a VM for good keeps its last backup.
 */
import type { Policy } from '../policy/schema.js';
import { retentionFor } from '../policy/schema.js';
import { parseIsoTime, planRetention, type KeepReason } from '../policy/retention.js';
import { selectionOf, type Selection } from '../policy/select.js';
import type { BackupSummary } from '../repo/manifest.js';
import { summarise } from '../repo/manifest.js';
import { verificationStates, type VerificationState } from '../repo/health.js';
import { mapLimit, type Repository } from '../repo/repository.js';

/**
 * Why prune keeps a backup: a retention rule (policy/retention.ts), or one of the
 * cases above.
 */
export type PruneReason = KeepReason | 'damaged' | 'future time' | 'unreadable time' | 'invalid policy file'
  | `kept by policy ${string}` | `last of disk ${string}`;

export interface PruneDecision {
  id: string;
  vm: string;
  time: string;
  labels: string[];
  /** The byLabel rule set used, if any. */
  ruleLabel?: string;
  keep: boolean;
  reasons: PruneReason[];
}

/** How far ahead of now a backup's time may be before its host's clock counts as wrong (clocks a little apart are normal). */
export const FUTURE_SLACK_MS = 5 * 60_000;

export interface PruneOptions {
  /** Which VMs a policy selects; default: by name only, tags unresolved (policy/select.ts). */
  selection?: Selection;
  /** Plan only these VMs' backups (e.g. the VM whose backup just finished). */
  onlyVms?: readonly string[];
  /** Without it, no backup counts as dated in the future. */
  now?: Date;
  /** Verification states by backup id (repo/health.ts verificationStates); prune() reads them. */
  verification?: ReadonlyMap<string, Pick<VerificationState, 'status' | 'damagedDisks'>>;
  /**
   * The other policies (this one may be among them): an on-demand backup is removed
   * only when each of them that selects its VM would remove it too. Without them,
   * this policy alone decides.
   */
  policies?: readonly Policy[];
  /** Policy files that cannot be read: while there is one, no on-demand backup is removed (what it selects is unknown). */
  invalidPolicyFiles?: readonly string[];
}

type Decisions = Map<string, PruneDecision>;

const timeOf = (b: { time: string }, timeZone: string): number => {
  const t = parseIsoTime(b.time, timeZone)?.getTime();
  return t === undefined || Number.isNaN(t) ? Number.NaN : t;
};

export function planPrune(backups: readonly BackupSummary[], policy: Policy, opts: PruneOptions = {}): PruneDecision[] {
  const timeZone = policy.timezone ?? 'UTC';
  const selection = opts.selection ?? selectionOf();
  const only = opts.onlyVms ? new Set(opts.onlyVms) : undefined;
  // In id order: retention breaks ties between equal times by input order, and the plan
  // must not depend on the order the caller listed the backups in.
  const governed = backups
    .filter((b) => (b.policy === policy.name || (b.policy === undefined && selection(policy, b.vm) === true)) && (!only || only.has(b.vm)))
    .sort((a, b) => a.id.localeCompare(b.id));
  const decisions: Decisions = new Map();
  const groups = new Map<string, { ruleLabel?: string; rules: ReturnType<typeof retentionFor>['rules']; items: BackupSummary[] }>();
  for (const b of governed) {
    const { label, rules } = retentionFor(policy.retention, b.labels);
    const held = heldOut(b, timeZone, opts);
    if (held) {
      decisions.set(b.id, decision(b, label, [held]));
      continue;
    }
    const key = `${b.vm}\0${label ?? ''}`;
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { ...(label ? { ruleLabel: label } : {}), rules, items: [] }));
    g.items.push(b);
  }
  for (const g of groups.values()) {
    for (const d of planRetention(g.items, g.rules, { timeZone, ...(opts.now ? { now: opts.now } : {}) })) {
      decisions.set(d.id, decision(d.item, g.ruleLabel, d.reasons));
    }
  }
  keepWhatOtherPoliciesKeep(backups, governed, policy, decisions, selection, opts);
  keepLastOfEachDisk(governed, decisions, timeZone, opts);
  const newestFirst = (a: PruneDecision, b: PruneDecision) =>
    a.vm.localeCompare(b.vm) || (timeOf(b, timeZone) - timeOf(a, timeZone)) || b.time.localeCompare(a.time) || a.id.localeCompare(b.id);
  return [...decisions.values()].sort(newestFirst);
}

function decision(b: BackupSummary, ruleLabel: string | undefined, reasons: PruneReason[]): PruneDecision {
  return { id: b.id, vm: b.vm, time: b.time, labels: b.labels, ...(ruleLabel ? { ruleLabel } : {}), keep: reasons.length > 0, reasons };
}

/** Why a backup is kept without being planned: it takes no retention slot. */
function heldOut(b: BackupSummary, timeZone: string, opts: PruneOptions): PruneReason | undefined {
  if (opts.verification?.get(b.id)?.status === 'damaged') return 'damaged';
  const t = timeOf(b, timeZone);
  if (Number.isNaN(t)) return 'unreadable time';
  if (opts.now && t > opts.now.getTime() + FUTURE_SLACK_MS) return 'future time';
  return undefined;
}

/** On-demand backups this plan removes stay when another policy that selects their VM keeps them. */
function keepWhatOtherPoliciesKeep(
  backups: readonly BackupSummary[], governed: readonly BackupSummary[], policy: Policy, decisions: Decisions, selection: Selection, opts: PruneOptions,
): void {
  const removed = () => governed.filter((b) => b.policy === undefined && !decisions.get(b.id)!.keep);
  if (removed().length === 0) return;
  if (opts.invalidPolicyFiles?.length) {
    for (const b of removed()) Object.assign(decisions.get(b.id)!, { keep: true, reasons: ['invalid policy file'] });
    return;
  }
  for (const other of opts.policies ?? []) {
    if (other.name === policy.name) continue;
    const vms = [...new Set(removed().map((b) => b.vm))].filter((vm) => selection(other, vm) !== false);
    if (vms.length === 0) continue;
    // Its own plan for those VMs, an unknown selection read as "selects" (it might).
    const theirs = planPrune(backups, other, {
      onlyVms: vms, selection: (p, vm) => (p === other && vms.includes(vm) ? true : selection(p, vm)),
      ...(opts.now ? { now: opts.now } : {}), ...(opts.verification ? { verification: opts.verification } : {}),
    });
    for (const t of theirs) {
      const d = decisions.get(t.id);
      if (t.keep && d && !d.keep) {
        d.keep = true;
        d.reasons = [`kept by policy ${other.name}`];
      }
    }
  }
}

/** Every disk a governed backup of a VM holds stays held, undamaged, by a backup this plan keeps. */
function keepLastOfEachDisk(governed: readonly BackupSummary[], decisions: Decisions, timeZone: string, opts: PruneOptions): void {
  const stays = (b: BackupSummary) => decisions.get(b.id)?.keep === true;
  for (const vm of new Set(governed.map((b) => b.vm))) {
    const mine = governed.filter((b) => b.vm === vm);
    for (const disk of [...new Set(mine.flatMap((b) => b.disks.map((d) => d.name)))].sort()) {
      const holds = (b: BackupSummary) => b.disks.some((d) => d.name === disk) && !opts.verification?.get(b.id)?.damagedDisks.includes(disk);
      if (mine.some((b) => holds(b) && stays(b))) continue;
      const newest = mine.filter((b) => holds(b) && !stays(b)).sort((a, b) => timeOf(b, timeZone) - timeOf(a, timeZone) || a.id.localeCompare(b.id))[0];
      if (!newest) continue; // every backup of the disk is damaged on it: those are kept anyway
      const d = decisions.get(newest.id)!;
      d.keep = true;
      d.reasons.push(`last of disk ${disk}`);
    }
  }
}

/** What an operator must hear about a plan: backups kept because their time is wrong. */
export function pruneWarnings(plan: readonly PruneDecision[], backups: readonly BackupSummary[], policy: Policy): string[] {
  const host = (id: string) => backups.find((b) => b.id === id)?.host ?? '?';
  const out: string[] = [];
  for (const d of plan) {
    if (d.reasons.includes('future time')) {
      out.push(`backup ${d.id} of VM ${d.vm} is dated ${d.time}, in the future: the clock of host "${host(d.id)}" that made it is probably wrong. ` +
        `Policy ${policy.name} keeps it without counting it against its retention until that time comes; correct that host's clock (NTP)`);
    } else if (d.reasons.includes('unreadable time')) {
      out.push(`backup ${d.id} of VM ${d.vm} has a time prune cannot read ("${d.time}"; the clock of host "${host(d.id)}" was probably far off): ` +
        `policy ${policy.name} keeps it without counting it against its retention; correct that host's clock (NTP)`);
    }
  }
  return out;
}

export interface PruneRunOptions extends PruneOptions {
  dryRun?: boolean;
  /** Where warnings go; default the repository's. */
  warn?: (message: string) => void;
}

export async function prune(repo: Repository, policy: Policy, opts: PruneRunOptions = {}): Promise<PruneDecision[]> {
  const warn = opts.warn ?? ((message: string) => repo.warn(message));
  // Without the damaged ones: leaving a backup out never makes retention remove one it
  // would keep otherwise (each rule then keeps the same or older backups), and prune
  // never deletes what it cannot read.
  const { manifests, damaged } = await repo.readManifests();
  for (const d of damaged) warn(`${d.problem}: prune leaves backup ${d.id} alone`);
  const backups = manifests.map(summarise);
  const verification = opts.verification ?? await verificationStates(repo, new Set(backups.map((b) => b.id)));
  const plan = planPrune(backups, policy, { now: new Date(), ...opts, verification });
  for (const w of pruneWarnings(plan, backups, policy)) warn(w);
  if (!opts.dryRun) await mapLimit(plan.filter((d) => !d.keep), 8, (d) => repo.deleteManifest(d.id));
  return plan;
}

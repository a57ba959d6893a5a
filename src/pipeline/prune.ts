/**
 * Prune: applies a policy's retention to the backups it governs and deletes the
 * manifests of those it does not keep. Chunks are reclaimed later by garbage
 * collection (repo/gc.ts). Planning is a pure function; deletion is the only I/O.
 *
 * A policy governs a backup when the backup was taken under it (manifest.policy),
 * or when the backup was taken under no policy (on demand, e.g. pre-update) and its
 * VM is one the policy selects. Backups taken under another policy are never touched.
 * Retention applies per VM and per label: a backup carrying a label with its own
 * rules (retention.byLabel) is planned with the other backups of that label only.
 */
import type { Policy } from '../policy/schema.js';
import { retentionFor } from '../policy/schema.js';
import { planRetention, type KeepReason } from '../policy/retention.js';
import type { BackupSummary } from '../repo/manifest.js';
import { summarise } from '../repo/manifest.js';
import { mapLimit, type Repository } from '../repo/repository.js';

export interface PruneDecision {
  id: string;
  vm: string;
  time: string;
  labels: string[];
  /** The byLabel rule set used, if any. */
  ruleLabel?: string;
  keep: boolean;
  reasons: KeepReason[];
}

export interface PruneOptions {
  /** VMs the policy selects (by name or tag, resolved by the caller); default: policy.select.vms. */
  vms?: readonly string[];
  /** Plan only these VMs' backups (e.g. the VM whose backup just finished). */
  onlyVms?: readonly string[];
  now?: Date;
}

export function planPrune(backups: readonly BackupSummary[], policy: Policy, opts: PruneOptions = {}): PruneDecision[] {
  const selected = new Set(opts.vms ?? policy.select.vms ?? []);
  const only = opts.onlyVms ? new Set(opts.onlyVms) : undefined;
  const governed = backups.filter((b) => (b.policy === policy.name || (b.policy === undefined && selected.has(b.vm))) && (!only || only.has(b.vm)));
  const groups = new Map<string, { ruleLabel?: string; rules: ReturnType<typeof retentionFor>['rules']; items: BackupSummary[] }>();
  for (const b of governed) {
    const { label, rules } = retentionFor(policy.retention, b.labels);
    const key = `${b.vm}\0${label ?? ''}`;
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { ...(label ? { ruleLabel: label } : {}), rules, items: [] }));
    g.items.push(b);
  }
  const out: PruneDecision[] = [];
  for (const g of groups.values()) {
    const decisions = planRetention(g.items, g.rules, { timeZone: policy.timezone ?? 'UTC', ...(opts.now ? { now: opts.now } : {}) });
    for (const d of decisions) {
      out.push({
        id: d.item.id, vm: d.item.vm, time: d.item.time, labels: d.item.labels,
        ...(g.ruleLabel ? { ruleLabel: g.ruleLabel } : {}), keep: d.keep, reasons: d.reasons,
      });
    }
  }
  return out.sort((a, b) => a.vm.localeCompare(b.vm) || b.time.localeCompare(a.time));
}

export async function prune(repo: Repository, policy: Policy, opts: PruneOptions & { dryRun?: boolean } = {}): Promise<PruneDecision[]> {
  // Without the damaged ones: leaving a backup out never makes retention remove one it
  // would keep otherwise (each rule then keeps the same or older backups), and prune
  // never deletes what it cannot read.
  const { manifests, damaged } = await repo.readManifests();
  for (const d of damaged) repo.warn(`${d.problem}: prune leaves backup ${d.id} alone`);
  const backups = manifests.map(summarise);
  const plan = planPrune(backups, policy, { now: new Date(), ...opts });
  if (!opts.dryRun) await mapLimit(plan.filter((d) => !d.keep), 8, (d) => repo.deleteManifest(d.id));
  return plan;
}

/**
 * Which VMs a policy selects, as far as a caller can tell. By name, always; by tag,
 * only through a VM inventory, and only for the VMs it lists: a VM it does not list
 * (removed from it, backed up outside it, or listed only by another host's VM file)
 * has unknown tags. Prune reads an unknown answer on the side of keeping: the policy
 * being pruned does not govern that VM's on-demand backups, and another policy may
 * still want to keep them (pipeline/prune.ts).
 */
import type { Policy } from './schema.js';

/** True or false when known; `unknown` when the answer hangs on tags nobody here can read. */
export type Selects = boolean | 'unknown';
export type Selection = (policy: Policy, vm: string) => Selects;

/** What selection needs of an inventory VM (config VmConfig has it). */
export interface InventoryVm { name: string; tags: readonly string[] }

/**
 * Selection through `inventory` (read at each call: a live list may change), or
 * without one (undefined): by name only, and `unknown` for every other VM of a policy
 * that selects by tag.
 */
export function selectionOf(inventory?: () => readonly InventoryVm[]): Selection {
  return (policy, vm) => {
    if (policy.select.vms?.includes(vm)) return true;
    const tags = policy.select.tags;
    if (!tags?.length) return false;
    const known = inventory?.().find((v) => v.name === vm);
    if (!known) return 'unknown';
    return known.tags.some((t) => tags.includes(t));
  };
}

/**
 * Which chunks a `verify --read-data-subset` run downloads, as restic's option of the
 * same name: `k/n` is the k-th of n fixed slices (so n runs with k = 1…n read every
 * chunk exactly once: a large repository can be read over a week), `p%` a random
 * p percent of the chunks (a different sample each run). Pure functions.
 */
import { VmvaultError } from '../errors.js';

export type Subset =
  | { kind: 'slice'; k: number; n: number }
  | { kind: 'percent'; percent: number };

const HINT = 'expected k/n (the k-th of n slices, 1 ≤ k ≤ n, e.g. 1/7) or a percentage (e.g. 10%)';

export function parseSubset(text: string): Subset {
  const t = text.trim();
  const slice = /^(\d{1,6})\/(\d{1,6})$/.exec(t);
  if (slice) {
    const k = Number(slice[1]);
    const n = Number(slice[2]);
    if (n >= 1 && k >= 1 && k <= n) return { kind: 'slice', k, n };
    throw new VmvaultError('BAD_INPUT', `read-data subset "${text}": k must be between 1 and n: ${HINT}`);
  }
  const pct = /^(\d{1,3}(?:\.\d+)?)%$/.exec(t);
  if (pct) {
    const percent = Number(pct[1]);
    if (percent > 0 && percent <= 100) return { kind: 'percent', percent };
    throw new VmvaultError('BAD_INPUT', `read-data subset "${text}": the percentage must be above 0 and at most 100`);
  }
  throw new VmvaultError('BAD_INPUT', `read-data subset "${text}" is not valid: ${HINT}`);
}

export function formatSubset(s: Subset): string {
  return s.kind === 'slice' ? `${s.k}/${s.n}` : `${s.percent}%`;
}

/**
 * The slice (0 … n-1) a chunk belongs to: its id's first 48 bits modulo n. Chunk ids
 * are keyed hashes, so slices are about equal in size and no chunk is in two.
 */
export function sliceOf(chunkId: string, n: number): number {
  return Number.parseInt(chunkId.slice(0, 12), 16) % n;
}

/**
 * The chunks of `ids` that a run with `subset` reads. A percentage picks
 * ⌈p·N/100⌉ distinct ids with `random` (tests pass a seeded one).
 */
export function selectSubset(ids: readonly string[], subset: Subset, random: () => number = Math.random): string[] {
  if (subset.kind === 'slice') return ids.filter((id) => sliceOf(id, subset.n) === subset.k - 1);
  const want = Math.min(ids.length, Math.ceil((ids.length * subset.percent) / 100));
  // A partial Fisher–Yates shuffle: the first `want` places get a uniform sample.
  const pool = [...ids];
  for (let i = 0; i < want; i++) {
    const j = i + Math.floor(random() * (pool.length - i));
    [pool[i], pool[j]] = [pool[j]!, pool[i]!];
  }
  return pool.slice(0, want);
}

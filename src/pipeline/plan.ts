/**
 * Chunk planning: which parts of each fixed-size chunk hold data. Pure functions.
 * Chunks are aligned to the disk's virtual offsets, so the same data at the same
 * place always makes the same chunk: that is what makes incremental backups cheap.
 */
export interface Range { offset: number; length: number }
export interface ExtentLike extends Range { zero: boolean }
export interface ChunkPlan extends Range {
  index: number;
  /** Sub-ranges (absolute disk offsets) that may hold non-zero bytes; empty for a zero chunk. */
  data: Range[];
}

/**
 * Plans the chunks of [start, end) from block-status extents covering that range.
 * `start` must be a multiple of `chunkSize`; the last chunk may be short.
 */
export function planChunks(extents: readonly ExtentLike[], start: number, end: number, chunkSize: number): ChunkPlan[] {
  if (start % chunkSize !== 0) throw new Error(`planChunks: start ${start} is not aligned to ${chunkSize}`);
  const plans: ChunkPlan[] = [];
  for (let off = start; off < end; off += chunkSize) {
    plans.push({ index: off / chunkSize, offset: off, length: Math.min(chunkSize, end - off), data: [] });
  }
  for (const e of extents) {
    if (e.zero) continue;
    let from = Math.max(e.offset, start);
    const to = Math.min(e.offset + e.length, end);
    while (from < to) {
      const plan = plans[Math.floor((from - start) / chunkSize)]!;
      const stop = Math.min(to, plan.offset + plan.length);
      const last = plan.data[plan.data.length - 1];
      if (last && last.offset + last.length === from) last.length += stop - from;
      else plan.data.push({ offset: from, length: stop - from });
      from = stop;
    }
  }
  return plans;
}

/** Bytes of data (non-zero ranges) in a plan. */
export function dataBytes(plan: ChunkPlan): number {
  return plan.data.reduce((n, r) => n + r.length, 0);
}

/**
 * An in-memory NBD source for tests of the NBD server: 16 blocks of 64 KiB, blocks 2, 3
 * and 9 zero, block 12 one that cannot be produced (its read rejects, as a chunk that
 * fails verification does), the rest holding their index + 1 in every byte.
 */
import type { NbdSource, SourceRun } from '../../src/disk/nbd-server.js';
import { VmvaultError } from '../../src/errors.js';

export const BLOCK = 64 * 1024;
export const SIZE = 16 * BLOCK;
export const ZERO = new Set([2, 3, 9]);
export const BROKEN = 12;

export const source: NbdSource = {
  size: SIZE,
  layout(offset, length) {
    const runs: SourceRun[] = [];
    for (let at = offset; at < offset + length;) {
      const b = Math.floor(at / BLOCK);
      const next = Math.min(offset + length, (b + 1) * BLOCK);
      const last = runs[runs.length - 1];
      if (ZERO.has(b) && last?.zero) last.length += next - at;
      else runs.push({ offset: at, length: next - at, zero: ZERO.has(b) });
      at = next;
    }
    return runs;
  },
  async read(offset, length) {
    const b = Math.floor(offset / BLOCK);
    if (b === BROKEN) throw new VmvaultError('INTEGRITY', `block ${b} failed verification`);
    return Buffer.alloc(length, b + 1);
  },
};

/** The bytes the source holds at [offset, offset+length). */
export function expected(offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) {
    const b = Math.floor((offset + i) / BLOCK);
    out[i] = ZERO.has(b) ? 0 : b + 1;
  }
  return out;
}

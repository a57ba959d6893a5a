/**
 * Seeded pseudo-random numbers for the fuzzers and generated cases (mulberry32): small,
 * fast, and the same sequence for the same seed everywhere, so that a failure printed
 * with its seed (and case number) replays on its own.
 */

/** A generator of numbers in [0, 1), from `seed`. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** prng with the helpers a mutation fuzzer needs. */
export class Rng {
  private readonly source: () => number;
  constructor(seed: number) {
    this.source = prng(seed);
  }
  next(): number { return this.source(); }
  int(n: number): number { return Math.floor(this.next() * n); }
  pick<T>(xs: readonly T[]): T { return xs[this.int(xs.length)]!; }
  chance(p: number): boolean { return this.next() < p; }
  u64(): bigint { return (BigInt(this.int(2 ** 32)) << 32n) | BigInt(this.int(2 ** 32)); }
}

/** Runs `each` for every index in [first, last), `lanes` at once (a fuzzer's mutants: each lane has files of its own). */
export async function eachMutant(first: number, last: number, lanes: number, each: (index: number, lane: number) => Promise<void>): Promise<void> {
  let next = first;
  const lane = async (w: number) => {
    for (let index = next++; index < last; index = next++) await each(index, w);
  };
  await Promise.all(Array.from({ length: lanes }, (_, w) => lane(w)));
}

/**
 * A fuzzer's run, from the environment: VMVAULT_FUZZ_ITERATIONS mutants (else `iterations`)
 * of VMVAULT_FUZZ_SEED (else `seed`), or only mutant VMVAULT_FUZZ_ONLY, keeping the mutants
 * that break an invariant in directory VMVAULT_FUZZ_KEEP.
 */
export function fuzzRun(defaults: { iterations: number; seed: number }): { iterations: number; seed: number; only: number | undefined; keep: string | undefined } {
  const env = process.env;
  return {
    iterations: Number(env.VMVAULT_FUZZ_ITERATIONS ?? defaults.iterations),
    seed: Number(env.VMVAULT_FUZZ_SEED ?? defaults.seed),
    only: env.VMVAULT_FUZZ_ONLY === undefined ? undefined : Number(env.VMVAULT_FUZZ_ONLY),
    keep: env.VMVAULT_FUZZ_KEEP,
  };
}

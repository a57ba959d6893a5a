/**
 * A bound on what concurrent requests may hold at once: a Range answer of up to
 * 16 MiB is assembled in memory before it is sent. (The manifests those requests
 * name are kept decoded by a PromiseLru, src/pipeline/lru.ts.)
 */

/** At most `max` holders at once; the others wait their turn, in order. */
export class Limiter {
  private active = 0;
  private readonly waitingList: (() => void)[] = [];

  constructor(readonly max: number) {}

  /** Callers waiting for a slot. */
  get waiting(): number {
    return this.waitingList.length;
  }

  /** A slot, once one is free; call the returned function (any number of times) to give it back. */
  async acquire(): Promise<() => void> {
    if (this.active >= this.max) await new Promise<void>((resolve) => this.waitingList.push(resolve));
    else this.active++;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      // The slot passes straight to the next waiter, so `active` never drops below what runs.
      const next = this.waitingList.shift();
      if (next) next();
      else this.active--;
    };
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * A bound on what concurrent requests may hold at once: a Range answer of up to
 * 16 MiB is assembled in memory before it is sent. (The manifests those requests
 * name are kept decoded by a PromiseLru, src/pipeline/lru.ts.)
 */

/** At most `max` holders at once; the others wait their turn, in order. */
export class Limiter {
  private active = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(readonly max: number) {}

  /** A slot, once one is free; call the returned function (any number of times) to give it back. */
  async acquire(): Promise<() => void> {
    if (this.active >= this.max) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.active++;
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      // The slot passes straight to the next waiter, so `active` never drops below what runs.
      const next = this.waiting.shift();
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

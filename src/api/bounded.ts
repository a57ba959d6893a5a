/**
 * Bounds on what concurrent requests may hold at once. The disk routes need both:
 * a Range answer of up to 16 MiB is assembled in memory before it is sent, and each
 * request names a backup whose manifest (its chunk list: megabytes for a large disk)
 * would otherwise be fetched, decrypted and parsed again for every few MiB a client
 * such as QEMU's curl driver reads.
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

/**
 * The last `max` values by key, as promises (concurrent requests for one key share one
 * load). Only for immutable values, such as a manifest under its id; a failed load is forgotten.
 */
export class PromiseLru<T> {
  private readonly entries = new Map<string, Promise<T>>();

  constructor(private readonly max: number) {}

  get(key: string, load: () => Promise<T>): Promise<T> {
    let p = this.entries.get(key);
    if (p) {
      this.entries.delete(key); // Re-insert: most recently used last.
    } else {
      p = load();
      const mine = p;
      p.catch(() => { if (this.entries.get(key) === mine) this.entries.delete(key); });
    }
    this.entries.set(key, p);
    while (this.entries.size > this.max) this.entries.delete(this.entries.keys().next().value!);
    return p;
  }
}

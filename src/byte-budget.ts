/**
 * A budget of bytes in flight, for reads whose sizes the listing told: a read waits
 * while the others in flight and it would exceed the budget, but one read always
 * goes (a single object larger than the budget is read alone). Waiters go in order.
 * Object size limits (object-limits.ts) bound each read; this bounds their sum, so
 * that reads run several at a time (manifests, 16) cannot add up to gigabytes.
 */
export class ByteBudget {
  private inFlight = 0;
  private readonly waiting: { bytes: number; go: () => void }[] = [];

  constructor(readonly budget: number) {}

  /** Runs `fn` once `bytes` fit in the budget, and gives them back when it settles. */
  async run<T>(bytes: number, fn: () => Promise<T>): Promise<T> {
    await this.acquire(bytes);
    try {
      return await fn();
    } finally {
      this.release(bytes);
    }
  }

  /** Bytes currently taken. */
  get taken(): number { return this.inFlight; }

  private acquire(bytes: number): Promise<void> {
    if (this.waiting.length === 0 && this.fits(bytes)) {
      this.inFlight += bytes;
      return Promise.resolve();
    }
    return new Promise((go) => this.waiting.push({ bytes, go }));
  }

  private release(bytes: number): void {
    this.inFlight -= bytes;
    while (this.waiting.length && this.fits(this.waiting[0]!.bytes)) {
      const next = this.waiting.shift()!;
      this.inFlight += next.bytes;
      next.go();
    }
  }

  private fits(bytes: number): boolean {
    return this.inFlight === 0 || this.inFlight + bytes <= this.budget;
  }
}

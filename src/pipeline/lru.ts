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

  clear(): void {
    this.entries.clear();
  }
}

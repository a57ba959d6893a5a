/**
 * Runs tasks with at most `limit` in flight: the back-pressure that keeps memory
 * bounded whatever the disk size. The first failure stops new tasks; `drain()`
 * waits for the running ones and rethrows that failure.
 */
export class TaskWindow {
  private running = new Set<Promise<void>>();
  private failure: unknown;
  private failed = false;

  constructor(private readonly limit: number) {}

  get ok(): boolean { return !this.failed; }

  /** Waits for a free slot, then starts `task`. Throws the first failure seen so far. */
  async add(task: () => Promise<void>): Promise<void> {
    while (this.running.size >= this.limit && !this.failed) await Promise.race(this.running);
    if (this.failed) throw this.failure;
    const p: Promise<void> = task()
      .catch((err) => {
        if (!this.failed) {
          this.failed = true;
          this.failure = err;
        }
      })
      .finally(() => this.running.delete(p));
    this.running.add(p);
  }

  async drain(): Promise<void> {
    while (this.running.size) await Promise.race(this.running);
    if (this.failed) throw this.failure;
  }
}

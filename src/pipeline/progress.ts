/** Progress of a long operation, as reported to the CLI's bar and to job progress. */
export interface Progress {
  phase: 'backup' | 'restore' | 'verify';
  /** Disk being processed, when there is one. */
  disk?: string;
  bytesDone: number;
  bytesTotal: number;
  bytesPerSecond: number;
}
export type ProgressFn = (p: Progress) => void;

/** Tracks bytes done and a rate; calls `fn` at most every `everyMs`. */
export class ProgressMeter {
  private readonly started = Date.now();
  private last = 0;
  bytesDone = 0;
  disk: string | undefined;

  constructor(private readonly phase: Progress['phase'], private readonly bytesTotal: number, private readonly fn?: ProgressFn, private readonly everyMs = 200) {}

  add(bytes: number): void {
    this.bytesDone += bytes;
    const now = Date.now();
    if (this.fn && now - this.last >= this.everyMs) {
      this.last = now;
      this.fn(this.snapshot());
    }
  }

  finish(): void {
    this.fn?.(this.snapshot());
  }

  snapshot(): Progress {
    const seconds = Math.max(0.001, (Date.now() - this.started) / 1000);
    return { phase: this.phase, ...(this.disk ? { disk: this.disk } : {}), bytesDone: this.bytesDone, bytesTotal: this.bytesTotal, bytesPerSecond: this.bytesDone / seconds };
  }
}

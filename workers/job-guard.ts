/**
 * BullMQ is at-least-once: a worker that stalls (or is partitioned from Redis) loses
 * its job lock, and another worker runs the job again. The guard makes sure such a
 * worker stops and never commits: it wraps the Repository so that every chunk upload
 * checks the job is still ours, and the manifest write — a backup's commit — first
 * re-checks ownership in Redis (extending the job lock, which fails if another
 * worker took the job) and the VM lock. This is wrapping rather than a hook in
 * src/pipeline: the pipeline writes exactly one manifest, last, via saveManifest.
 */
import type { Job } from 'bullmq';
import { VmvaultError } from '../src/errors.js';
import type { Repository } from '../src/repo/repository.js';
import type { Manifest } from '../src/repo/manifest.js';
import type { RequestOptions } from '../src/storage/storage.js';
import type { VmLock } from '../src/queue/vm-lock.js';

export class JobGuard {
  private readonly controller = new AbortController();

  constructor(
    private readonly job: Job,
    private readonly token: string,
    private readonly vmLock: VmLock,
    private readonly jobLockMs: number,
  ) {}

  /**
   * Aborted with a JobAbortedError: the job's pipeline is given it (it stops before its
   * next chunk, cutting the chunk requests in flight), and whatever throws its reason
   * throws that error, which says why (hand back at shutdown, retry when lost).
   */
  get signal(): AbortSignal { return this.controller.signal; }

  /** Stops the job: its pipeline at once, its repository writes from now on. `reason` says why (shown in the error). */
  abort(reason: AbortReason): void {
    if (!this.controller.signal.aborted) this.controller.abort(new JobAbortedError(reason));
  }

  /** Throws the JobAbortedError when the job was aborted (lost lock, shutdown, cancel). */
  check(): void {
    this.controller.signal.throwIfAborted();
  }

  /** Right before a commit: the job and the VM must still be ours, in Redis, now. */
  async confirmOwnership(): Promise<void> {
    this.check();
    const extended = await this.job.extendLock(this.token, this.jobLockMs);
    if (Number(extended) !== 1) this.abort({ kind: 'lost', message: `job ${this.job.id} is no longer owned by this worker (its lock expired or another worker took it)` });
    else if (!(await this.vmLock.refresh())) this.abort({ kind: 'lost', message: `the lock of VM "${this.vmLock.vm}" was lost` });
    this.check();
  }

  /** A view of `repo` whose writes honour this guard; `beforeCommit` runs after ownership is confirmed. */
  wrap(repo: Repository, beforeCommit: (m: Manifest) => Promise<void>): Repository {
    const guarded = Object.create(repo) as Repository;
    Object.defineProperties(guarded, {
      putChunk: {
        value: async (id: string, sealed: Uint8Array, opts?: RequestOptions) => {
          this.check();
          return repo.putChunk(id, sealed, opts);
        },
      },
      getChunkSealedInto: {
        value: async (id: string, into: Uint8Array, opts?: RequestOptions) => {
          this.check();
          return repo.getChunkSealedInto(id, into, opts);
        },
      },
      saveManifest: {
        value: async (m: Manifest) => {
          await this.confirmOwnership();
          await beforeCommit(m);
          return repo.saveManifest(m);
        },
      },
    });
    return guarded;
  }
}

export type AbortReason = { kind: 'lost' | 'shutdown' | 'cancelled'; message: string };

export class JobAbortedError extends VmvaultError {
  constructor(readonly reason: AbortReason) {
    // Retriable: the job is another worker's now (lost), or comes back after a restart (shutdown).
    super('LOCKED', `stopped before commit: ${reason.message}`, { retriable: true });
    this.name = 'JobAbortedError';
  }
}

/**
 * Ctrl-C and SIGTERM for a command that cleans up after itself (backup, restore). The
 * first signal aborts the command's AbortSignal: the pipeline stops, drops its NBD
 * connections, removes what it made and releases its lock, and the command fails with
 * the signal's reason. A second signal exits at once, for an operator who will not wait
 * for that cleanup: the repository locks of this process are still removed (bounded,
 * FORCED_UNLOCK_MS), and what is left behind is printed with how to clear it.
 */
import { VmvaultError, errorMessage } from '../errors.js';
import { removeHeldLocks } from '../repo/locks.js';

/** How long a forced exit tries to remove this process's locks: an operator pressing Ctrl-C twice wants out now. */
export const FORCED_UNLOCK_MS = 2000;

export interface InterruptOptions {
  /** What is interrupted, as in "the backup was interrupted". */
  what: string;
  /** What the failure says was done, as in "nothing was saved". */
  outcome: string;
  /** What the first signal does, as in "stopping the backup and cleaning up (…)". */
  stopping: string;
  /** The controller to abort (one whose signal the repository's storage was opened with); default a new one. */
  controller?: AbortController;
  /** At a forced exit: what is left behind and how to clear it, one line each. */
  leftovers: () => string[];
}

export interface Interrupt {
  signal: AbortSignal;
  /** Stops listening for the signals. */
  dispose(): void;
}

export function onInterrupt(o: InterruptOptions): Interrupt {
  const stop = o.controller ?? new AbortController();
  let forcing = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (forcing) process.exit(130);
    if (stop.signal.aborted) {
      forcing = true;
      void forcedExit(o, sig);
      return;
    }
    process.stderr.write(`\nvmvault: ${sig}: ${o.stopping}; send it again to exit at once\n`);
    stop.abort(new VmvaultError('BAD_INPUT', `${o.what} was interrupted (${sig}): ${o.outcome}`));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    signal: stop.signal,
    dispose: () => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

async function forcedExit(o: InterruptOptions, sig: NodeJS.Signals): Promise<never> {
  process.stderr.write(`\nvmvault: ${sig} again: exiting without finishing the cleanup\n`);
  const timer = new Promise<string>((resolve) => setTimeout(() => resolve(`not done within ${FORCED_UNLOCK_MS / 1000} s`), FORCED_UNLOCK_MS).unref());
  const unlocked = await Promise.race([removeHeldLocks().then(() => undefined, (err: unknown) => errorMessage(err)), timer]);
  const lines = o.leftovers();
  if (unlocked !== undefined) {
    lines.push(`its repository lock may remain (removing it failed: ${unlocked}): remove it with "vmvault unlock" (it removes the locks of processes gone from this host), or it expires by itself within 30 minutes`);
  }
  process.stderr.write(lines.length
    ? `vmvault: ${o.what} left behind:\n${lines.map((l) => `  - ${l}\n`).join('')}`
    : `vmvault: ${o.what} left nothing behind\n`);
  process.exit(130);
}


/**
 * Chunk threads started before the pool that will use them exists. A thread takes
 * about 0.1 s to start (a V8 isolate, the worker's code, its native libraries) and a
 * restore or a backup would otherwise wait for it before its first chunk; started by the
 * CLI's launcher (bin/vmvault.js) while the main thread is still loading the CLI, that
 * time is spent on the other core. A thread has no keys until its pool sends them (its
 * first message); one never adopted does nothing and does not keep the process alive.
 *
 * This module has no imports of vmvault's own: the launcher loads it before anything else.
 */
import { Worker } from 'node:worker_threads';

const PRESTARTED = Symbol.for('vmvault.prestartedChunkThreads');

/**
 * The threads started and not yet adopted, kept on the global object rather than in this
 * module: the launcher loads this module as its own ES module, and the CLI, a CommonJS
 * bundle (scripts/bundle.mjs), has its own copy of it, which must adopt the same threads.
 */
const started: Worker[] = ((globalThis as { [PRESTARTED]?: Worker[] })[PRESTARTED] ??= []);

/** Where the chunk thread's code is: beside this module, in the bundle and in tsc's output alike. */
const CHUNK_WORKER_URL = new URL('./chunk-worker.js', import.meta.url);

/** A new chunk thread, waiting for its pool's first message. */
function chunkThread(): Worker {
  const w = new Worker(CHUNK_WORKER_URL);
  w.unref();
  return w;
}

/** Starts `n` chunk threads now, for the next pools to adopt. */
export function prestartChunkThreads(n: number): void {
  for (let i = 0; i < n; i++) {
    const w = chunkThread();
    // One that dies before it is adopted is dropped; the pool starts another.
    w.once('error', () => drop(w));
    w.once('exit', () => drop(w));
    started.push(w);
  }
}

/** A prestarted thread, or a new one. */
export function takeChunkThread(): Worker {
  const w = started.shift();
  if (!w) return chunkThread();
  w.removeAllListeners('error');
  w.removeAllListeners('exit');
  return w;
}

/** How many prestarted threads wait to be adopted. */
export function prestartedCount(): number {
  return started.length;
}

function drop(w: Worker): void {
  const i = started.indexOf(w);
  if (i >= 0) started.splice(i, 1);
}

/**
 * Libraries that only some paths need, loaded on first use. Every vmvault command
 * loads its modules before it starts, and a backup or a restore should not pay for a
 * YAML, XML or cron parser it may never call (together about a fifth of the CLI's
 * start-up, which is most of an unchanged VM's backup).
 */
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/** A loader of CommonJS package `id`: the first call loads it, later calls return it. */
export function lazy<T>(id: string): () => T {
  let loaded: T | undefined;
  return () => (loaded ??= require(id) as T);
}

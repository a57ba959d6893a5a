/**
 * The one door to libsodium. The sumo build is required: the default
 * `libsodium-wrappers` build lacks crypto_pwhash (Argon2id) at run time.
 *
 * Loaded with require() (its CommonJS build), on first use, and given ready: the CLI
 * runs as one CommonJS bundle (scripts/bundle.mjs), which can neither import an ES
 * module at run time without an experimental vm feature nor wait at its top level.
 * crypto/sodium.ts gives ES modules (the KDF thread, tests) the same object, ready.
 */
import { createRequire } from 'node:module';

export type Sodium = typeof import('libsodium-wrappers-sumo');

let loading: Promise<Sodium> | undefined;

/** libsodium, ready to use: one instance per thread, loaded by the first call. */
export function loadSodium(): Promise<Sodium> {
  return (loading ??= (async () => {
    const sodium = createRequire(import.meta.url)('libsodium-wrappers-sumo') as Sodium;
    await sodium.ready;
    return sodium;
  })());
}

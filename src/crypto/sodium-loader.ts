/**
 * The one door to libsodium. The sumo build is required: the default
 * `libsodium-wrappers` build lacks crypto_pwhash (Argon2id) at run time.
 *
 * Loaded with require() (its CommonJS build), on first use, and given ready: the CLI
 * runs as one CommonJS bundle (scripts/bundle.mjs), which can neither import an ES
 * module at run time without an experimental vm feature nor wait at its top level.
 * crypto/sodium.ts gives ES modules (the KDF thread, tests) the same object, ready.
 */
import { lazy } from '../lazy-require.js';

export type Sodium = typeof import('libsodium-wrappers-sumo');

const sodiumPackage = lazy<Sodium>('libsodium-wrappers-sumo');

/** libsodium, ready to use: one instance per thread, loaded by the first call. */
export async function loadSodium(): Promise<Sodium> {
  const sodium = sodiumPackage();
  await sodium.ready;
  return sodium;
}

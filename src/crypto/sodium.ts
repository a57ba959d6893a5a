/**
 * The one door to libsodium. The sumo build is required: the default
 * `libsodium-wrappers` build lacks crypto_pwhash (Argon2id) at run time.
 * Top-level await makes every importer (main thread and worker threads alike)
 * see a ready library.
 */
import sodiumModule from 'libsodium-wrappers-sumo';

await sodiumModule.ready;

export const sodium = sodiumModule;

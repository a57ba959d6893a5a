/**
 * libsodium for ES modules, ready (crypto/sodium-loader.ts): top-level await makes
 * every importer (the KDF thread, tests) see a ready library. Code the CLI bundles
 * (CommonJS) awaits loadSodium() instead.
 */
import { loadSodium } from './sodium-loader.js';

export const sodium = await loadSodium();

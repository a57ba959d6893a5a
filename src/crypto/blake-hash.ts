/**
 * The native BLAKE2b and BLAKE3 code (@napi-rs/blake-hash), loaded once per thread on
 * first use, for crypto/blake2b.ts and crypto/chunk-id.ts. Where it cannot load, the
 * failure is kept, and `blakeHashUnavailable` says why in vmvault's words.
 */
import { createRequire } from 'node:module';

interface Blake2bParams { key(k: Buffer): void; salt(s: Buffer): void; personal(p: Buffer): void; hashLength(n: number): void }
interface Blake3Hasher { update(data: Uint8Array): Blake3Hasher; digest(format: 'hex'): string }

/** The part of the package vmvault uses. */
export interface BlakeHash {
  Blake2BParam: new () => Blake2bParams;
  Blake2BHasher: { withParams(p: Blake2bParams): { update(d: Uint8Array): { digestBuffer(): Buffer } } };
  Blake3Hasher: { newKeyed(key: Buffer): Blake3Hasher };
}

let loaded: BlakeHash | Error | undefined;

/** The package, or the error that loading it gave. */
export function blakeHash(): BlakeHash | Error {
  try {
    return (loaded ??= load());
  } catch (err) {
    return (loaded = err instanceof Error ? err : new Error(String(err)));
  }
}

/**
 * On Linux with glibc, the platform's build is loaded directly: the package's own loader
 * tells glibc from musl with process.report.getReport(), which takes about 20 ms (on the
 * main thread of every command). Where that build does not load (musl, or not installed),
 * the package's loader decides as before.
 */
function load(): BlakeHash {
  const require = createRequire(import.meta.url);
  if (process.platform === 'linux' && (process.arch === 'x64' || process.arch === 'arm64')) {
    try {
      return require(`@napi-rs/blake-hash-linux-${process.arch}-gnu`) as BlakeHash;
    } catch {
      /* the package's loader decides */
    }
  }
  return require('@napi-rs/blake-hash') as BlakeHash;
}

/**
 * Why this host cannot load the package, or undefined when it can. Not the loader's own
 * words: when only the platform's binary is missing, napi-rs's first line blames npm and
 * suggests deleting the lock file.
 */
export function blakeHashUnavailable(): string | undefined {
  const m = blakeHash();
  if (!(m instanceof Error)) return undefined;
  return (m as { code?: unknown }).code === 'MODULE_NOT_FOUND' && m.message.includes("'@napi-rs/blake-hash'")
    ? 'the package is not installed'
    : `it has no build that loads on ${process.platform}-${process.arch}`;
}

/**
 * What every repository command needs: the repository URL and the passphrase,
 * from flags or the environment, and the opened repository.
 */
import { VmvaultError, errorMessage } from '../errors.js';
import { openStorage } from '../storage/open.js';
import type { RetryEvent } from '../storage/retry.js';
import type { Storage } from '../storage/storage.js';
import { Repository } from '../repo/repository.js';
import path from 'node:path';
import { passphrase, passphraseAndSource, type PassphraseSource } from '../config/passphrase.js';
import type { KeyCache } from '../crypto/key-cache.js';
import { durationMs, parseDuration } from '../policy/retention.js';

export { passphrase, passphraseAndSource };

/** Warnings go to stderr, apart from the output (which may be JSON). */
export function warn(message: string): void {
  process.stderr.write(`vmvault: warning: ${message}\n`);
}

/** `lock` is false with `--no-lock` (commander's negated flag). */
export interface GlobalOptions { repo?: string; passwordFile?: string; lock?: boolean; retryLock?: string }

/**
 * How long to wait for a lock another process holds (`--retry-lock`, env
 * VMVAULT_RETRY_LOCK), in ms: seconds (`90s`) or a duration as policies write them
 * (`5min`, `1h`); 0 when neither is given.
 */
export function lockWaitMs(opts: GlobalOptions, env: NodeJS.ProcessEnv = process.env): number {
  const text = opts.retryLock ?? env.VMVAULT_RETRY_LOCK;
  if (text === undefined || text.trim() === '') return 0;
  const from = opts.retryLock !== undefined ? '--retry-lock' : 'VMVAULT_RETRY_LOCK';
  const seconds = /^\s*(\d{1,7})\s*s\s*$/.exec(text);
  if (seconds) return Number(seconds[1]) * 1000;
  try {
    return durationMs(parseDuration(text));
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `${from}: ${errorMessage(err)}; or seconds, e.g. 90s`);
  }
}

export function repositoryUrl(opts: GlobalOptions): string {
  const url = opts.repo ?? process.env.VMVAULT_REPOSITORY;
  if (!url) throw new VmvaultError('BAD_INPUT', 'no repository given: pass --repo URL or set VMVAULT_REPOSITORY');
  return url;
}

/** `signal`: once it aborts, storage operations are no longer retried (storage/retry.ts). */
export function storageFor(opts: GlobalOptions, signal?: AbortSignal): Storage {
  return openStorage(repositoryUrl(opts), { retry: { onRetry: retryNotice(warn), ...(signal ? { signal } : {}) } });
}

/**
 * Says that storage operations are being retried: the first retry at once, then at most
 * one line every 30 s. A storage that stops answering is retried for minutes (a socket
 * timeout of 2 minutes, six attempts) before the command fails, and silence would look
 * like a hang.
 */
export function retryNotice(say: (message: string) => void, everyMs = 30_000, now: () => number = Date.now): (event: RetryEvent) => void {
  let last: number | undefined;
  let quiet = 0;
  return (e) => {
    const t = now();
    if (last !== undefined && t - last < everyMs) {
      quiet++;
      return;
    }
    const more = quiet ? ` (and ${quiet} other retr${quiet === 1 ? 'y' : 'ies'} since the last notice)` : '';
    say(`storage ${e.op} of ${JSON.stringify(e.name)} failed, attempt ${e.attempt}: ${errorMessage(e.error)}; retrying in ${(e.delayMs / 1000).toFixed(1)} s${more}`);
    last = t;
    quiet = 0;
  };
}

export async function openRepository(opts: GlobalOptions, io: { signal?: AbortSignal } = {}): Promise<Repository> {
  return openAt(repositoryUrl(opts), opts, { file: opts.passwordFile, env: 'VMVAULT_PASSWORD', prompt: 'repository passphrase: ' }, io);
}

/**
 * The repository a command reads from besides its own (`vmvault copy --from-repo`): its
 * passphrase from `--from-password-file` or VMVAULT_FROM_PASSWORD; the global options
 * (--no-lock, --retry-lock) apply to it too.
 */
export async function openSourceRepository(url: string, passwordFile: string | undefined, opts: GlobalOptions, io: { signal?: AbortSignal } = {}): Promise<Repository> {
  return openAt(url, opts, { file: passwordFile, env: 'VMVAULT_FROM_PASSWORD', prompt: 'source repository passphrase: ' }, io);
}

async function openAt(url: string, opts: GlobalOptions, secret: { file: string | undefined; env: string; prompt: string }, io: { signal?: AbortSignal }): Promise<Repository> {
  const storage = storageFor({ ...opts, repo: url }, io.signal);
  const pass = await passphraseAndSource(secret.file, secret.env, secret.prompt);
  const cache = keyCacheFor(pass.source);
  const wait = lockWaitMs(opts);
  return Repository.open(storage, pass.text, {
    noLock: opts.lock === false,
    onWarning: warn,
    ...(cache ? { keyCache: cache } : {}),
    ...(wait ? { lockWait: { ms: wait, ...(io.signal ? { signal: io.signal } : {}) } } : {}),
  });
}

/**
 * This host's key cache (src/crypto/key-cache.ts) for a passphrase from `source`:
 * used for a password file or VMVAULT_PASSWORD (unattended use; the passphrase is on
 * this host already), for a typed passphrase only with VMVAULT_KEY_CACHE=on, never
 * with VMVAULT_KEY_CACHE=off. It lives in VMVAULT_KEY_CACHE_DIR, by default
 * $XDG_CACHE_HOME/vmvault/keys (~/.cache/vmvault/keys).
 */
export function keyCacheFor(source: PassphraseSource, env: NodeJS.ProcessEnv = process.env): KeyCache | undefined {
  const mode = env.VMVAULT_KEY_CACHE;
  if (mode !== undefined && !['on', 'off', 'auto', ''].includes(mode)) {
    throw new VmvaultError('BAD_INPUT', `VMVAULT_KEY_CACHE is "${mode}": use on, off or auto`);
  }
  if (mode === 'off' || (source === 'prompt' && mode !== 'on')) return undefined;
  const base = env.XDG_CACHE_HOME || (env.HOME ? path.join(env.HOME, '.cache') : undefined);
  const dir = env.VMVAULT_KEY_CACHE_DIR || (base ? path.join(base, 'vmvault', 'keys') : undefined);
  return dir ? { dir: path.resolve(dir) } : undefined;
}

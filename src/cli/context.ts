/**
 * What every repository command needs: the repository URL and the passphrase,
 * from flags or the environment, and the opened repository.
 */
import { VmvaultError } from '../errors.js';
import { openStorage } from '../storage/open.js';
import type { Storage } from '../storage/storage.js';
import { Repository } from '../repo/repository.js';
import { passphrase } from '../config/passphrase.js';

export { passphrase };

/** Warnings go to stderr, apart from the output (which may be JSON). */
export function warn(message: string): void {
  process.stderr.write(`vmvault: warning: ${message}\n`);
}

/** `lock` is false with `--no-lock` (commander's negated flag). */
export interface GlobalOptions { repo?: string; passwordFile?: string; lock?: boolean }

export function repositoryUrl(opts: GlobalOptions): string {
  const url = opts.repo ?? process.env.VMVAULT_REPOSITORY;
  if (!url) throw new VmvaultError('BAD_INPUT', 'no repository given: pass --repo URL or set VMVAULT_REPOSITORY');
  return url;
}

export function storageFor(opts: GlobalOptions): Storage {
  return openStorage(repositoryUrl(opts));
}

export async function openRepository(opts: GlobalOptions): Promise<Repository> {
  const storage = storageFor(opts);
  const pass = await passphrase(opts.passwordFile, 'VMVAULT_PASSWORD', 'repository passphrase: ');
  return Repository.open(storage, pass, { noLock: opts.lock === false, onWarning: warn });
}

/**
 * What every repository command needs: the repository URL and the passphrase,
 * from flags or the environment, and the opened repository.
 */
import { readFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import { VmvaultError } from '../errors.js';
import { openStorage } from '../storage/open.js';
import type { Storage } from '../storage/storage.js';
import { Repository } from '../repo/repository.js';

export interface GlobalOptions { repo?: string; passwordFile?: string }

export function repositoryUrl(opts: GlobalOptions): string {
  const url = opts.repo ?? process.env.VMVAULT_REPOSITORY;
  if (!url) throw new VmvaultError('BAD_INPUT', 'no repository given: pass --repo URL or set VMVAULT_REPOSITORY');
  return url;
}

export function storageFor(opts: GlobalOptions): Storage {
  return openStorage(repositoryUrl(opts));
}

/** A passphrase from a file, an environment variable, or (on a terminal only) a prompt. */
export async function passphrase(file: string | undefined, envName: string, prompt: string): Promise<string> {
  if (file) {
    try {
      const text = (await readFile(file, 'utf8')).replace(/\r?\n$/, '');
      if (!text) throw new VmvaultError('BAD_INPUT', `password file ${file} is empty`);
      return text;
    } catch (err) {
      if (err instanceof VmvaultError) throw err;
      throw new VmvaultError('BAD_INPUT', `cannot read password file ${file}: ${(err as Error).message}`);
    }
  }
  const env = process.env[envName];
  if (env) return env;
  if (process.stdin.isTTY && process.stderr.isTTY) return ask(prompt);
  const flag = envName === 'VMVAULT_NEW_PASSWORD' ? '--new-password-file' : '--password-file';
  throw new VmvaultError('BAD_INPUT', `no passphrase: set ${envName} or pass ${flag}`);
}

async function ask(prompt: string): Promise<string> {
  process.stderr.write(prompt);
  const muted = new Writable({ write: (_c, _e, cb) => cb() });
  const rl = createInterface({ input: process.stdin, output: muted, terminal: true });
  try {
    const answer = await new Promise<string>((resolve) => rl.question('', resolve));
    process.stderr.write('\n');
    return answer;
  } finally {
    rl.close();
  }
}

export async function openRepository(opts: GlobalOptions): Promise<Repository> {
  const storage = storageFor(opts);
  const pass = await passphrase(opts.passwordFile, 'VMVAULT_PASSWORD', 'repository passphrase: ');
  return Repository.open(storage, pass);
}

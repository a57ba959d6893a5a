/**
 * Where passphrases come from, for the CLI and the service alike: a file, an
 * environment variable, or (on a terminal only) a prompt.
 */
import { readFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import { VmvaultError } from '../errors.js';
import { hideFromTools } from '../tool-env.js';

/** A passphrase from a file, an environment variable, or (on a terminal only) a prompt. */
export async function passphrase(file: string | undefined, envName: string, prompt: string): Promise<string> {
  return (await passphraseAndSource(file, envName, prompt)).text;
}

/** Where a passphrase came from: one typed at a prompt is on no disk (see src/crypto/key-cache.ts). */
export type PassphraseSource = 'file' | 'env' | 'prompt';

/** `passphrase`, and where it came from. */
export async function passphraseAndSource(file: string | undefined, envName: string, prompt: string): Promise<{ text: string; source: PassphraseSource }> {
  if (file) {
    try {
      const text = (await readFile(file, 'utf8')).replace(/\r?\n$/, '');
      if (!text) throw new VmvaultError('BAD_INPUT', `password file ${file} is empty`);
      return { text, source: 'file' };
    } catch (err) {
      if (err instanceof VmvaultError) throw err;
      throw new VmvaultError('BAD_INPUT', `cannot read password file ${file}: ${(err as Error).message}`);
    }
  }
  const env = process.env[envName];
  if (env) {
    hideFromTools([envName]);
    return { text: env, source: 'env' };
  }
  if (process.stdin.isTTY && process.stderr.isTTY) return { text: await ask(prompt), source: 'prompt' };
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

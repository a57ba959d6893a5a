/**
 * Workers on other hosts joining `vmvault up`: up's own Redis listens only on a unix
 * socket unless `--redis-listen HOST:PORT` asks for TCP too, always with a password
 * (`STATE_DIR/redis.password`, mode 0600, made once). The join command up prints
 * names that Redis and up's repository; the password is never on the command line
 * that `ps` shows everyone: it is read from a file (`--redis-password-file`) or, when
 * up prints to a terminal, given in the environment (VMVAULT_REDIS_PASSWORD). What up
 * prints elsewhere (a journal, a log file) names the file only: those outlive the
 * terminal and are read by more people than the state directory is.
 */
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { parseListen } from '../config/schema.js';
import { errnoCode, VmvaultError } from '../errors.js';

export const REDIS_PASSWORD_FILE = 'redis.password';
export const REDIS_PASSWORD_ENV = 'VMVAULT_REDIS_PASSWORD';

/** The state directory's Redis password, made on first use. */
export async function stateRedisPassword(stateDir: string): Promise<{ password: string; file: string; created: boolean }> {
  const file = join(stateDir, REDIS_PASSWORD_FILE);
  try {
    const password = (await readFile(file, 'utf8')).trim();
    if (!/^[A-Za-z0-9_-]{16,256}$/.test(password)) throw new VmvaultError('BAD_INPUT', `${file} does not hold a usable Redis password: remove it (a new one is made at the next start; joined workers then need the new one)`);
    return { password, file, created: false };
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw err;
  }
  const password = randomBytes(24).toString('base64url');
  await writeFile(file, `${password}\n`, { mode: 0o600, flag: 'wx' });
  return { password, file, created: true };
}

/** `--redis-listen HOST:PORT` checked; port 0 is refused (workers need a fixed one). */
export function parseRedisListen(listen: string): { host: string; port: number } {
  const where = parseListen(listen);
  if (!where || where.port === 0) throw new VmvaultError('BAD_INPUT', `--redis-listen "${listen}": expected HOST:PORT with a fixed port, such as 0.0.0.0:6390 or 10.0.0.5:6390`);
  return where;
}

/** The Redis URL a worker on another host uses (the wildcard address becomes this host's name). */
export function joinRedisUrl(listen: { host: string; port: number }): string {
  const wild = listen.host === '0.0.0.0' || listen.host === '::';
  const host = wild ? hostname() : listen.host;
  return `redis://${host.includes(':') ? `[${host}]` : host}:${listen.port}`;
}

/**
 * The one command that starts a worker on another host, joined to this up. With
 * `password` (for a terminal only) it is given in the environment; with
 * `passwordFile` the command names the file, which that host needs a copy of.
 */
export function joinCommand(o: { redisUrl: string; repoUrl: string; passphraseFile: string } & ({ password: string } | { passwordFile: string })): string {
  const base = `vmvault --repo ${shellWord(o.repoUrl)} --password-file ${shellWord(o.passphraseFile)} worker --join ${o.redisUrl}`;
  return 'password' in o ? `${REDIS_PASSWORD_ENV}=${o.password} ${base}` : `${base} --redis-password-file ${shellWord(o.passwordFile)}`;
}

/** The password of `worker --redis-password-file FILE` (its first line; the file up made holds just that). */
export async function readRedisPasswordFile(file: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `--redis-password-file ${file}: ${(err as Error).message}; copy the file ${REDIS_PASSWORD_FILE} of up's state directory to this host`, { cause: err });
  }
  const password = text.split('\n')[0]!.trim();
  if (!password) throw new VmvaultError('BAD_INPUT', `--redis-password-file ${file} is empty: copy the file ${REDIS_PASSWORD_FILE} of up's state directory to this host`);
  return password;
}

/**
 * The Redis URL of `worker --join URL`: the password is `password` (from
 * --redis-password-file) or else VMVAULT_REDIS_PASSWORD (or the URL's own).
 * Anything but redis:// or rediss:// with a host is refused.
 */
export function joinUrlWithPassword(url: string, env: NodeJS.ProcessEnv, passwordFromFile?: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new VmvaultError('BAD_INPUT', `--join "${url}": expected redis://HOST:PORT (as printed by vmvault up --redis-listen)`);
  }
  if ((u.protocol !== 'redis:' && u.protocol !== 'rediss:') || !u.hostname) throw new VmvaultError('BAD_INPUT', `--join: expected redis://HOST:PORT (as printed by vmvault up --redis-listen), not ${u.protocol}//…`);
  const password = passwordFromFile ?? env[REDIS_PASSWORD_ENV];
  if (password) u.password = encodeURIComponent(password);
  return u.toString().replace(/\/$/, '');
}

const shellWord = (s: string): string => (/^[A-Za-z0-9_./:=@%+-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);

/**
 * The admin token of a state directory: what makes a first `vmvault up` with no
 * configuration usable. The token is printed once, when it is made; only its SHA-256
 * is kept (`STATE_DIR/admin-token.sha256`, mode 0600), and the API accepts it beside
 * the configuration's `api.tokens` (name `state-admin`, role admin). A new one
 * replaces the file (`vmvault token create`); the service reads it at start.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ApiToken, Config } from '../config/schema.js';
import { errnoCode, VmvaultError } from '../errors.js';

export const ADMIN_TOKEN_FILE = 'admin-token.sha256';
export const STATE_TOKEN_NAME = 'state-admin';

export const adminTokenPath = (stateDir: string): string => join(stateDir, ADMIN_TOKEN_FILE);

/** The stored hash, or undefined when the state directory has none. */
export async function readAdminTokenHash(stateDir: string): Promise<string | undefined> {
  const file = adminTokenPath(stateDir);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw new VmvaultError('BAD_INPUT', `cannot read ${file}: ${(err as Error).message}`, { cause: err });
  }
  const hash = text.trim().toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hash)) {
    throw new VmvaultError('BAD_INPUT', `${file} does not hold a SHA-256 in hex: remove it and restart (a new admin token is printed), or run vmvault token create`);
  }
  return hash;
}

const newToken = (): string => `vv_${randomBytes(24).toString('base64url')}`;
const sha256Hex = (token: string): string => createHash('sha256').update(token).digest('hex');

/** Makes `token`'s hash the state directory's (atomically, mode 0600). */
async function storeTokenHash(stateDir: string, token: string): Promise<void> {
  const file = adminTokenPath(stateDir);
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    await writeFile(tmp, `${sha256Hex(token)}\n`, { mode: 0o600, flag: 'wx' });
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** A new random token; its hash replaces the state directory's (atomically, mode 0600). Returns the token. */
export async function createAdminToken(stateDir: string): Promise<string> {
  const token = newToken();
  await storeTokenHash(stateDir, token);
  return token;
}

/** The configuration with the state directory's admin token added to api.tokens (a copy; vms stays shared). */
export function withStateToken(config: Config, hash: string | undefined): Config {
  if (!hash) return config;
  const token: ApiToken = { name: STATE_TOKEN_NAME, role: 'admin', sha256: hash };
  return { ...config, api: { ...config.api, tokens: [...config.api.tokens.filter((t) => t.name !== STATE_TOKEN_NAME), token] } };
}

/** The admin token a starting service uses: its hash, and what to tell the operator once it has started. */
export interface StartToken {
  /** The SHA-256 the API accepts (undefined when the configuration has its own admin token). */
  hash: string | undefined;
  /** Called once the service has started: keeps a new token's hash and prints the token, or says where the stored one is. */
  announce(say: (line: string) => void): Promise<void>;
}

/**
 * `up`'s (and serve's) admin token: with no admin token in the configuration and none
 * stored, a new one. It is kept and printed only by `announce`, once the service has
 * started: a start that fails leaves no hash of a token nobody saw, and the next start
 * makes (and prints) one again.
 */
export async function adminTokenForStart(config: Config, stateDir: string): Promise<StartToken> {
  const file = adminTokenPath(stateDir);
  const stored = await readAdminTokenHash(stateDir);
  if (stored) {
    return {
      hash: stored,
      announce: async (say) => say(`vmvault: the admin token's SHA-256 is in ${file} (the token was printed when it was made); a new one: vmvault token create --state-dir ${stateDir} (or remove the file), then restart`),
    };
  }
  if (config.api.tokens.some((t) => t.role === 'admin')) return { hash: undefined, announce: async () => {} };
  const token = newToken();
  return {
    hash: sha256Hex(token),
    announce: async (say) => {
      await storeTokenHash(stateDir, token);
      say(`vmvault: created an admin API token, shown this once (only its SHA-256 is kept, in ${file}):`);
      say(`vmvault: admin token: ${token}`);
      say(`vmvault: use it as "Authorization: Bearer TOKEN"; a new one: vmvault token create --state-dir ${stateDir}, then restart`);
    },
  };
}

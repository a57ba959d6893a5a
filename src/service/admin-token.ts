/**
 * The admin token of a state directory: what makes a first `vmvault up` with no
 * configuration usable. Only its SHA-256 is kept (`STATE_DIR/admin-token.sha256`,
 * mode 0600), and the API accepts it beside the configuration's `api.tokens` (name
 * `state-admin`, role admin). A new one replaces the file (`vmvault token create`);
 * the service reads it at start.
 *
 * The token itself is shown once, when it is made, and only on a terminal. A service
 * whose stdout is a journal or a container log (systemd, docker) would keep it there
 * for anyone who may read those, so it is written to `STATE_DIR/admin-token` (mode
 * 0600) instead, for the operator to read and delete; only its path is printed.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ApiToken, Config } from '../config/schema.js';
import { errnoCode, VmvaultError } from '../errors.js';
import { writeNewFileSynced } from '../storage/local.js';

export const ADMIN_TOKEN_FILE = 'admin-token.sha256';
/** The new token itself, when it could not be shown on a terminal: read once, then deleted by the operator. */
export const NEW_ADMIN_TOKEN_FILE = 'admin-token';
export const STATE_TOKEN_NAME = 'state-admin';

export const adminTokenPath = (stateDir: string): string => join(stateDir, ADMIN_TOKEN_FILE);
export const newAdminTokenPath = (stateDir: string): string => join(stateDir, NEW_ADMIN_TOKEN_FILE);

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

/**
 * A new random token; its hash replaces the state directory's (atomically, mode 0600).
 * A token file left by an earlier start is removed: it holds a token no longer accepted.
 * Returns the token.
 */
export async function createAdminToken(stateDir: string): Promise<string> {
  const token = newToken();
  await rm(newAdminTokenPath(stateDir), { force: true });
  await storeTokenHash(stateDir, token);
  return token;
}

/** The configuration with the state directory's admin token added to api.tokens (a copy; vms stays shared). */
export function withStateToken(config: Config, hash: string | undefined): Config {
  if (!hash) return config;
  const token: ApiToken = { name: STATE_TOKEN_NAME, role: 'admin', sha256: hash };
  return { ...config, api: { ...config.api, tokens: [...config.api.tokens.filter((t) => t.name !== STATE_TOKEN_NAME), token] } };
}

/** How `up` and `serve` tell the operator things: `terminal` when `say` reaches one (secrets may be shown). */
export interface Teller {
  say: (line: string) => void;
  terminal: boolean;
}

/** The admin token a starting service uses: its hash, and what to tell the operator once it has started. */
export interface StartToken {
  /** The SHA-256 the API accepts (undefined when the configuration has its own admin token). */
  hash: string | undefined;
  /** Called once the service has started: keeps a new token's hash and shows the token, or says where the stored one is. */
  announce(tell: Teller): Promise<void>;
}

/**
 * `up`'s (and serve's) admin token: with no admin token in the configuration and none
 * stored, a new one. It is kept and shown only by `announce`, once the service has
 * started: a start that fails leaves no hash of a token nobody saw, and the next start
 * makes one again. It is shown once on a terminal, or else written to
 * STATE_DIR/admin-token (mode 0600) with only that path printed; later starts say where
 * its hash is, how to replace it, and that the token file is still there if it is.
 */
export async function adminTokenForStart(config: Config, stateDir: string): Promise<StartToken> {
  const file = adminTokenPath(stateDir);
  const tokenFile = newAdminTokenPath(stateDir);
  const stored = await readAdminTokenHash(stateDir);
  if (stored) {
    return {
      hash: stored,
      announce: async ({ say }) => {
        say(`vmvault: the admin token's SHA-256 is in ${file}; a new one: vmvault token create --state-dir ${stateDir} (or remove the file), then restart`);
        if (existsSync(tokenFile)) say(`vmvault: ${tokenFile} still holds the admin API token; delete it once read (rm ${tokenFile})`);
      },
    };
  }
  if (config.api.tokens.some((t) => t.role === 'admin')) return { hash: undefined, announce: async () => {} };
  const token = newToken();
  return {
    hash: sha256Hex(token),
    announce: async ({ say, terminal }) => {
      if (terminal) {
        await rm(tokenFile, { force: true }); // a token no longer accepted
        await storeTokenHash(stateDir, token);
        say(`vmvault: created an admin API token, shown this once (only its SHA-256 is kept, in ${file}):`);
        say(`vmvault: admin token: ${token}`);
      } else {
        // Not a terminal: a journal or container log would keep the token for all its
        // readers. The token's file is made durable before its hash is kept: a hash
        // whose token nobody has would leave no way in but "vmvault token create".
        await rm(tokenFile, { force: true });
        await mkdir(stateDir, { recursive: true, mode: 0o700 });
        await writeNewFileSynced(tokenFile, `${token}\n`);
        await storeTokenHash(stateDir, token).catch(async (err: unknown) => {
          await rm(tokenFile, { force: true });
          throw err;
        });
        say(`vmvault: created an admin API token; it is in ${tokenFile} (mode 0600), not printed here as this output is not a terminal`);
        say(`vmvault: read it (cat ${tokenFile}) and delete the file; only its SHA-256 is kept, in ${file}`);
      }
      say(`vmvault: use it as "Authorization: Bearer TOKEN"; a new one: vmvault token create --state-dir ${stateDir}, then restart`);
    },
  };
}

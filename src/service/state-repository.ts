/**
 * The directory repository `vmvault up` keeps in its state directory
 * (`STATE_DIR/repository`), and its passphrase (`STATE_DIR/passphrase`, mode 0600).
 *
 * A repository exists once its `config` object does: Repository.init writes it last.
 * A first start that failed before then (a full disk, a kill) leaves a key file, maybe
 * an index object and temporary files, but no repository, and no start after it may
 * call that "an existing repository". What such a start left is recognised strictly
 * and made again with the same passphrase; anything else in the directory is left
 * alone and the start refuses, saying what to do.
 */
import { randomBytes } from 'node:crypto';
import { readdir, readFile, rename, rm, rmdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { passphrase as readPassphrase } from '../config/passphrase.js';
import { keyFileSchema } from '../crypto/keys.js';
import { errnoCode, errorMessage, VmvaultError } from '../errors.js';
import { Repository } from '../repo/repository.js';
import { fsyncDir, writeNewFileSynced } from '../storage/local.js';
import { TEMP_PREFIX } from '../storage/names.js';
import { openStorage } from '../storage/open.js';
import { exists } from '../files.js';

/** Clock skew allowed between the passphrase file's mtime and the key file's `created` written after it. */
const CLOCK_SLACK_MS = 60_000;

/** The directory repository of the state directory; created with a new random passphrase on first start. */
export async function stateRepository(stateDir: string, say: (line: string) => void): Promise<{ url: string; passphrase: string }> {
  const url = join(stateDir, 'repository');
  const passFile = join(stateDir, 'passphrase');
  const storage = openStorage(url);
  if (await storage.stat('config')) {
    if (!(await exists(passFile))) throw new VmvaultError('BAD_INPUT', `${url} exists but its passphrase file ${passFile} is missing: restore the file, or configure repository: { url, passwordFile } in vmvault.yaml`);
    return { url, passphrase: await readPassphrase(passFile, 'VMVAULT_PASSWORD', '') };
  }
  const left = await leftovers(url, passFile);
  // The passphrase a failed first start wrote may already be copied elsewhere: it is kept.
  const pass = left.passphrase ?? await writePassphrase(passFile);
  if (left.files.length) {
    await removeLeftovers(url, left.files);
    say(`vmvault: ${url} held what an interrupted first start left (${left.files.join(', ')}, no config): removed, and the repository is made again with the passphrase in ${passFile}`);
  }
  const repo = await Repository.init(storage, pass, { onWarning: (m) => say(`vmvault: ${m}`) });
  say(`vmvault: created the repository ${url} (id ${repo.id})`);
  say(`vmvault: its passphrase is in ${passFile} (mode 0600); without it or a paper key no backup can be restored.`);
  say('vmvault: keep a paper copy of the key offline, printed by:');
  say(`  vmvault --repo ${url} --password-file ${passFile} key export --paper`);
  return { url, passphrase: pass };
}

/**
 * A new random passphrase in `file`: written whole and synced under a temporary name,
 * renamed into place and the directory synced, before any repository depends on it.
 */
async function writePassphrase(file: string): Promise<string> {
  const pass = randomBytes(32).toString('base64url');
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await writeNewFileSynced(tmp, `${pass}\n`, 0o600);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
  await fsyncDir(join(file, '..'));
  return pass;
}

/**
 * What an interrupted Repository.init left in `url` (paths relative to it), and the
 * passphrase it was made with; nothing when `url` is missing or empty. Refuses unless
 * every entry is one init writes: `keys/` with at most one key file, made after the
 * passphrase file (so under that passphrase, by this state directory's first start),
 * `index/` with at most one index object, and temporary files of puts. With no config,
 * no chunk and no backup, such a directory holds nothing any backup needs.
 */
async function leftovers(url: string, passFile: string): Promise<{ files: string[]; passphrase?: string }> {
  const top = await entries(url);
  if (!top.length) return { files: [], ...(await exists(passFile) ? { passphrase: await readPassphrase(passFile, 'VMVAULT_PASSWORD', '') } : {}) };
  const refuse = (why: string) => new VmvaultError('BAD_INPUT',
    `${url} holds no vmvault repository (it has no "config") but is not empty, and ${why}: vmvault up leaves it alone. ` +
    `If it is what a failed first start left, remove it (rm -r ${url}) and start again; if it is a repository whose "config" was lost, put a copy of that file back (it holds no secret)`);
  const files: string[] = [];
  let keyCreated: number | undefined;
  for (const e of top) {
    if (e.startsWith(TEMP_PREFIX)) { files.push(e); continue; }
    if (e !== 'keys' && e !== 'index') throw refuse(`"${e}" is not something a first start writes before the config`);
    const inner = await entries(join(url, e)).catch((err: unknown) => { throw refuse(`${e} cannot be read as a directory (${errorMessage(err)})`); });
    const objects = inner.filter((n) => !n.startsWith(TEMP_PREFIX));
    const name = e === 'keys' ? /^[0-9a-f]{16}$/ : /^[0-9a-f]{64}$/;
    if (objects.length > 1 || objects.some((n) => !name.test(n))) throw refuse(`${e}/ holds ${objects.join(', ')}, more than a first start writes`);
    if (e === 'keys' && objects.length) {
      const file = join(url, e, objects[0]!);
      const parsed = keyFileSchema.safeParse(await readFile(file, 'utf8').then(JSON.parse).catch(() => undefined));
      if (!parsed.success) throw refuse(`${file} is not a vmvault key file`);
      keyCreated = Date.parse(parsed.data.created);
    }
    files.push(...inner.map((n) => `${e}/${n}`), `${e}/`);
  }
  if (keyCreated === undefined) return { files, ...(await exists(passFile) ? { passphrase: await readPassphrase(passFile, 'VMVAULT_PASSWORD', '') } : {}) };
  // A key file is sealed with some passphrase: only the one this state directory's passphrase file held when the key was made will do.
  const passStat = await stat(passFile).catch(() => undefined);
  if (!passStat) throw refuse(`its key file was made with a passphrase that ${passFile}, now missing, held`);
  if (!(keyCreated >= passStat.mtimeMs - CLOCK_SLACK_MS)) throw refuse(`its key file is older than ${passFile}, so it may be sealed with another passphrase`);
  return { files, passphrase: await readPassphrase(passFile, 'VMVAULT_PASSWORD', '') };
}

async function entries(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return [];
    throw err;
  }
}

/** Removes exactly the files `leftovers` listed, then their directories (rmdir: only when empty). */
async function removeLeftovers(url: string, files: readonly string[]): Promise<void> {
  for (const f of files.filter((x) => !x.endsWith('/'))) await rm(join(url, f), { force: true });
  for (const d of files.filter((x) => x.endsWith('/'))) await rmdir(join(url, d));
  await fsyncDir(url);
}

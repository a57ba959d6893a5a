/**
 * The repository under test, on either backend: a temp directory, or a fresh
 * prefix in a real S3-protocol server. Every end-to-end test runs on both.
 */
import { after } from 'node:test';
import { mkdir, mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { openStorage } from '../../src/storage/open.js';
import type { Storage } from '../../src/storage/storage.js';
import { startS3Server, type S3Server } from '../helpers/s3.js';
import { cli, cliJson, type Env } from '../helpers/cli.js';

export interface Backend {
  name: 'local' | 's3';
  /** A new, empty repository URL. */
  newRepo(): Promise<string>;
  env: Env;
  /**
   * Makes object `name` of `repo` a sparse file of `size` bytes (no disk used): a stray,
   * damaged or hostile object far larger than any valid one.
   */
  plantSparse(repo: string, name: string, size: number): Promise<void>;
  stop(): Promise<void>;
}

/**
 * What one end-to-end test file shares: both backends, and a work directory for its
 * images and restores. Both are removed after the file's tests, whatever they did.
 */
export async function e2eFile(workPrefix: string): Promise<{ all: Backend[]; work: string }> {
  const all = await backends();
  const work = await mkdtemp(join(tmpdir(), workPrefix));
  after(async () => {
    await Promise.all(all.map((b) => b.stop()));
    await rm(work, { recursive: true, force: true });
  });
  return { all, work };
}

export async function backends(): Promise<Backend[]> {
  const base = await mkdtemp(join(tmpdir(), 'vmvault-repos-'));
  let n = 0;
  const local: Backend = {
    name: 'local',
    newRepo: async () => join(base, `repo-${n++}`),
    env: {},
    plantSparse: async (repo, name, size) => sparseFile(join(repo, name), size),
    stop: () => rm(base, { recursive: true, force: true }),
  };
  const s3: S3Server = await startS3Server();
  const remote: Backend = {
    name: 's3',
    newRepo: async () => s3.repoUrl(`repo-${randomBytes(4).toString('hex')}`),
    env: s3.env,
    plantSparse: async (repo, name, size) => {
      const storage = openStorage(repo);
      try { await storage.put(name, new Uint8Array(1)); } finally { await storage.close(); }
      const prefix = new URL(repo).pathname.replace(/^\/+/, '');
      await sparseFile(s3.objectFile(`${prefix}/${name}`), size);
    },
    stop: () => s3.stop(),
  };
  return [local, remote];
}

export const PASSWORD = 'test passphrase';

/** Environment for a CLI run against `repo`. */
export function envFor(b: Backend, repo: string, extra: Env = {}): Env {
  return { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, ...b.env, VMVAULT_REPOSITORY: repo, VMVAULT_PASSWORD: PASSWORD, ...extra };
}

/** A fresh repository with fast (weak) key derivation, for tests only. */
export async function initRepo(b: Backend, extraArgs: string[] = []): Promise<{ repo: string; env: Env; id: string }> {
  const repo = await b.newRepo();
  const env = envFor(b, repo);
  const r = await cli(['init', '--kdf', 'weak', ...(extraArgs.includes('--json') ? [] : ['--json']), ...extraArgs], env);
  if (r.code !== 0) throw new Error(`init failed: ${r.stderr}`);
  return { repo, env, id: (JSON.parse(r.stdout) as { id: string }).id };
}

/** Every object name in the repository, with sizes. */
export async function objects(repo: string): Promise<Map<string, number>> {
  const storage: Storage = openStorage(repo);
  const out = new Map<string, number>();
  try {
    for await (const o of storage.list('')) out.set(o.name, o.size);
  } finally {
    await storage.close();
  }
  return out;
}

export async function backupJson(env: Env, vm: string, disks: string[], more: string[] = []): Promise<any> {
  return cliJson(['backup', '--vm', vm, ...disks.flatMap((d) => ['--disk', d]), ...more], env);
}

/** A file of `size` bytes that takes no disk space (ftruncate of an empty file). */
async function sparseFile(file: string, size: number): Promise<void> {
  await mkdir(dirname(file), { recursive: true });
  const fh = await open(file, 'w', 0o600);
  try { await fh.truncate(size); } finally { await fh.close(); }
}

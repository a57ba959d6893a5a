/**
 * A whole vmvault service for end-to-end tests: a directory repository, a service
 * configuration, `vmvault serve` (scheduler + API on a free port) and one
 * `vmvault worker` per host, all real processes over the caller's redis-server.
 */
import { createHash } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { start, stopProc, waitFor, type Proc } from './procs.js';

export interface ServiceOptions {
  /** A private directory: the repository, configuration, policies and state go in it. */
  dir: string;
  redisUrl: string;
  passphrase: string;
  /** Bearer tokens by role, stored in the configuration as their SHA-256. */
  tokens: Record<string, string>;
  /** `hosts:` lines (YAML, indented by two spaces), e.g. `hosta: { restoreRoots: [...] }`. */
  hosts?: string[];
  /** `vms:` entries (YAML flow mappings). */
  vms: string[];
  /** A worker is started for each (default: hosta). */
  workers?: string[];
  /** Policy files to write before the service starts, by file name. */
  policies?: Record<string, string>;
  /** More top-level configuration lines (YAML). */
  extraConfig?: string[];
  /** More environment for every process (e.g. VMVAULT_HEARTBEAT_MS). */
  env?: Record<string, string>;
}

export interface TestService {
  api: string;
  /** The worker processes, by host (to kill one). */
  workers: Map<string, Proc>;
  repoUrl: string;
  configFile: string;
  /** Every process's output so far, for diagnostics. */
  output(): string;
  stop(): Promise<void>;
}

const sha = (s: string) => createHash('sha256').update(s).digest('hex');

export async function startService(o: ServiceOptions): Promise<TestService> {
  const repoUrl = join(o.dir, 'repo');
  const passFile = join(o.dir, 'password');
  const policiesDir = join(o.dir, 'policies');
  await mkdir(policiesDir);
  for (const [file, text] of Object.entries(o.policies ?? {})) await writeFile(join(policiesDir, file), text);
  await writeFile(passFile, `${o.passphrase}\n`, { mode: 0o600 });
  await Repository.init(new LocalStorage(repoUrl), o.passphrase, { kdf: 'weak' });
  const configFile = join(o.dir, 'vmvault.yaml');
  await writeFile(configFile, [
    `repository: { url: ${JSON.stringify(repoUrl)}, passwordFile: ${JSON.stringify(passFile)} }`,
    `redis: { url: ${JSON.stringify(o.redisUrl)} }`,
    'host: hosta',
    `policiesDir: ${JSON.stringify(policiesDir)}`,
    `stateDir: ${JSON.stringify(join(o.dir, 'state'))}`,
    'api:',
    '  listen: "127.0.0.1:0"',
    '  tokens:',
    ...Object.entries(o.tokens).map(([role, t]) => `    - { name: ${role}-token, role: ${role}, sha256: ${sha(t)} }`),
    ...(o.hosts?.length ? ['hosts:', ...o.hosts.map((h) => `  ${h}`)] : []),
    'vms:',
    ...o.vms.map((v) => `  - ${v}`),
    ...(o.extraConfig ?? []),
    '',
  ].join('\n'));
  const env = { VMVAULT_CONFIG: configFile, VMVAULT_NO_CATCH_UP: '1', ...o.env };
  const workers = o.workers ?? ['hosta'];
  const serve = start(['serve'], env);
  const byHost = new Map(workers.map((h) => [h, start(['worker', '--host', h], env)]));
  const procs: Proc[] = [serve, ...byHost.values()];
  const output = () => procs.map((p) => p.output()).join('\n');
  const stop = async () => { for (const p of procs) await stopProc(p).catch(() => {}); };
  try {
    const api = await waitFor('the API to listen', () => /"url":"(http:\/\/127\.0\.0\.1:\d+)"[^\n]*API listening/.exec(serve.output())?.[1], 30_000, output);
    await waitFor('the workers', () => (output().match(/worker started/g) ?? []).length >= workers.length, 30_000, output);
    return { api, workers: byHost, repoUrl, configFile, output, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/**
 * Reading the service configuration (`vmvault.yaml`): YAML → zod (see schema.ts),
 * every problem reported as `FILE:LINE:COL: key.path: message`, with the same
 * helpers as policy files. Relative paths in the file (stateDir, policiesDir,
 * repository.passwordFile, a directory repository) are relative to the file's
 * directory, so the service behaves the same whatever its working directory.
 */
import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { dirname, isAbsolute, resolve } from 'node:path';
import { VmvaultError } from '../errors.js';
import { hideFromTools } from '../tool-env.js';
import { formatProblem, validateYaml, type PolicyProblem, type YamlFileKind } from '../policy/load.js';
import { parseRepositoryUrl } from '../storage/open.js';
import { checkConfig, CONFIG_KEYS, configSchema, DEFAULT_POLICIES_DIR, effectiveDiskName, type Config, type RepositoryConfig, type VmConfig } from './schema.js';

/** One problem in the configuration file; `line` and `col` are 1-based. */
export type ConfigProblem = PolicyProblem;

/** A configuration file that cannot be used; `problems` lists every error, the message prints them one per line. */
export class ConfigFileError extends VmvaultError {
  readonly problems: ConfigProblem[];
  constructor(problems: ConfigProblem[]) {
    super('BAD_INPUT', problems.map(formatProblem).join('\n'));
    this.name = 'ConfigFileError';
    this.problems = problems;
  }
}

const CONFIG_FILE: YamlFileKind = { root: '(config)', empty: 'the file is empty: expected at least vms: [...]', keys: CONFIG_KEYS };

/** The configuration file to read: `--config`, else `VMVAULT_CONFIG`, else undefined (none given). */
export function configPathFrom(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): string | undefined {
  return flag ?? (env.VMVAULT_CONFIG || undefined);
}

/**
 * Parses and validates the configuration's text. `file` names it in messages and
 * anchors its relative paths. `host` replaces os.hostname() as the default host.
 * Throws ConfigFileError (BAD_INPUT) listing every problem.
 */
export function parseConfig(text: string, file: string, options: { host?: string } = {}): Config {
  const defaultHost = options.host ?? hostname();
  const schema = options.host === undefined ? configSchema : configSchema.extend({ host: configSchema.shape.host.removeDefault().default(defaultHost) });
  const result = validateYaml(text, file, schema, CONFIG_FILE, (raw, position) => checkConfig(raw, position, defaultHost));
  if (!result.ok) throw new ConfigFileError(result.problems);
  const parsed = result.value;
  const dir = dirname(resolve(file));
  const repo = parsed.repository;
  const copy = parsed.maintenance.copy;
  const config: Config = {
    ...parsed,
    repository: repo && relativeTo(repo, dir),
    maintenance: { ...parsed.maintenance, ...(copy ? { copy: { ...copy, to: relativeTo(copy.to, dir) } } : {}) },
    stateDir: resolve(dir, parsed.stateDir),
    policiesDir: resolve(dir, parsed.policiesDir ?? DEFAULT_POLICIES_DIR),
    policiesDirDefaulted: parsed.policiesDir === undefined,
    vms: parsed.vms.map((vm) => ({
      ...vm,
      host: vm.host ?? parsed.host,
      disks: vm.disks.map((d) => ({ ...d, name: effectiveDiskName(d)! })),
    })),
    api: { listen: parsed.api.listen, tokens: parsed.api.tokens.map(({ token: _token, ...t }) => t), ...(parsed.api.publicUrl ? { publicUrl: parsed.api.publicUrl } : {}) },
  };
  // Whatever they are called, the variables that hold this configuration's secrets stay out of qemu's and the other tools' environment.
  hideFromTools(secretEnvNames(config));
  return config;
}

/** A repository's URL (a directory) and password file, relative to the configuration's directory. */
function relativeTo(repo: RepositoryConfig, dir: string): RepositoryConfig {
  return repo.passwordFile !== undefined
    ? { url: relativeRepository(repo.url, dir), passwordFile: resolve(dir, repo.passwordFile) }
    : { url: relativeRepository(repo.url, dir), passwordEnv: repo.passwordEnv };
}

/** The environment variables the configuration takes a secret from. */
export function secretEnvNames(config: Config): string[] {
  const repo = config.repository;
  const copyTo = config.maintenance.copy?.to;
  return [
    ...(repo && 'passwordEnv' in repo && repo.passwordEnv ? [repo.passwordEnv] : []),
    ...(copyTo && 'passwordEnv' in copyTo && copyTo.passwordEnv ? [copyTo.passwordEnv] : []),
    ...(config.alerts?.webhooks ?? []).flatMap((w) => (w.secretEnv ? [w.secretEnv] : [])),
    ...(config.alerts?.email?.smtp.passwordEnv ? [config.alerts.email.smtp.passwordEnv] : []),
  ];
}

/** A directory repository written as a relative path is relative to the configuration file. */
function relativeRepository(url: string, dir: string): string {
  const where = parseRepositoryUrl(url);
  return where.kind === 'local' && url === where.path && !isAbsolute(url) ? resolve(dir, url) : url;
}

/** Reads and validates the configuration file. Throws ConfigFileError, or BAD_INPUT when it cannot be read. */
export async function loadConfig(file: string, options: { host?: string } = {}): Promise<Config> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `${file}: cannot read configuration file: ${(err as Error).message}`, { cause: err });
  }
  return parseConfig(text, file, options);
}

/**
 * The VMs a policy's selection designates (named, or carrying one of the tags), in
 * inventory order, and the names it mentions that the inventory lacks (for
 * `unknown VM "x" in policy P`).
 */
export function selectVms(config: Pick<Config, 'vms'>, select: { vms?: readonly string[]; tags?: readonly string[] }): { vms: VmConfig[]; unknown: string[] } {
  const names = new Set(select.vms ?? []);
  const tags = new Set(select.tags ?? []);
  const vms = config.vms.filter((vm) => names.has(vm.name) || vm.tags.some((t) => tags.has(t)));
  const known = new Set(config.vms.map((vm) => vm.name));
  return { vms, unknown: [...names].filter((n) => !known.has(n)) };
}

/** The VMs whose disks live on `host` (the ones its worker backs up). */
export function vmsOnHost(config: Pick<Config, 'vms'>, host: string): VmConfig[] {
  return config.vms.filter((vm) => vm.host === host);
}

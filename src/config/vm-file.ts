/**
 * The VM file of the state directory (`STATE_DIR/vms.yaml`): VMs added without
 * editing the configuration, by hand or through the API (`POST /v1/vms`). It holds
 * `vms: [...]` with the same schema as the configuration's `vms`, checked the same
 * way (every problem as `FILE:LINE:COL: key.path: message`), plus one rule: a name
 * the configuration already uses is an error. The service merges both lists and
 * reloads this file when it changes (./inventory.ts).
 *
 * Writes are atomic (a temporary file renamed over the old one), so a reader never
 * sees half a file, and keep what was written (the raw entries), not the defaults.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { lazy } from '../lazy-require.js';
import * as z from 'zod';
import { errnoCode, VmvaultError } from '../errors.js';
import { formatProblem, validateYaml, type YamlFileKind } from '../policy/load.js';
import { ConfigFileError } from './load.js';
import { checkConfig, CONFIG_KEYS, effectiveDiskName, vmSchema, type Config, type VmConfig } from './schema.js';

const yaml = lazy<typeof import('yaml')>('yaml');

export const VM_FILE_NAME = 'vms.yaml';

export const vmFilePath = (stateDir: string): string => join(stateDir, VM_FILE_NAME);

const fileSchema = z.strictObject({
  vms: z.array(vmSchema, { error: 'expected a list of VMs' }).default([]),
}, { error: 'expected a mapping with vms: [...]' });

/** One VM as written in the file (and as POST /v1/vms takes it): no defaults applied. */
export type VmEntry = z.input<typeof vmSchema>;

const KIND: YamlFileKind = { root: '(vms)', empty: 'the file is empty: expected vms: [...]', keys: CONFIG_KEYS };

/** What the file must agree with: the configuration's host, its hosts and the names of its own VMs. */
export type InventoryBase = Pick<Config, 'host' | 'hosts'> & { configured: readonly string[] };

/**
 * Parses and checks the file's text against the configuration. Returns its VMs with
 * their host and disk names; throws ConfigFileError (BAD_INPUT) listing every problem.
 */
export function parseVmFile(text: string, file: string, base: InventoryBase): VmConfig[] {
  const taken = new Set(base.configured);
  const result = validateYaml(text, file, fileSchema, KIND, (raw, position) => {
    const vms = Array.isArray((raw as { vms?: unknown })?.vms) ? (raw as { vms: unknown[] }).vms : [];
    const issues = checkConfig({ host: base.host, hosts: base.hosts, vms }, position, base.host);
    vms.forEach((v, i) => {
      const name = (v as { name?: unknown } | null)?.name;
      if (typeof name === 'string' && taken.has(name)) {
        issues.push({ path: ['vms', i, 'name'], message: `VM name "${name}" is already used by the configuration file: choose another name, or edit the VM there` });
      }
    });
    return issues;
  });
  if (!result.ok) throw new ConfigFileError(result.problems);
  return result.value.vms.map((vm) => ({
    ...vm,
    host: vm.host ?? base.host,
    disks: vm.disks.map((d) => ({ ...d, name: effectiveDiskName(d)! })),
  }));
}

/** The file's text, or undefined when there is none. */
export async function readVmFileText(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw new VmvaultError('BAD_INPUT', `${file}: cannot read the VM file: ${(err as Error).message}`, { cause: err });
  }
}

/** The raw entries of a valid file (to add or remove one and write it back). */
export function vmEntriesOf(text: string | undefined): VmEntry[] {
  if (text === undefined) return [];
  const doc = validateYaml(text, '(vms)', z.object({ vms: z.array(z.unknown()).default([]) }).loose(), KIND);
  return doc.ok ? doc.value.vms as VmEntry[] : [];
}

/**
 * Checks `entries` as a file would be checked, then replaces the file atomically.
 * Throws ConfigFileError naming the problems (against the would-be file) and
 * leaves the file as it was.
 */
export async function writeVmFile(file: string, entries: readonly VmEntry[], base: InventoryBase): Promise<VmConfig[]> {
  const text = `# VMs added through the API or by hand; same schema as vms: in vmvault.yaml (reloaded while running)\n${yaml().stringify({ vms: entries })}`;
  const vms = parseVmFile(text, file, base);
  await mkdir(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    await writeFile(tmp, text, { mode: 0o600, flag: 'wx' });
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  return vms;
}

/** The problems of a ConfigFileError, one per line, for logs. */
export const problemLines = (err: ConfigFileError): string[] => err.problems.map(formatProblem);

/**
 * Names that become files: disk names and config file names come from manifests,
 * which an attacker with write access to the storage cannot forge (they are
 * authenticated), but a restore must still never write outside its directory.
 * Pure functions.
 */
import { basename, extname, resolve, sep } from 'node:path';
import { VmvaultError } from '../errors.js';

export const FORMAT_EXT: Record<string, string> = { qcow2: 'qcow2', raw: 'raw', vmdk: 'vmdk', vdi: 'vdi' };

/** Throws unless `name` is a plain file name: no separators, no `..`, no NUL, not empty. */
export function assertSafeName(name: string, what: string): void {
  const bad =
    name.length === 0 || name.length > 200 || name === '.' || name === '..' ||
    name.includes('/') || name.includes('\\') || name.includes('\0') || name.startsWith('.') ||
    /[\x00-\x1f]/.test(name);
  if (bad) throw new VmvaultError('BAD_INPUT', `${what} "${name}" is not a plain file name: it must not be empty, contain "/", "\\" or control characters, or start with "."`);
}

/** A disk's default name: the file name without its extension, in safe characters. */
export function diskNameFromPath(path: string): string {
  const base = basename(path, extname(path)).replace(/[^A-Za-z0-9._+-]/g, '_').replace(/^\.+/, '');
  return base || 'disk';
}

/** Makes names unique by suffixing -2, -3… in order of appearance. */
export function uniqueNames(names: readonly string[]): string[] {
  const seen = new Set<string>();
  return names.map((n) => {
    let name = n;
    for (let i = 2; seen.has(name); i++) name = `${n}-${i}`;
    seen.add(name);
    return name;
  });
}

/** `dir/name`, refusing anything that would resolve outside `dir`. */
export function pathInside(dir: string, name: string, what: string): string {
  assertSafeName(name, what);
  const root = resolve(dir);
  const full = resolve(root, name);
  if (!full.startsWith(root + sep)) throw new VmvaultError('BAD_INPUT', `${what} "${name}" would be written outside ${root}`);
  return full;
}

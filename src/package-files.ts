/**
 * vmvault's own files at run time. The same module may run from tsc's output
 * (dist/src/<layer>/) or from the CLI bundle (dist/cli/, see scripts/bundle.mjs), so a
 * path relative to import.meta.url differs between the two; one relative to the
 * package root (the nearest package.json named vmvault above this file) does not.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

let found: { root: string; version: string } | null | undefined;

interface PackageJson { name?: string; version?: string }

/**
 * The nearest directory at or above `start` holding a package.json that `wanted`
 * accepts, with that package.json; undefined when there is none up to the root.
 */
export function packageAbove(start: string, wanted: (pkg: PackageJson) => boolean): { root: string; pkg: PackageJson } | undefined {
  let dir = start;
  for (;;) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as PackageJson;
      if (wanted(pkg)) return { root: dir, pkg };
    } catch {
      /* none here: look further up */
    }
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

function findPackage(): { root: string; version: string } | null {
  if (found !== undefined) return found;
  const at = packageAbove(dirname(fileURLToPath(import.meta.url)), (pkg) => pkg.name === 'vmvault' && !!pkg.version);
  return (found = at ? { root: at.root, version: at.pkg.version! } : null);
}

/** package.json's version, so the one number there is the only one to change at a release. */
export function packageVersion(): string {
  return findPackage()?.version ?? 'unknown';
}

/** A directory of tsc's output, e.g. builtDir('src/api/ui') for the dashboard's compiled modules. */
export function builtDir(relative: string): URL {
  const root = findPackage()?.root;
  if (!root) throw new Error(`vmvault's package.json was not found above ${fileURLToPath(import.meta.url)}: reinstall vmvault`);
  return new URL(`${relative.replace(/\/?$/, '/')}`, pathToFileURL(join(root, 'dist') + '/'));
}

/**
 * vmvault's version: package.json's, read at run time from the nearest package.json
 * above this file (src/cli/ when run from source, dist/src/cli/ when built), so the
 * one number in package.json is the only one to change at a release.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export function packageVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'vmvault' && pkg.version) return pkg.version;
    } catch {
      /* none here: look further up */
    }
    const parent = dirname(dir);
    if (parent === dir) return 'unknown';
    dir = parent;
  }
}

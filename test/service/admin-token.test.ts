/**
 * The admin token of a starting service is kept and printed only once the service has
 * started: a start that fails leaves no hash of a token nobody saw, and the next start
 * makes and prints one.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { test } from 'node:test';
import { adminTokenForStart } from '../../src/service/admin-token.js';
import { defaultConfig } from '../../src/service/service.js';
import { tempDir } from '../helpers/images.js';

test('a new admin token is stored and printed by announce only; a later start names the stored one', async () => {
  const dir = await tempDir('vv-admin-token-');
  try {
    const config = defaultConfig(dir.path);
    // A start that fails before announcing: nothing kept, nothing said.
    const failed = await adminTokenForStart(config, dir.path);
    assert.match(failed.hash ?? '', /^[0-9a-f]{64}$/);
    assert.deepEqual(await readdir(dir.path), []);

    const started = await adminTokenForStart(config, dir.path);
    assert.notEqual(started.hash, failed.hash, 'a new token');
    const said: string[] = [];
    await started.announce((l) => said.push(l));
    const token = /admin token: (\S+)/.exec(said.join('\n'))?.[1] ?? '';
    assert.equal(createHash('sha256').update(token).digest('hex'), started.hash);
    assert.equal((await readFile(`${dir.path}/admin-token.sha256`, 'utf8')).trim(), started.hash);

    const again = await adminTokenForStart(config, dir.path);
    assert.equal(again.hash, started.hash);
    said.length = 0;
    await again.announce((l) => said.push(l));
    assert.doesNotMatch(said.join('\n'), /admin token: /);
    assert.match(said.join('\n'), /SHA-256 is in .*admin-token\.sha256/);
  } finally {
    await dir.cleanup();
  }
});

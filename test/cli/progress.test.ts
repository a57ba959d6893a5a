/** The progress bar shows on a terminal only, and never with --json. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { makeImage } from '../helpers/images.js';
import { BIN, cli } from '../helpers/cli.js';

test('backup and restore show bytes, rate and ETA on a terminal, and nothing otherwise', async (t) => {
  const work = await mkdtemp(join(tmpdir(), 'vmvault-progress-'));
  t.after(() => rm(work, { recursive: true, force: true }));
  const env = { PATH: process.env.PATH, HOME: process.env.HOME, VMVAULT_REPOSITORY: join(work, 'repo'), VMVAULT_PASSWORD: 'pw' };
  assert.equal((await cli(['init', '--kdf', 'weak'], env)).code, 0);
  const img = await makeImage(work, 'p', 'qcow2', 64 * 1024 * 1024, [{ offset: 0, length: 8 << 20, pattern: 3 }]);
  // util-linux `script` gives the command a pseudo-terminal.
  const onTty = await execa('script', ['-qec', `${process.execPath} ${BIN} backup --vm p --disk ${img}`, '/dev/null'], { env, reject: false });
  assert.equal(onTty.exitCode, 0, String(onTty.stdout));
  assert.match(String(onTty.stdout), /backup p \[#+\] 100% .* ETA/);
  const piped = await cli(['backup', '--vm', 'p', '--disk', img], env);
  assert.equal(piped.code, 0);
  assert.doesNotMatch(piped.stderr + piped.stdout, /ETA/);
  const json = await execa('script', ['-qec', `${process.execPath} ${BIN} backup --vm p --disk ${img} --json`, '/dev/null'], { env, reject: false });
  assert.doesNotMatch(String(json.stdout), /ETA/);
  const [first] = JSON.parse((await cli(['backups', '--json'], env)).stdout);
  const restored = await execa('script', ['-qec', `${process.execPath} ${BIN} restore ${first.id.slice(0, 8)} --to ${join(work, 'out')}`, '/dev/null'], { env, reject: false });
  assert.equal(restored.exitCode, 0, String(restored.stdout));
  assert.match(String(restored.stdout), /restore p \[#+\] 100% .* ETA/);
});

/**
 * The systemd units of deploy/systemd/: systemd-analyze verify accepts them (with
 * the vmvault command replaced by an executable that exists here), and every
 * ExecStart, including the join override shown in a comment, is a real vmvault
 * command line: its subcommand's --help works and names every option it passes.
 */
import assert from 'node:assert/strict';
import { chmod, copyFile, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { cli } from '../helpers/cli.js';
import { BASE_ENV } from '../helpers/procs.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const UNITS = fileURLToPath(new URL('../../../deploy/systemd/', import.meta.url));
const BIN = '/usr/local/bin/vmvault';

/** ExecStart lines of a unit, the commented examples included, as argument lists after the binary. */
function execStarts(text: string): { line: string; args: string[] }[] {
  return text.split('\n')
    .map((l) => /^(?:#\s*)?ExecStart=(\S.*)$/.exec(l.trim())?.[1])
    .filter((l): l is string => l !== undefined)
    .map((line) => {
      const [bin, ...args] = line.split(/\s+/);
      assert.equal(bin, BIN, `ExecStart runs ${BIN}: ${line}`);
      return { line, args };
    });
}

describe('systemd units', () => {
  let dir: TempDir;
  let files: string[];
  before(async () => {
    dir = await tempDir('vv-systemd-');
    files = (await readdir(UNITS)).filter((f) => f.endsWith('.service')).sort();
  });
  after(async () => dir.cleanup());

  test('there are units for serve, worker and up', () => {
    assert.deepEqual(files, ['vmvault-up.service', 'vmvault-worker.service', 'vmvault.service']);
  });

  test('every ExecStart is a vmvault command whose --help works and knows each option given', async () => {
    const seen = new Set<string>();
    for (const f of files) {
      for (const { line, args } of execStarts(await readFile(join(UNITS, f), 'utf8'))) {
        const sub = args.find((a, i) => /^[a-z]+$/.test(a) && !(args[i - 1] ?? '').startsWith('-'));
        assert.ok(sub === 'serve' || sub === 'worker' || sub === 'up', `${f}: ${line}`);
        seen.add(sub);
        const help = await cli([sub, '--help'], BASE_ENV);
        assert.equal(help.code, 0, help.stderr);
        const globalHelp = await cli(['--help'], BASE_ENV);
        for (const opt of args.filter((a) => a.startsWith('--'))) {
          assert.ok(help.stdout.includes(opt) || globalHelp.stdout.includes(opt), `${f}: ${opt} is an option of vmvault ${sub}`);
        }
        // The whole line parses: with --help appended, commander checks it and prints help (exit 0).
        const parsed = await cli([...args, '--help'], BASE_ENV);
        assert.equal(parsed.code, 0, `${line}: ${parsed.stderr}`);
      }
    }
    assert.deepEqual([...seen].sort(), ['serve', 'up', 'worker']);
  });

  test('systemd-analyze verify accepts them', async () => {
    const which = await execa('sh', ['-c', 'command -v systemd-analyze'], { reject: false });
    assert.equal(which.exitCode, 0, 'systemd-analyze is not installed: apt-get install systemd (.ci/run does)');
    // The vmvault command is not installed at /usr/local/bin here: point ExecStart at an executable that is.
    const exe = join(dir.path, 'vmvault');
    await writeFile(exe, '#!/bin/sh\nexit 0\n');
    await chmod(exe, 0o755);
    for (const f of files) {
      await copyFile(join(UNITS, f), join(dir.path, f));
      await writeFile(join(dir.path, f), (await readFile(join(UNITS, f), 'utf8')).replaceAll(BIN, exe));
    }
    const r = await execa('systemd-analyze', ['verify', ...files.map((f) => join(dir.path, f))], { reject: false });
    assert.equal(r.exitCode, 0, r.stderr);
    assert.equal(r.stderr.trim(), '', 'no warning either (an unknown key is only a warning)');
  });
});

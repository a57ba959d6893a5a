/**
 * Restore drills with real qemu-system-x86_64 (TCG): a hand-made boot sector is backed
 * up, then booted through vmvault's NBD export of the backup (no copy) in an isolated
 * QEMU. A bootable one is boot-verified and shown so in `backups` and `show`; one whose
 * signature was zeroed fails, keeps its screenshot and serial log, exits non-zero and
 * is recorded boot-failed.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { cli, cliJson, type Env } from '../helpers/cli.js';
import { BOOT_MARKER, makeBootImage } from '../helpers/boot-image.js';
import { tempDir, type TempDir } from '../helpers/images.js';

let dir: TempDir;
let env: Env;
let stateDir: string;
let good: string;
let bad: string;

before(async () => {
  dir = await tempDir('vmvault-drill-');
  stateDir = join(dir.path, 'state');
  env = { PATH: process.env.PATH, HOME: process.env.HOME, TMPDIR: process.env.TMPDIR, VMVAULT_REPOSITORY: join(dir.path, 'repo'), VMVAULT_PASSWORD: 'drill test' };
  const init = await cli(['init', '--kdf', 'weak'], env);
  assert.equal(init.code, 0, init.stderr);
  const goodDisk = await makeBootImage(dir.path, 'good.raw');
  const badDisk = await makeBootImage(dir.path, 'bad.raw', { bootable: false });
  good = (await cliJson(['backup', '--vm', 'good', '--disk', goodDisk, '--format', 'raw'], env)).id;
  bad = (await cliJson(['backup', '--vm', 'bad', '--disk', badDisk, '--format', 'raw'], env)).id;
});

after(async () => { await dir?.cleanup(); });

const isPpm = (file: string) => readFileSync(file).subarray(0, 2).toString('latin1') === 'P6';

describe('vmvault drill', () => {
  test('a bootable backup, named by its VM: boot-verified through the NBD export, with its serial log and screenshot, shown in backups and show', async () => {
    const r = await cli(['drill', 'good', '--serial', BOOT_MARKER, '--timeout', '60', '--memory', '32', '--machine', 'pc,accel=tcg', '--state-dir', stateDir, '--json'], env);
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.backup, good, 'the VM name means its newest backup');
    assert.equal(out.status, 'boot-verified');
    assert.equal(out.probe, `serial "${BOOT_MARKER}"`);
    assert.equal(out.directory, join(stateDir, 'drills', good));
    assert.match(readFileSync(out.serialLog, 'utf8'), new RegExp(BOOT_MARKER));
    assert.ok(out.screenshot && isPpm(out.screenshot), 'a PPM screenshot is kept');
    assert.deepEqual((await readdir(out.directory)).sort(), ['result.json', 'screen.ppm', 'serial.log'], 'only the kept files: no overlay or socket is left');

    const listed = (await cliJson(['backups'], env)).find((b: any) => b.id === good);
    assert.equal(listed.verification.status, 'boot-verified');
    assert.equal(listed.verification.boot.time, out.time);
    const table = await cli(['backups'], env);
    assert.match(table.stdout, new RegExp(`${good.slice(0, 12)}.*boot-verified ${out.time.slice(0, 10)}`));
    const shown = await cli(['show', good.slice(0, 8)], env);
    assert.match(shown.stdout, new RegExp(`verified boot-verified at ${out.time.replace(/\./g, '\\.')} \\(drill, serial "${BOOT_MARKER}"\\)`));
  });

  test('an unbootable backup (signature zeroed): the drill fails, exits 1, keeps screenshot and serial log, records boot-failed with the reason', async () => {
    const r = await cli(['drill', bad.slice(0, 10), '--serial', BOOT_MARKER, '--timeout', '8', '--memory', '32', '--machine', 'pc,accel=tcg', '--state-dir', stateDir, '--json'], env);
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stderr, new RegExp(`the drill of backup ${bad.slice(0, 12)} of bad failed: "${BOOT_MARKER}" did not appear on the serial console within 8 s; recorded as boot-failed`));
    const out = JSON.parse(r.stdout);
    assert.equal(out.status, 'boot-failed');
    assert.ok(existsSync(out.serialLog), 'the serial log is kept');
    assert.doesNotMatch(readFileSync(out.serialLog, 'utf8'), new RegExp(BOOT_MARKER));
    assert.ok(out.screenshot && isPpm(out.screenshot), 'the screenshot is kept');
    assert.equal(JSON.parse(readFileSync(join(stateDir, 'drills', bad, 'result.json'), 'utf8')).status, 'boot-failed');

    const listed = (await cliJson(['backups'], env)).find((b: any) => b.id === bad);
    assert.equal(listed.verification.status, 'boot-failed');
    assert.match(listed.verification.boot.reason, /did not appear on the serial console within 8 s/);
    assert.match((await cli(['show', bad], env)).stdout, /verified BOOT-FAILED at .* \(drill\): "VMVAULT-BOOT-OK" did not appear/);
    // The good one is untouched by the other's drill.
    assert.equal((await cliJson(['backups'], env)).find((b: any) => b.id === good).verification.status, 'boot-verified');
  });

  test('the guest-agent and TCP probes fail with their own reasons when nothing answers; bad probe flags are refused', async () => {
    const agent = await cli(['drill', good, '--guest-agent', '--timeout', '5', '--memory', '32', '--machine', 'pc,accel=tcg', '--state-dir', stateDir], env);
    assert.equal(agent.code, 1, agent.stdout);
    assert.match(agent.stderr, /the guest agent did not answer guest-ping within 5 s/);
    const tcp = await cli(['drill', good, '--tcp', '22', '--timeout', '5', '--memory', '32', '--machine', 'pc,accel=tcg', '--state-dir', stateDir], env);
    assert.equal(tcp.code, 1, tcp.stdout);
    assert.match(tcp.stderr, /nothing answered on guest TCP port 22 within 5 s/);
    assert.equal((await cliJson(['backups'], env)).find((b: any) => b.id === good).verification.status, 'boot-failed', 'the newest drill counts');
    const both = await cli(['drill', good, '--tcp', '22', '--guest-agent', '--state-dir', stateDir], env);
    assert.match(both.stderr, /give one probe/);
    const nobody = await cli(['drill', 'nosuchvm', '--state-dir', stateDir], env);
    assert.match(nobody.stderr, /"nosuchvm" is neither a backup id nor a VM with backups/);
  });
});

/**
 * The drill runner on its own, against a disk served by stock `qemu-nbd --read-only -f raw`
 * over TCP (the export's other URI form): it boots, the probe sees the marker, the guest's
 * writes stay in the throwaway overlay (the image is unchanged), nothing is left behind.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, readdir } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import { execa, type ResultPromise } from 'execa';
import { nbdBlockdev, runDrill } from '../../src/vm/drill-run.js';
import { BOOT_MARKER, makeBootImage } from '../helpers/boot-image.js';
import { tempDir, type TempDir } from '../helpers/images.js';
import { freePort } from '../helpers/ports.js';

let dir: TempDir;
let image: string;
let port: number;
let server: ResultPromise | undefined;

const sha = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');

before(async () => {
  dir = await tempDir('vmvault-drill-run-');
  image = await makeBootImage(dir.path, 'boot.raw');
  port = await freePort();
  server = execa('qemu-nbd', ['--read-only', '-f', 'raw', '-x', 'boot', '-b', '127.0.0.1', '-p', String(port), '--shared', '4', '--persistent', image], { reject: false });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const c = net.createConnection({ host: '127.0.0.1', port }, () => { c.destroy(); resolve(true); });
      c.once('error', () => resolve(false));
    });
    if (up) break;
    await sleep(50);
  }
});

after(async () => {
  server?.kill();
  await server;
  await dir?.cleanup();
});

test('nbdBlockdev reads both URI forms an export hands out, and refuses others', () => {
  assert.deepEqual(nbdBlockdev('nbd+unix:///root?socket=/tmp/x/d0.nbd', 'n'), { driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: '/tmp/x/d0.nbd' }, export: 'root', 'read-only': true });
  assert.deepEqual(nbdBlockdev('nbd://[::1]:10809/my%20disk', 'n'), { driver: 'nbd', 'node-name': 'n', server: { type: 'inet', host: '::1', port: '10809' }, export: 'my disk', 'read-only': true });
  assert.throws(() => nbdBlockdev('file:///etc/passwd', 'n'), /is not an NBD URI a drill can use/);
});

test('boots a disk from stock qemu-nbd over TCP: the marker is seen, the image is untouched, only the kept files remain', async () => {
  const before = sha(image);
  const work = join(dir.path, 'work');
  const keep = join(dir.path, 'keep');
  await mkdir(work);
  await mkdir(keep);
  const r = await runDrill({
    disks: [{ uri: `nbd://127.0.0.1:${port}/boot`, size: 4 * 1024 * 1024, bus: 'ide' }],
    probe: { kind: 'serial', text: BOOT_MARKER }, timeoutMs: 60_000, workDir: work,
    serialLog: join(keep, 'serial.log'), screenshot: join(keep, 'screen.ppm'), memoryMiB: 32, machine: 'pc,accel=tcg',
  });
  assert.equal(r.ok, true, r.reason);
  assert.equal(r.probe, `serial "${BOOT_MARKER}"`);
  assert.match(readFileSync(r.serialLog, 'utf8'), new RegExp(BOOT_MARKER));
  assert.equal(readFileSync(r.screenshot!).subarray(0, 2).toString(), 'P6');
  assert.deepEqual(await readdir(work), [], 'overlay and sockets are gone');
  assert.equal(sha(image), before, 'the served image is unchanged');
});

test('a TCP probe whose host port is taken before QEMU binds it starts QEMU again on another port', async () => {
  const work = join(dir.path, 'work-port');
  await mkdir(work);
  const holder = net.createServer();
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  const taken = (holder.address() as net.AddressInfo).port;
  const given: number[] = [];
  try {
    const r = await runDrill({
      disks: [{ uri: `nbd://127.0.0.1:${port}/boot`, size: 4 * 1024 * 1024, bus: 'ide' }],
      probe: { kind: 'tcp', port: 22 }, timeoutMs: 1500, workDir: work,
      serialLog: join(work, 'serial.log'), screenshot: join(work, 'screen.ppm'), memoryMiB: 32, machine: 'pc,accel=tcg',
      hostPort: async () => { const p = given.length ? await freePort() : taken; given.push(p); return p; },
    });
    assert.equal(given.length, 2, 'asked for a second port after QEMU could not bind the first');
    assert.equal(r.ok, false);
    assert.match(r.reason ?? '', /nothing answered on guest TCP port 22 within 2 s/);
  } finally {
    holder.close();
  }
  assert.deepEqual((await readdir(work)).filter((f) => !/^(serial\.log|screen\.ppm)$/.test(f)), [], 'overlay and sockets are gone');
});

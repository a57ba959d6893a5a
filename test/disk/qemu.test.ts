/**
 * qemu-img / qemu-nbd wrappers against real images, real locks held by real qemu
 * processes, and real process lifetimes.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import fs from 'node:fs/promises';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  compareImages, createImage, exportImage, IMAGE_FORMATS, imageInfo, snapshotCreate, snapshotDelete, type ImageFormat, type NbdExport,
} from '../../src/disk/qemu.js';
import { NotFoundError, VmvaultError, type ErrorCode } from '../../src/errors.js';
import { vmdkDescriptor } from '../helpers/hostile.js';
import {
  expectedContent, exportLeftBy, holdImageLock, makeImage, processAlive, tempDir, waitForExit, writePattern, type PatternWrite, type TempDir,
} from '../helpers/images.js';

const MiB = 1024 * 1024;

function isError(code: ErrorCode, pattern: RegExp) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof VmvaultError, `expected a VmvaultError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, pattern);
    return true;
  };
}

/** For assert.rejects: an export that wrongly succeeds is closed first, so the failure cannot hang the run. */
function exporting(p: Promise<NbdExport>): Promise<never> {
  return p.then(async (exp) => {
    await exp.close();
    assert.fail('exportImage succeeded where it should have failed');
  });
}

let dir: TempDir;
before(async () => { dir = await tempDir(); });
after(async () => { await dir?.cleanup(); });

describe('imageInfo', { timeout: 60_000 }, () => {
  for (const format of IMAGE_FORMATS) {
    test(`detects ${format} and reports its sizes`, async () => {
      const image = await makeImage(dir.path, `info.${format}`, format, 16 * MiB, [{ offset: 0, length: 1 * MiB, pattern: 0xab }]);
      const info = await imageInfo(path.relative(process.cwd(), image));
      assert.equal(info.path, image, 'path is absolute');
      assert.equal(info.format, format);
      assert.equal(info.virtualSize, 16 * MiB);
      assert.ok(info.actualSize >= 1 * MiB && info.actualSize < 16 * MiB, `sparse, holding the 1 MiB written (actual ${info.actualSize})`);
      assert.equal(info.backingFile, undefined);
      assert.deepEqual(info.snapshots, []);
    });
  }

  test('with a format given, qemu does not probe: a qcow2 file read as raw is raw', async () => {
    const image = await makeImage(dir.path, 'looks-like.qcow2', 'qcow2', 16 * MiB);
    const info = await imageInfo(image, 'raw');
    assert.equal(info.format, 'raw');
    assert.equal(info.virtualSize, Math.ceil((await fs.stat(image)).size / 512) * 512);
    await assert.rejects(imageInfo(image, 'qed' as ImageFormat), isError('UNSUPPORTED', /"qed"/));
  });

  test('reports a backing file', async () => {
    const base = await makeImage(dir.path, 'base.qcow2', 'qcow2', 8 * MiB);
    const overlay = path.join(dir.path, 'overlay.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
    assert.equal((await imageInfo(overlay)).backingFile, base);
  });

  test('a missing file is NotFoundError', async () => {
    const missing = path.join(dir.path, 'missing.qcow2');
    await assert.rejects(imageInfo(missing), (err: unknown) => {
      assert.ok(err instanceof NotFoundError);
      assert.equal(err.message, `disk image ${missing} does not exist`);
      return true;
    });
  });

  test('qemu-img info that does not answer is stopped, with an error saying so', async () => {
    // An extent naming a FIFO: qemu-img blocks in open() until a writer comes, which none does.
    const fifo = path.join(dir.path, 'info-fifo');
    await execa('mkfifo', [fifo]);
    const image = path.join(dir.path, 'names-fifo.vmdk');
    await fs.writeFile(image, vmdkDescriptor(`RW 2048 FLAT "${fifo}" 0`));
    const started = Date.now();
    await assert.rejects(imageInfo(image, 'vmdk', { timeoutMs: 1500 }),
      isError('QEMU', new RegExp(`qemu-img info did not answer within 1.5 s on ${image} and was stopped: .*a FIFO.*Check the files the image's metadata names`)));
    assert.ok(Date.now() - started < 15_000, 'stopped soon after the timeout');
  });

  for (const format of ['qed', 'vpc']) {
    test(`a ${format} image is UNSUPPORTED`, async () => {
      const image = await makeImage(dir.path, `other.${format}`, format, 8 * MiB);
      await assert.rejects(imageInfo(image), isError('UNSUPPORTED', new RegExp(`format "${format}", which vmvault does not support`)));
    });
  }
});

describe('locked images', { timeout: 120_000 }, () => {
  const lockedMessage = (image: string) => new RegExp(
    `^disk image ${image.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is in use: a running VM or another program holds its lock.*` +
    'Stop the VM .*running-QEMU driver');

  for (const format of IMAGE_FORMATS) {
    test(`a ${format} image held by a writable qemu-nbd: imageInfo and exportImage say IMAGE_LOCKED`, async () => {
      const image = await makeImage(dir.path, `locked.${format}`, format, 8 * MiB);
      const release = await holdImageLock(image, format);
      try {
        await assert.rejects(imageInfo(image), isError('IMAGE_LOCKED', lockedMessage(image)));
        await assert.rejects(exporting(exportImage(image, { format, readOnly: true })), isError('IMAGE_LOCKED', lockedMessage(image)));
        await assert.rejects(exporting(exportImage(image, { format, readOnly: false })), isError('IMAGE_LOCKED', lockedMessage(image)));
        if (format === 'qcow2') await assert.rejects(snapshotCreate(image, 'while-locked'), isError('IMAGE_LOCKED', lockedMessage(image)));
      } finally {
        await release();
      }
      assert.equal((await imageInfo(image)).format, format, 'works again once released');
    });
  }

  for (const format of ['raw', 'qcow2'] as const) {
    test(`a running (paused) VM with a ${format} disk: IMAGE_LOCKED`, async () => {
      const image = await makeImage(dir.path, `vm.${format}`, format, 8 * MiB);
      const release = await holdImageLock(image, format, { by: 'vm' });
      try {
        await assert.rejects(imageInfo(image), isError('IMAGE_LOCKED', lockedMessage(image)));
        await assert.rejects(exporting(exportImage(image, { format, readOnly: true })), isError('IMAGE_LOCKED', /Failed to get shared "write" lock/));
      } finally {
        await release();
      }
    });
  }
});

describe('snapshots', { timeout: 60_000 }, () => {
  const before: PatternWrite[] = [{ offset: 0, length: 1 * MiB, pattern: 0x11 }];
  const later: PatternWrite[] = [{ offset: 0, length: 512 * 1024, pattern: 0x22 }, { offset: 2 * MiB, length: 1 * MiB, pattern: 0x33 }];

  test('an exported snapshot shows the data as of the snapshot after the live image changed', async () => {
    const image = await makeImage(dir.path, 'snap.qcow2', 'qcow2', 8 * MiB, before);
    await snapshotCreate(image, 'before-update');
    for (const w of later) await writePattern(image, 'qcow2', w.offset, w.length, w.pattern);
    assert.deepEqual((await imageInfo(image)).snapshots.map((s) => s.name), ['before-update']);

    const snap = await exportImage(image, { format: 'qcow2', readOnly: true, snapshot: 'before-update' });
    try {
      assert.ok((await snap.client.read(0, 4 * MiB)).equals(expectedContent(before, 0, 4 * MiB)));
    } finally {
      await snap.close();
    }
    const live = await exportImage(image, { format: 'qcow2', readOnly: true });
    try {
      assert.ok((await live.client.read(0, 4 * MiB)).equals(expectedContent([...before, ...later], 0, 4 * MiB)));
    } finally {
      await live.close();
    }

    await assert.rejects(snapshotCreate(image, 'before-update'), isError('ALREADY_EXISTS', /already exists/));
    await snapshotDelete(image, 'before-update');
    assert.deepEqual((await imageInfo(image)).snapshots, []);
    await assert.rejects(snapshotDelete(image, 'before-update'), (err: unknown) => err instanceof NotFoundError);
    await assert.rejects(exporting(exportImage(image, { format: 'qcow2', readOnly: true, snapshot: 'before-update' })), (err: unknown) => err instanceof NotFoundError);
  });

  test('snapshot misuse is refused before qemu runs', async () => {
    const raw = await makeImage(dir.path, 'nosnap.raw', 'raw', 1 * MiB);
    const qcow2 = await makeImage(dir.path, 'snap2.qcow2', 'qcow2', 1 * MiB);
    await assert.rejects(exporting(exportImage(raw, { format: 'raw', readOnly: true, snapshot: 's' })), isError('UNSUPPORTED', /only in qcow2/));
    await assert.rejects(exporting(exportImage(qcow2, { format: 'qcow2', readOnly: false, snapshot: 's' })), isError('BAD_INPUT', /read-only/));
    await assert.rejects(snapshotCreate(qcow2, '1'), isError('BAD_INPUT', /not only digits/));
    await assert.rejects(snapshotCreate(raw, 'x'), isError('QEMU', /Image is not in qcow2 format/));
    await assert.rejects(snapshotCreate(path.join(dir.path, 'nope.qcow2'), 'x'), (err: unknown) => err instanceof NotFoundError);
  });
});

describe('exportImage', { timeout: 60_000 }, () => {
  test('refuses missing files and unsupported formats', async () => {
    const missing = path.join(dir.path, 'missing.raw');
    await assert.rejects(exporting(exportImage(missing, { format: 'raw', readOnly: true })), (err: unknown) =>
      err instanceof NotFoundError && err.message === `disk image ${missing} does not exist`);
    const qed = await makeImage(dir.path, 'x.qed', 'qed', 1 * MiB);
    await assert.rejects(exporting(exportImage(qed, { format: 'qed' as ImageFormat, readOnly: true })), isError('UNSUPPORTED', /"qed"/));
  });

  test('passes the format explicitly: a raw file is not taken for the qcow2 it pretends to be', async () => {
    const fake = await makeImage(dir.path, 'fake.qcow2', 'qcow2', 1 * MiB);
    const exp = await exportImage(fake, { format: 'raw', readOnly: true });
    try {
      // qemu rounds a raw file's size up to whole 512-byte sectors (the tail reads as zeros).
      assert.equal(exp.client.size, Math.ceil((await fs.stat(fake)).size / 512) * 512, 'exports the file bytes, not the qcow2 contents');
      assert.equal((await exp.client.read(0, 4)).toString('latin1'), 'QFI\xfb');
    } finally {
      await exp.close();
    }
  });

  test('close() leaves no qemu-nbd process and no socket directory', async () => {
    const image = await makeImage(dir.path, 'close.qcow2', 'qcow2', 4 * MiB);
    const exp = await exportImage(image, { format: 'qcow2', readOnly: true });
    const socketDir = path.dirname(exp.socketPath);
    assert.equal(processAlive(exp.pid), true);
    assert.equal((await fs.stat(socketDir)).mode & 0o777, 0o700, 'socket directory is private');
    await exp.close();
    await exp.close(); // Idempotent.
    assert.equal(processAlive(exp.pid), false, 'qemu-nbd has exited');
    assert.equal(existsSync(socketDir), false, 'socket directory removed');
  });

  test('qemu-nbd exits when the node process holding it is SIGKILLed', async () => {
    const image = await makeImage(dir.path, 'orphan.qcow2', 'qcow2', 4 * MiB);
    // Under tsc the compiled .js sits next to this file; under tsx only the .ts exists.
    const js = fileURLToPath(new URL('../../src/disk/qemu.js', import.meta.url));
    const mod = existsSync(js) ? js : js.replace(/\.js$/, '.ts');
    const script = `const { exportImage } = await import(${JSON.stringify(mod)});
      const exp = await exportImage(${JSON.stringify(image)}, { format: 'qcow2', readOnly: true });
      console.log(exp.pid, exp.socketPath); setInterval(() => {}, 1000);`;
    const child = execa(process.execPath, [...(mod.endsWith('.ts') ? ['--import', 'tsx'] : []), '--input-type=module', '-e', script], { reject: false });
    const [pidText, socketPath] = await new Promise<string[]>((resolve, reject) => {
      child.stdout!.once('data', (d: Buffer) => resolve(d.toString().trim().split(' ')));
      void child.then((r) => reject(new Error(`child exited early: ${r.stderr}`)));
    });
    const pid = Number(pidText);
    assert.equal(processAlive(pid), true);
    child.kill('SIGKILL');
    await child;
    assert.equal(await waitForExit(pid, 5000), true, `qemu-nbd ${pid} exited after its parent was killed`);
    // The killed parent could not remove its socket directory (qemu-nbd removed the socket).
    assert.equal(existsSync(socketPath!), false);
    await fs.rm(path.dirname(socketPath!), { recursive: true, force: true });
  });
});

describe('createImage and compareImages', { timeout: 60_000 }, () => {
  for (const format of IMAGE_FORMATS) {
    test(`creates a sparse ${format} image with no backing file`, async () => {
      const file = path.join(dir.path, `new.${format}`);
      await createImage(file, format, 64 * MiB);
      const info = await imageInfo(file);
      assert.equal(info.format, format);
      assert.equal(info.virtualSize, 64 * MiB);
      assert.equal(info.backingFile, undefined);
      assert.ok(info.actualSize < 2 * MiB, `sparse (actual size ${info.actualSize})`);
      await assert.rejects(createImage(file, format, 64 * MiB), isError('ALREADY_EXISTS', /already exists/));
    });
  }

  test('refuses bad sizes, unknown formats and missing directories', async () => {
    await assert.rejects(createImage(path.join(dir.path, 'odd.raw'), 'raw', 1000), isError('BAD_INPUT', /multiple of 512/));
    await assert.rejects(createImage(path.join(dir.path, 'x.qed'), 'qed' as ImageFormat, 1 * MiB), isError('UNSUPPORTED', /"qed"/));
    await assert.rejects(createImage(path.join(dir.path, 'no', 'x.raw'), 'raw', 1 * MiB), (err: unknown) => err instanceof NotFoundError);
  });

  test('compares contents across formats', async () => {
    const writes: PatternWrite[] = [{ offset: 1 * MiB, length: 64 * 1024, pattern: 0x5a }];
    const a = await makeImage(dir.path, 'cmp-a.qcow2', 'qcow2', 4 * MiB, writes);
    const b = await makeImage(dir.path, 'cmp-b.vdi', 'vdi', 4 * MiB, writes);
    const c = await makeImage(dir.path, 'cmp-c.raw', 'raw', 4 * MiB, [{ offset: 3 * MiB, length: 512, pattern: 1 }]);
    assert.deepEqual(await compareImages(a, b), { identical: true, output: 'Images are identical.' });
    const diff = await compareImages(a, c, 'qcow2', 'raw');
    assert.equal(diff.identical, false);
    assert.match(diff.output, /Content mismatch at offset/);
  });
});

describe('socket directories left by killed processes', () => {
  test('empty ones (or holding only an owner file) older than ten minutes are removed; fresh, busy, foreign and non-directory ones stay', async () => {
    const { sweepSocketDirs } = await import('../../src/disk/qemu-nbd.js');
    const parent = await fs.mkdtemp(path.join(os.tmpdir(), 'vmvault-sweep-'));
    try {
      const old = new Date(Date.now() - 20 * 60_000);
      const mk = async (name: string, age: Date | undefined, file?: string) => {
        const dir = path.join(parent, name);
        await fs.mkdir(dir);
        if (file) await fs.writeFile(path.join(dir, file), '');
        if (age) await fs.utimes(dir, age, age);
        return dir;
      };
      const stale = await mk('vmvault-nbd-stale1', old);
      const owned = await mk('vmvault-nbd-owned1', old, 'owner');
      const fresh = await mk('vmvault-nbd-fresh1', undefined);
      const freshOwned = await mk('vmvault-nbd-fresh2', undefined, 'owner');
      const busy = await mk('vmvault-nbd-busy11', old, 'nbd.sock');
      const other = await mk('not-vmvault-nbd-x', old);
      await fs.writeFile(path.join(parent, 'vmvault-nbd-file11'), '');
      await fs.symlink(other, path.join(parent, 'vmvault-nbd-link11'));
      assert.equal(await sweepSocketDirs(parent), 2);
      assert.equal(existsSync(stale), false);
      assert.equal(existsSync(owned), false);
      for (const kept of [fresh, freshOwned, busy, other, path.join(parent, 'vmvault-nbd-file11'), path.join(parent, 'vmvault-nbd-link11')]) assert.ok(existsSync(kept), kept);
    } finally {
      await fs.rm(parent, { recursive: true, force: true });
    }
  });
});

describe('qemu-nbd processes orphaned by a killed vmvault', () => {
  test('one whose vmvault is gone is ended when an export finds the image locked, and the export goes ahead', async () => {
    const image = await makeImage(dir.path, 'orphaned.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x5a }]);
    const orphan = await exportLeftBy(image);
    const exp = await exportImage(image, { format: 'qcow2', readOnly: true });
    try {
      const head = Buffer.alloc(512);
      await exp.client.readInto(0, head);
      assert.ok(head.equals(Buffer.alloc(512, 0x5a)));
      assert.ok(await waitForExit(orphan.pid, 5000), 'the orphan was ended');
      assert.equal(existsSync(orphan.sockDir), false, 'its directory was removed');
    } finally {
      await exp.close();
      await orphan.stop();
    }
  });

  test('one whose vmvault still runs is left alone: the export reports the lock', async () => {
    const { processIdentity } = await import('../../src/disk/nbd-orphans.js');
    const image = await makeImage(dir.path, 'owned.qcow2', 'qcow2', 4 * MiB);
    const live = await exportLeftBy(image, (await processIdentity(process.pid))!);
    try {
      await assert.rejects(exporting(exportImage(image, { format: 'qcow2', readOnly: true })), isError('IMAGE_LOCKED', /in use/));
      assert.ok(processAlive(live.pid), 'its qemu-nbd still runs');
      assert.ok(existsSync(live.sockDir));
    } finally {
      await live.stop();
    }
  });
});

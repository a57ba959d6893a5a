/**
 * Real disk images for tests: created with qemu-img, filled through qemu's own
 * format drivers with qemu-io, and locked by real qemu processes. No mocks.
 */
import { execa } from 'execa';
import { existsSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ImageFormat } from '../../src/disk/qemu.js';
import { socketParent } from '../../src/disk/qemu-nbd.js';

export interface PatternWrite {
  offset: number;
  length: number;
  /** Byte value written everywhere in the range (0x00–0xff). */
  pattern: number;
}

export interface TempDir {
  path: string;
  cleanup(): Promise<void>;
}

/** A fresh private directory; `cleanup` removes it with everything inside. */
export async function tempDir(prefix = 'vmvault-test-'): Promise<TempDir> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  return { path: dir, cleanup: () => fs.rm(dir, { recursive: true, force: true }) };
}

function hex(pattern: number): string {
  if (!Number.isInteger(pattern) || pattern < 0 || pattern > 0xff) throw new Error(`pattern ${pattern} is not a byte`);
  return `0x${pattern.toString(16).padStart(2, '0')}`;
}

/** Run qemu-io commands on an image (format given, never probed); throws with qemu-io's output on failure. */
export async function qemuIo(file: string, format: string, commands: string[]): Promise<string> {
  const args = ['-f', format];
  for (const c of commands) args.push('-c', c);
  args.push(file);
  const r = await execa('qemu-io', args, { reject: false });
  // qemu-io reports some failures (e.g. a pattern mismatch) on stdout, exiting 1.
  if (r.exitCode !== 0) throw new Error(`qemu-io ${commands.join('; ')} on ${file} failed: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** Write `length` bytes of `pattern` at `offset` through qemu's driver for `format`. */
export async function writePattern(file: string, format: string, offset: number, length: number, pattern: number): Promise<void> {
  await qemuIo(file, format, [`write -P ${hex(pattern)} ${offset} ${length}`]);
}

/** Create `dir/name` (sparse, `size` bytes) in `format` and apply `writes` in order. Returns its path. */
export async function makeImage(dir: string, name: string, format: string, size: number, writes: PatternWrite[] = []): Promise<string> {
  const file = path.join(dir, name);
  await execa('qemu-img', ['create', '-q', '-f', format, file, String(size)]);
  if (writes.length > 0) await qemuIo(file, format, writes.map((w) => `write -P ${hex(w.pattern)} ${w.offset} ${w.length}`));
  return file;
}

/** Throws unless every write's range reads back its pattern (qemu-io read -P). */
export async function verifyPatterns(file: string, format: string, writes: PatternWrite[]): Promise<void> {
  await qemuIo(file, format, writes.map((w) => `read -P ${hex(w.pattern)} ${w.offset} ${w.length}`));
}

/** What [offset, offset+length) of an image made by makeImage(…, writes) contains: later writes win, the rest is zero. */
export function expectedContent(writes: PatternWrite[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const w of writes) {
    const start = Math.max(w.offset, offset);
    const end = Math.min(w.offset + w.length, offset + length);
    if (start < end) out.fill(w.pattern, start - offset, end - offset);
  }
  return out;
}

/**
 * True while a process with this pid runs. A zombie counts as gone: it has exited,
 * and an orphan's zombie lingers until init reaps it (here, about a second).
 */
export function processAlive(pid: number): boolean {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return false;
  }
  const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3); // After "pid (comm) ".
  return state !== 'Z' && state !== 'X';
}

/** Poll until `pid` is gone; false if it is still there after `ms`. */
export async function waitForExit(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (!processAlive(pid)) return true;
    await sleep(20);
  }
  return !processAlive(pid);
}

/**
 * Start a process that holds the image's write lock, as a running VM does:
 * a writable qemu-nbd (default) or a paused qemu-system-x86_64 with the disk attached.
 * Resolves once qemu-img really sees the lock; the returned function releases it.
 * (For raw images qemu-img info ignores locks, so a zero-byte qemu-img convert probes.)
 */
export async function holdImageLock(file: string, format: ImageFormat, opts: { by?: 'qemu-nbd' | 'vm' } = {}): Promise<() => Promise<void>> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vmvault-lock-'));
  const socket = path.join(dir, 'lock.sock');
  const start = () => opts.by === 'vm'
    ? execa('qemu-system-x86_64', ['-nodefaults', '-display', 'none', '-S', '-machine', 'pc,accel=tcg', '-m', '32',
      '-drive', `file=${file.replaceAll(',', ',,')},format=${format},if=virtio`], { reject: false, stdin: 'ignore' })
    : execa('qemu-nbd', ['-f', format, '--shared=1', '-k', socket, file], { reject: false, stdin: 'ignore' });
  const deadline = Date.now() + 15_000;
  for (;;) {
    const proc = start();
    let exited = false;
    void proc.then(() => { exited = true; });
    const release = async (): Promise<void> => {
      proc.kill('SIGTERM');
      await proc;
      await fs.rm(dir, { recursive: true, force: true });
    };
    while (!exited && Date.now() < deadline) {
      // qemu-nbd creates its socket only once it holds the image: probing before that
      // would race with it (the probe's own shared lock can make qemu-nbd fail).
      if (opts.by !== 'vm' && !existsSync(socket)) {
        await sleep(20);
        continue;
      }
      const probe = format === 'raw'
        ? ['convert', '-q', '-n', '--image-opts', `driver=raw,size=0,file.filename=${file.replaceAll(',', ',,')}`, '-O', 'raw', '/dev/null']
        : ['info', '-f', format, file];
      const r = await execa('qemu-img', probe, { reject: false });
      if (r.exitCode !== 0 && /lock/.test(r.stderr)) return release;
      await sleep(50);
    }
    const result = await proc;
    // Lost a race with a probe or a process that just let go: start again.
    if (exited && /lock/.test(String(result.stderr)) && Date.now() < deadline) {
      await sleep(100);
      continue;
    }
    await release();
    throw new Error(`could not hold the lock of ${file}: ${result.stderr || 'timed out'}`);
  }
}

/**
 * What a vmvault killed while starting an export leaves: a qemu-nbd serving the qcow2
 * `image` writable (so holding its lock), never connected to, in a fresh export
 * directory whose owner file names `owner` (by default a process that has exited).
 * `stop()` ends it and removes the directory.
 */
export async function exportLeftBy(image: string, owner?: string): Promise<{ pid: number; sockDir: string; stop(): Promise<void> }> {
  if (owner === undefined) {
    const gone = execa('true');
    await gone;
    owner = `${gone.pid} 1`;
  }
  const sockDir = await fs.mkdtemp(path.join(socketParent(), 'vmvault-nbd-'));
  await fs.writeFile(path.join(sockDir, 'owner'), `${owner}\n`);
  const socket = path.join(sockDir, 'nbd.sock');
  const proc = execa('qemu-nbd', ['-f', 'qcow2', '--shared=1', '-k', socket, image], { reject: false, stdin: 'ignore' });
  const stop = async () => {
    proc.kill('SIGKILL');
    await proc;
    await fs.rm(sockDir, { recursive: true, force: true });
  };
  for (let i = 0; i < 500 && !existsSync(socket); i++) await sleep(10);
  if (!existsSync(socket)) {
    await stop();
    throw new Error(`qemu-nbd did not start serving ${image}`);
  }
  return { pid: proc.pid!, sockDir, stop };
}

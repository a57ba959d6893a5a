/**
 * What qcow2 internal snapshots cannot hold: the label, expiry and exported backup
 * of an on-demand snapshot. A snapshot's name is all qemu keeps (plus its date);
 * encoding a label and an expiry into the name would make names long, awkward to
 * type and impossible to change, so they live beside it instead.
 *
 * One small JSON file per VM under the host's state directory,
 * `<stateDir>/snapshots/<vm>.json`, replaced atomically (temporary file, fsync,
 * rename). The disks stay the truth about which snapshots exist: an entry whose
 * snapshot is gone is ignored and dropped at the next change, and a snapshot with
 * no entry (made by hand with qemu-img) is listed with no label and no expiry.
 *
 * Every change of a VM's snapshots runs under `withVmSnapshotLock`, an exclusive
 * lock file beside the metadata holding the owner's pid: the CLI, the host worker
 * and the expiry sweep of one host never interleave on a VM. A lock whose process
 * is gone is stale and taken over (the state directory is per host, so a pid is
 * meaningful).
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VmvaultError } from '../errors.js';
import { writeNewFileSynced } from '../storage/local.js';
import { NAME_RE, nameRule } from '../policy/schema.js';

export interface SnapshotMeta {
  /** Label of the snapshot, and of its exported backup. */
  label?: string;
  /** ISO-8601 time the snapshot was taken. */
  created: string;
  /** ISO-8601 time after which the expiry sweep deletes it; none: kept until deleted. */
  expiresAt?: string;
  /** Id of the backup `--export` made of it. */
  backup?: string;
}

interface StoreFile { version: 1; vm: string; snapshots: Record<string, SnapshotMeta> }

const LOCK_WAIT_MS = 5 * 60_000;

function assertVmName(vm: string): void {
  if (!NAME_RE.test(vm)) throw new VmvaultError('BAD_INPUT', `"${vm}" is not a valid VM name: a VM name is ${nameRule}`);
}

export function metaPath(stateDir: string, vm: string): string {
  assertVmName(vm);
  return path.join(path.resolve(stateDir), 'snapshots', `${vm}.json`);
}

/** The snapshot metadata of `vm` (empty when there is none yet). */
export async function readSnapshotMeta(stateDir: string, vm: string): Promise<Map<string, SnapshotMeta>> {
  const file = metaPath(stateDir, vm);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new Map();
    throw new VmvaultError('BAD_INPUT', `cannot read snapshot metadata ${file}: ${(err as Error).message}`, { cause: err });
  }
  let parsed: StoreFile;
  try {
    parsed = JSON.parse(text) as StoreFile;
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `snapshot metadata ${file} is not valid JSON: fix or remove it (the snapshots themselves are in the disk images)`, { cause: err });
  }
  if (parsed?.version !== 1 || typeof parsed.snapshots !== 'object' || parsed.snapshots === null) {
    throw new VmvaultError('BAD_INPUT', `snapshot metadata ${file} is not a version 1 store: fix or remove it`);
  }
  return new Map(Object.entries(parsed.snapshots));
}

/** Replaces the metadata of `vm` atomically; call it under withVmSnapshotLock. */
export async function writeSnapshotMeta(stateDir: string, vm: string, meta: Map<string, SnapshotMeta>): Promise<void> {
  const file = metaPath(stateDir, vm);
  await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
  const body: StoreFile = { version: 1, vm, snapshots: Object.fromEntries([...meta].sort(([a], [b]) => a.localeCompare(b))) };
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  await writeNewFileSynced(tmp, JSON.stringify(body, null, 2) + '\n');
  try {
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Runs `fn` holding the exclusive snapshot lock of `vm` on this host. Waits for a
 * live holder (up to 5 minutes, then LOCKED naming its pid); takes over the lock of
 * a process that no longer exists.
 */
export async function withVmSnapshotLock<T>(stateDir: string, vm: string, fn: () => Promise<T>, waitMs = LOCK_WAIT_MS): Promise<T> {
  const lock = metaPath(stateDir, vm).replace(/\.json$/, '.lock');
  await fs.mkdir(path.dirname(lock), { recursive: true, mode: 0o700 });
  const deadline = Date.now() + waitMs;
  const mine = `${process.pid}\n`;
  for (;;) {
    try {
      await fs.writeFile(lock, mine, { flag: 'wx', mode: 0o600 });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = Number.parseInt(await fs.readFile(lock, 'utf8').catch(() => ''), 10);
    if (Number.isInteger(holder) && holder > 0 && !pidAlive(holder)) {
      // The holder died: remove its lock, unless another process took it over meanwhile.
      const again = await fs.readFile(lock, 'utf8').catch(() => '');
      if (Number.parseInt(again, 10) === holder) await fs.rm(lock, { force: true });
      continue;
    }
    if (Date.now() > deadline) {
      throw new VmvaultError('LOCKED', `another snapshot operation on VM "${vm}" (process ${Number.isInteger(holder) ? holder : '?'}) holds ${lock}: wait for it to finish`, { retriable: true });
    }
    await sleep(50 + Math.floor(Math.random() * 50));
  }
  try {
    return await fn();
  } finally {
    await fs.rm(lock, { force: true });
  }
}

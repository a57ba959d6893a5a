/**
 * qemu-nbd processes whose vmvault died before connecting to them.
 *
 * An export's qemu-nbd serves one client and exits when it disconnects, and is tied to
 * vmvault by a parent-death signal (src/disk/qemu-nbd.ts). One gap is left: setpriv
 * sets that signal only once it runs, so a vmvault killed within a few milliseconds of
 * starting an export leaves a qemu-nbd that no client will ever reach and that never
 * exits, holding the image's lock: every later backup of that disk failed with "in
 * use" until someone killed it by hand.
 *
 * So each export's socket directory holds an `owner` file, written before qemu-nbd
 * starts: the pid and start time (from /proc) of the vmvault process. A qemu-nbd
 * serving a socket in such a directory whose owner no longer runs is an orphan, and
 * `endOrphanExports` ends it (SIGTERM: it closes the image cleanly) and removes the
 * directory. Only this user's processes are looked at, and only qemu-nbd processes
 * serving a socket inside `vmvault-nbd-*` directories of the socket parent that have
 * never had a client (their one socket is the listening one); one whose owner runs is
 * never touched (its exports are its own), nor one whose directory has no owner file
 * (an older vmvault's) and is younger than ten minutes.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export const OWNER_FILE = 'owner';
/** A directory without an owner file is left alone unless it is at least this old (an older vmvault's). */
const UNOWNED_AFTER_MS = 10 * 60_000;
const TERM_GRACE_MS = 5_000;

/** "pid starttime" of a running process (start time in clock ticks since boot), or undefined when it is gone. */
export async function processIdentity(pid: number): Promise<string | undefined> {
  let stat: string;
  try {
    stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // Fields after the command name (which may hold spaces and parentheses): state is field 3, starttime field 22.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  if (fields[0] === 'Z' || fields[0] === 'X') return undefined;
  return `${pid} ${fields[19]}`;
}

/** Records this process as the owner of an export's socket directory (before its qemu-nbd starts). */
export async function writeOwner(dir: string): Promise<void> {
  const me = (await processIdentity(process.pid)) ?? `${process.pid} unknown`;
  await fs.writeFile(path.join(dir, OWNER_FILE), `${me}\n`, { mode: 0o600, flag: 'wx' });
}

interface ServingExport { pid: number; dir: string }

/** This user's processes whose command line `wanted` accepts, with it (from /proc). */
export async function ownProcesses(wanted: (argv: string[]) => boolean): Promise<{ pid: number; argv: string[] }[]> {
  const uid = process.getuid?.();
  const out: { pid: number; argv: string[] }[] = [];
  for (const name of await fs.readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    const argv = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').then((s) => s.split('\0'), () => undefined);
    if (!argv || !wanted(argv)) continue;
    const st = await fs.stat(`/proc/${pid}`).catch(() => undefined);
    if (st?.uid === uid) out.push({ pid, argv });
  }
  return out;
}

/** The directory of the socket a qemu-nbd command line serves (`-k PATH`). */
function socketDir(argv: string[]): string | undefined {
  if (path.basename(argv[0] ?? '') !== 'qemu-nbd') return undefined;
  const k = argv.indexOf('-k');
  const socket = k < 0 ? undefined : argv[k + 1];
  return socket ? path.dirname(socket) : undefined;
}

/** This user's qemu-nbd processes serving a socket in a directory `parent/<prefix>*`. */
async function exportsUnder(parent: string, prefix: string): Promise<ServingExport[]> {
  const uid = process.getuid?.();
  const inside = (dir: string | undefined): dir is string => dir !== undefined && path.dirname(dir) === parent && path.basename(dir).startsWith(prefix);
  const out: ServingExport[] = [];
  for (const { pid, argv } of await ownProcesses((argv) => inside(socketDir(argv)))) {
    const dir = socketDir(argv)!;
    // The directory too must be this user's own (made by mkdtemp, 0700), not a look-alike.
    const d = await fs.lstat(dir).catch(() => undefined);
    if (!d?.isDirectory() || d.uid !== uid) continue;
    out.push({ pid, dir });
  }
  return out;
}

/**
 * Ends the orphaned qemu-nbd processes of exports in `parent/<prefix>*` (see the module
 * comment) and removes their directories. Returns how many it ended.
 */
export async function endOrphanExports(parent: string, prefix: string, now = Date.now()): Promise<number> {
  let ended = 0;
  for (const { pid, dir } of await exportsUnder(parent, prefix)) {
    const owner = await fs.readFile(path.join(dir, OWNER_FILE), 'utf8').then((s) => s.trim(), () => undefined);
    if (owner === undefined) {
      const st = await fs.lstat(dir).catch(() => undefined);
      if (!st || now - st.mtimeMs < UNOWNED_AFTER_MS) continue;
    } else if ((await processIdentity(Number(owner.split(' ')[0]))) === owner) {
      continue; // its vmvault runs: the export is in use, or about to be
    }
    // An orphan never had a client: it holds its listening socket only. One with a
    // client (whoever that is) is serving, and ends by itself when the client goes.
    if ((await socketCount(pid)) !== 1) continue;
    if (!(await signal(pid, 'SIGTERM'))) continue;
    if (!(await gone(pid, TERM_GRACE_MS))) {
      await signal(pid, 'SIGKILL');
      await gone(pid, TERM_GRACE_MS);
    }
    await fs.rm(dir, { recursive: true, force: true });
    ended++;
  }
  return ended;
}

/**
 * How many sockets process `pid` has open besides its standard streams (which may be
 * socket pairs: Node gives children its pipes that way); undefined when its descriptors
 * cannot be read.
 */
async function socketCount(pid: number): Promise<number | undefined> {
  const fds = await fs.readdir(`/proc/${pid}/fd`).catch(() => undefined);
  if (!fds) return undefined;
  let n = 0;
  for (const fd of fds) {
    if (Number(fd) <= 2) continue;
    if ((await fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')).startsWith('socket:')) n++;
  }
  return n;
}

async function signal(pid: number, sig: NodeJS.Signals): Promise<boolean> {
  try {
    process.kill(pid, sig);
    return true;
  } catch {
    return false; // exited meanwhile
  }
}

async function gone(pid: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if ((await processIdentity(pid)) === undefined) return true;
    await sleep(20);
  }
  return false;
}

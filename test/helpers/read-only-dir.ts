/**
 * A read-only view of a directory, as an operator gets from a read-only mount. As root
 * (where chmod stops nothing) it is a read-only bind mount; otherwise the directory
 * itself with every write permission removed. Either way writes fail as they would in
 * production (EROFS or EACCES), in the real file system. `release` undoes it.
 */
import { execa } from 'execa';
import { chmod, mkdtemp, readdir, rmdir, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface ReadOnlyDir { path: string; release(): Promise<void> }

export async function readOnlyDir(dir: string): Promise<ReadOnlyDir> {
  if (process.getuid?.() === 0) {
    const view = await mkdtemp(join(tmpdir(), 'vmvault-ro-'));
    await execa('mount', ['--bind', dir, view]);
    try {
      await execa('mount', ['-o', 'remount,ro,bind', view]);
    } catch (err) {
      await execa('umount', [view]);
      throw err;
    }
    return { path: view, release: async () => { await execa('umount', [view]); await rmdir(view); } };
  }
  const modes = new Map<string, number>();
  const walk = async (p: string): Promise<void> => {
    const st = await stat(p);
    modes.set(p, st.mode & 0o7777);
    if (st.isDirectory()) for (const e of await readdir(p)) await walk(join(p, e));
  };
  await walk(dir);
  for (const [p, mode] of modes) await chmod(p, mode & ~0o222);
  return { path: dir, release: async () => { for (const [p, mode] of modes) await chmod(p, mode); } };
}

import type { Stats } from 'node:fs';
import { stat } from 'node:fs/promises';
import { errnoCode } from './errors.js';

/** Whether `path` exists (any kind of file); an error other than ENOENT (EACCES, EIO) is thrown, not taken for absence. */
export async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return false;
    throw err;
  }
}

/** What kind of file `st` (from stat, or lstat for a symbolic link itself) is, in words: "a directory", "a FIFO (named pipe)", … */
export function fileKind(st: Stats): string {
  if (st.isFile()) return 'a regular file';
  if (st.isDirectory()) return 'a directory';
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isFIFO()) return 'a FIFO (named pipe)';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  return 'not a regular file';
}

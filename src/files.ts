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

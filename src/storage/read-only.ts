/**
 * A Storage wrapper that refuses every write (kopia's repo/blob/readonly): put and
 * delete throw an EROFS-shaped error, as a read-only mount would, so that everything
 * above treats it the same way (storage/refusal.ts). Used for `--no-lock`, which
 * promises to read only, and by tests of read-only repositories where chmod cannot
 * stop root.
 */
import { VmvaultError } from '../errors.js';
import { errnoError } from './refusal.js';
import { type Storage, getInto, sameBackend } from './storage.js';

export function readOnly(storage: Storage, why: string): Storage {
  const refuse = (op: string, name: string): Promise<never> => Promise.reject(new VmvaultError('STORAGE',
    `cannot ${op} object ${JSON.stringify(name)} in ${storage.location}: the repository is read-only for this process (${why})`,
    { cause: errnoError('EROFS', 'read-only repository') }));
  return {
    ...sameBackend(storage),
    get: (name, opts) => storage.get(name, opts),
    getInto: (name, into, opts) => getInto(storage, name, into, opts),
    put: (name) => refuse('write', name),
    stat: (name) => storage.stat(name),
    delete: (name) => refuse('delete', name),
    list: (prefix) => storage.list(prefix),
    close: () => storage.close(),
  };
}

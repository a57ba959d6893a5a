/**
 * A storage whose backend module is loaded on first use: the S3 SDK costs about
 * 0.1 s of start-up for every command, also those that never touch S3 (a directory
 * repository, `--help`). Behaves exactly as the backend it loads.
 */
import { getInto, type Storage } from './storage.js';

export function lazyStorage(location: string, load: () => Promise<Storage>): Storage {
  let backend: Promise<Storage> | undefined;
  const get = () => (backend ??= load());
  return {
    location,
    get: async (name, opts) => (await get()).get(name, opts),
    getInto: async (name, into, opts) => getInto(await get(), name, into, opts),
    put: async (name, data, opts) => (await get()).put(name, data, opts),
    stat: async (name) => (await get()).stat(name),
    delete: async (name) => (await get()).delete(name),
    list: (prefix) => ({
      async *[Symbol.asyncIterator]() {
        yield* (await get()).list(prefix);
      },
    }),
    // Never loaded only to be closed.
    close: async () => { if (backend) await (await backend).close(); },
  };
}

/**
 * A Storage wrapper that injects errors, for tests (kopia's blobtesting/faulty.go).
 * It lets tests prove that retries happen, that they stop, and that failure paths
 * (a lost put, a listing cut in the middle) leave the repository consistent.
 */
import { type Storage, getInto, sameBackend, type StoredObject } from './storage.js';

export type Method = 'get' | 'put' | 'stat' | 'delete' | 'list';

/** One planned failure. A bare value (e.g. an Error) is `{ error: value }`. */
export interface Fault {
  /** What the call throws. */
  error: unknown;
  /** How many matching calls fail with it. Default 1; Infinity for every call. */
  times?: number;
  /** Only calls whose object name (or list prefix) satisfies this fail; others pass. */
  when?: (name: string) => boolean;
  /**
   * put: perform the write first, then throw (a response lost after the server stored
   * the object). list: yield this many items first, then throw.
   */
  after?: boolean | number;
}

export type FaultPlan = Partial<Record<Method, Array<Fault | Error>>>;

export interface FaultyStorage extends Storage {
  /** Calls received per method, failed ones included: what a retry test counts. */
  readonly calls: Record<Method, number>;
  /** Planned failures not yet used for `method`. */
  pending(method: Method): number;
  /** Adds failures to the plan at run time. */
  inject(method: Method, ...faults: Array<Fault | Error>): void;
}

/**
 * Wraps `storage`; for each call, the first planned fault of that method whose `when`
 * matches is used up and its error thrown (before the call, unless `after`). Faults are
 * consumed in order; with none left, calls go through unchanged.
 */
export function faulty(storage: Storage, plan: FaultPlan = {}): FaultyStorage {
  const queues: Record<Method, Array<Required<Pick<Fault, 'times'>> & Fault>> = {
    get: [], put: [], stat: [], delete: [], list: [],
  };
  const calls: Record<Method, number> = { get: 0, put: 0, stat: 0, delete: 0, list: 0 };

  const inject = (method: Method, ...faults: Array<Fault | Error>): void => {
    for (const f of faults) {
      const fault: Fault = f instanceof Error ? { error: f } : f;
      queues[method].push({ ...fault, times: fault.times ?? 1 });
    }
  };
  for (const [method, faults] of Object.entries(plan) as Array<[Method, Array<Fault | Error>]>) inject(method, ...faults);

  /** Counts the call and takes the fault it must suffer, if any. */
  const take = (method: Method, name: string): Fault | undefined => {
    calls[method]++;
    const queue = queues[method];
    const i = queue.findIndex((f) => f.when === undefined || f.when(name));
    const fault = queue[i];
    if (!fault) return undefined;
    if (--fault.times <= 0) queue.splice(i, 1);
    return fault;
  };

  async function call<T>(method: Method, name: string, fn: () => Promise<T>): Promise<T> {
    const fault = take(method, name);
    if (!fault) return fn();
    if (fault.after) await fn();
    throw fault.error;
  }

  async function* list(prefix: string): AsyncGenerator<StoredObject> {
    const fault = take('list', prefix);
    if (fault && !fault.after) throw fault.error;
    let yielded = 0;
    for await (const item of storage.list(prefix)) {
      if (fault && yielded >= Number(fault.after)) throw fault.error;
      yield item;
      yielded++;
    }
    if (fault) throw fault.error; // fewer items than `after`: fail at the end
  }

  const sweep = storage.removeTemporary?.bind(storage);
  return {
    ...sameBackend(storage),
    calls,
    pending: (method) => queues[method].reduce((n, f) => n + f.times, 0),
    inject,
    get: (name, opts) => call('get', name, () => storage.get(name, opts)),
    getInto: (name, into, opts) => call('get', name, () => getInto(storage, name, into, opts)),
    put: (name, data, opts) => call('put', name, () => storage.put(name, data, opts)),
    stat: (name) => call('stat', name, () => storage.stat(name)),
    delete: (name) => call('delete', name, () => storage.delete(name)),
    list,
    ...(sweep ? { removeTemporary: sweep } : {}),
    close: () => storage.close(),
  };
}

/** A network failure shaped like Node's (`err.code`), e.g. ECONNRESET: retriable. */
export function networkError(code = 'ECONNRESET'): Error {
  return Object.assign(new Error(`simulated ${code}`), { code });
}

/** An S3 service error shaped like the SDK's (`name`, `$metadata.httpStatusCode`). */
export function httpError(status: number, name = `Http${status}`): Error {
  const err = new Error(`simulated HTTP ${status} ${name}`);
  err.name = name;
  return Object.assign(err, { $metadata: { httpStatusCode: status }, $fault: status >= 500 ? 'server' : 'client' });
}

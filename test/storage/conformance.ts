/**
 * The one suite every Storage backend passes (restic's internal/backend/test/suite.go).
 * A backend's test file calls runStorageConformance with a factory of fresh, empty
 * storages; each test gets its own and cleans it up.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { IntegrityError, NotFoundError, VmvaultError } from '../../src/errors.js';
import { getInto, type Storage, type StoredObject } from '../../src/storage/storage.js';
import { mapLimit } from '../../src/repo/repository.js';

export interface StorageFixture {
  storage: Storage;
  cleanup(): Promise<void>;
}

export const hex64 = (): string => randomBytes(32).toString('hex');

export async function collect(it: AsyncIterable<StoredObject>): Promise<StoredObject[]> {
  const items: StoredObject[] = [];
  for await (const item of it) items.push(item);
  return items;
}

/** Names listed under `prefix`, sorted, after checking none is listed twice. */
export async function listNames(storage: Storage, prefix: string): Promise<string[]> {
  const names = (await collect(storage.list(prefix))).map((i) => i.name).sort();
  assert.equal(new Set(names).size, names.length, `list(${JSON.stringify(prefix)}) yielded a name twice`);
  return names;
}

const isBadInput = (err: unknown): boolean => err instanceof VmvaultError && err.code === 'BAD_INPUT';

export const INVALID_NAMES = ['', '/abs', 'a//b', 'a/', '../x', 'a/../b', 'a/./b', '.', 'a\\b', 'a\0b', 'x/.tmp-123', '.tmp-x'];

export function runStorageConformance(name: string, makeStorage: () => Promise<StorageFixture>): void {
  describe(`Storage conformance: ${name}`, () => {
    let storage: Storage;
    let fixture: StorageFixture | undefined;
    beforeEach(async () => {
      fixture = await makeStorage();
      storage = fixture.storage;
    });
    afterEach(async () => {
      await fixture?.storage.close();
      await fixture?.cleanup();
      fixture = undefined;
    });

    test('location is printable', () => {
      assert.equal(typeof storage.location, 'string');
      assert.ok(storage.location.length > 0);
    });

    test('put then get returns the same bytes: empty, small and 5 MiB objects', async () => {
      const objects: Array<[string, Uint8Array]> = [
        ['empty', new Uint8Array(0)],
        ['small', new Uint8Array([0, 1, 2, 255])],
        ['big/5mib', new Uint8Array(randomBytes(5 * 1024 * 1024))],
      ];
      for (const [n, data] of objects) await storage.put(n, data);
      for (const [n, data] of objects) {
        const got = await storage.get(n);
        assert.ok(got instanceof Uint8Array, `get(${n}) returns a Uint8Array`);
        assert.equal(got.byteLength, data.byteLength, `size of ${n}`);
        assert.ok(Buffer.from(got).equals(Buffer.from(data)), `content of ${n}`);
        assert.equal((await storage.stat(n))?.size, data.byteLength);
      }
    });

    test('getInto reads a whole object into shared memory at an offset, and refuses one that does not fit', async () => {
      const big = new Uint8Array(randomBytes(5 * 1024 * 1024 + 7));
      await storage.put('big/5mib', big);
      await storage.put('empty', new Uint8Array(0));
      // A view into a SharedArrayBuffer, as a chunk slot is; the bytes around it must stay as they were.
      const whole = Buffer.from(new SharedArrayBuffer(6 * 1024 * 1024)).fill(0xee);
      const into = whole.subarray(3, 3 + big.length + 100);
      assert.equal(await getInto(storage, 'big/5mib', into), big.length);
      assert.ok(into.subarray(0, big.length).equals(big), 'content');
      assert.equal(whole[2], 0xee, 'nothing before the view');
      assert.ok(into.subarray(big.length).every((b) => b === 0xee), 'nothing after the object');
      assert.equal(await getInto(storage, 'empty', into), 0);
      // One byte short, in shared memory: refused, and nothing written past the room given.
      whole.fill(0xee);
      const short = whole.subarray(3, 3 + big.length - 1);
      await assert.rejects(getInto(storage, 'big/5mib', short), (err: unknown) =>
        err instanceof IntegrityError && /5242887 bytes, more than the 5242886/.test(err.message));
      assert.equal(whole[3 + big.length - 1], 0xee, 'the byte past the room is untouched');
      await assert.rejects(getInto(storage, 'keys/missing', into), NotFoundError);
    });

    test('getInto on a storage without its own (a wrapper of a plain get) reads the same, and refuses the same', async () => {
      const data = new Uint8Array(randomBytes(300_000));
      await storage.put('chunks/ab/x', data);
      const plain: Storage = { location: storage.location, get: (n, o) => storage.get(n, o), put: (n, d) => storage.put(n, d), stat: (n) => storage.stat(n), delete: (n) => storage.delete(n), list: (p) => storage.list(p), close: async () => {} };
      const into = Buffer.alloc(400_000);
      assert.equal(await getInto(plain, 'chunks/ab/x', into), data.length);
      assert.ok(into.subarray(0, data.length).equals(data));
      await assert.rejects(getInto(plain, 'chunks/ab/x', Buffer.alloc(299_999)), IntegrityError);
      await assert.rejects(getInto(plain, 'chunks/ab/none', into), NotFoundError);
    });

    test('get with maxBytes reads an object up to that size and refuses a larger one as damaged, naming it, its size and the bound', async () => {
      const data = new Uint8Array(randomBytes(300_000));
      await storage.put('locks/big', data);
      assert.deepEqual(await storage.get('locks/big', { maxBytes: 300_000 }), data);
      await assert.rejects(storage.get('locks/big', { maxBytes: 299_999 }), (err: unknown) =>
        err instanceof IntegrityError && err.message.includes('"locks/big"') && /300000 bytes, more than the 299999 .*damaged/.test(err.message));
      await assert.rejects(storage.get('locks/none', { maxBytes: 10 }), NotFoundError);
      assert.equal((await storage.get('locks/big')).length, 300_000, 'no bound: read whole');
    });

    test('put over an existing name replaces it', async () => {
      await storage.put('config', new Uint8Array([1, 2, 3, 4, 5]));
      await storage.put('config', new Uint8Array([9]));
      assert.deepEqual([...(await storage.get('config'))], [9]);
      assert.equal((await storage.stat('config'))?.size, 1);
      assert.deepEqual(await listNames(storage, ''), ['config']);
    });

    test("stat and list say when an object was last written, on the storage's clock; an overwrite moves it on", async () => {
      await storage.put('locks/l1', new Uint8Array([1]));
      const first = await storage.stat('locks/l1');
      assert.equal(typeof first?.modified, 'number', 'stat gives the time of the last write');
      // The storage's clock is this host's here (a local directory, a test server on this host).
      assert.ok(Math.abs(first!.modified! - Date.now()) < 5 * 60_000, `${first!.modified} is about now`);
      const listed = (await collect(storage.list('locks/'))).find((i) => i.name === 'locks/l1');
      assert.equal(listed?.modified, first!.modified, 'list gives the same time as stat');
      await new Promise((r) => setTimeout(r, 1100)); // S3 gives whole seconds
      await storage.put('locks/l1', new Uint8Array([2]));
      assert.ok((await storage.stat('locks/l1'))!.modified! > first!.modified!, 'an overwrite is a later write');
    });

    test('concurrent puts of one name leave one whole version', async () => {
      const versions = Array.from({ length: 6 }, (_, i) => new Uint8Array(256 * 1024).fill(i + 1));
      await Promise.all(versions.map((v) => storage.put('locks/x', v)));
      const got = Buffer.from(await storage.get('locks/x'));
      assert.ok(versions.some((v) => got.equals(Buffer.from(v))), 'the object is one of the written versions, not a mix');
    });

    test('stat of a missing object is undefined, and so is a "directory"', async () => {
      assert.equal(await storage.stat('nope'), undefined);
      await storage.put('chunks/ab/abcdef', new Uint8Array(3));
      assert.equal(await storage.stat('chunks'), undefined);
      assert.equal(await storage.stat('chunks/ab'), undefined);
      assert.equal(await storage.stat('chunks/ab/abcdef/x'), undefined);
    });

    test('get of a missing object throws NotFoundError', async () => {
      await assert.rejects(storage.get('keys/missing'), NotFoundError);
      await storage.put('chunks/ab/abcdef', new Uint8Array(3));
      await assert.rejects(storage.get('chunks/ab'), NotFoundError);
      await assert.rejects(storage.get('chunks/ab/abcdef/x'), NotFoundError);
    });

    test('delete removes the object and is idempotent', async () => {
      await storage.put('locks/l1', new Uint8Array([1]));
      await storage.delete('locks/l1');
      assert.equal(await storage.stat('locks/l1'), undefined);
      await assert.rejects(storage.get('locks/l1'), NotFoundError);
      await storage.delete('locks/l1');
      await storage.delete('never/existed');
      assert.deepEqual(await listNames(storage, ''), []);
    });

    test('list yields exactly the objects under a prefix, with sizes', async () => {
      const [c1, c2, c3, b1] = [hex64(), 'ab' + hex64().slice(2), 'ac' + hex64().slice(2), hex64()];
      const objects: Record<string, number> = {
        config: 10,
        'keys/abc': 3,
        'keys/abd': 4,
        keysx: 1,
        [`chunks/${c1.slice(0, 2)}/${c1}`]: 5,
        [`chunks/ab/${c2}`]: 6,
        [`chunks/ac/${c3}`]: 0,
        [`backups/${b1}`]: 7,
      };
      for (const [n, size] of Object.entries(objects)) await storage.put(n, new Uint8Array(size));
      const all = await collect(storage.list(''));
      assert.deepEqual(Object.fromEntries(all.map((i) => [i.name, i.size])), objects);
      assert.equal(all.length, Object.keys(objects).length, 'no duplicates');
      const under = (p: string): string[] => Object.keys(objects).filter((n) => n.startsWith(p)).sort();
      for (const p of ['keys/', 'keys', 'keys/ab', 'chunks/', 'chunks/ab', 'chunks/ab/', 'chunks/a', 'backups/', 'c', 'config', 'nothing/', 'chunks/zz/']) {
        assert.deepEqual(await listNames(storage, p), under(p), `list(${JSON.stringify(p)})`);
      }
    });

    test('list of an empty storage yields nothing', async () => {
      assert.deepEqual(await listNames(storage, ''), []);
      assert.deepEqual(await listNames(storage, 'chunks/'), []);
    });

    test('list pages through more than 1000 objects', async () => {
      const names = Array.from({ length: 1100 }, (_, i) => `chunks/${(i % 7).toString(16).padStart(2, '0')}/${i.toString().padStart(6, '0')}`);
      await mapLimit(names, 32, (n) => storage.put(n, new Uint8Array([1])));
      await storage.put('config', new Uint8Array(1));
      assert.deepEqual(await listNames(storage, 'chunks/'), [...names].sort());
      assert.equal((await listNames(storage, '')).length, 1101);
      assert.deepEqual(await listNames(storage, 'chunks/03/'), names.filter((n) => n.startsWith('chunks/03/')).sort());
    });

    test('the repository name shapes round-trip', async () => {
      const id = hex64();
      const names = ['config', 'keys/abc', `chunks/${id.slice(0, 2)}/${id}`, `backups/${hex64()}`, `locks/${hex64()}`];
      for (const [i, n] of names.entries()) await storage.put(n, new Uint8Array([i]));
      for (const [i, n] of names.entries()) assert.deepEqual([...(await storage.get(n))], [i], n);
      assert.deepEqual(await listNames(storage, ''), [...names].sort());
    });

    test('invalid names are rejected with BAD_INPUT by every method', async () => {
      for (const bad of INVALID_NAMES) {
        const label = JSON.stringify(bad);
        await assert.rejects(storage.put(bad, new Uint8Array(1)), isBadInput, `put(${label})`);
        await assert.rejects(storage.get(bad), isBadInput, `get(${label})`);
        await assert.rejects(getInto(storage, bad, Buffer.alloc(8)), isBadInput, `getInto(${label})`);
        await assert.rejects(storage.stat(bad), isBadInput, `stat(${label})`);
        await assert.rejects(storage.delete(bad), isBadInput, `delete(${label})`);
      }
      for (const bad of ['/x', '../', 'a/../', 'a\\b', 'a//', 'x/.tmp-']) {
        await assert.rejects(collect(storage.list(bad)), isBadInput, `list(${JSON.stringify(bad)})`);
      }
      assert.deepEqual(await listNames(storage, ''), [], 'nothing was written');
    });
  });
}

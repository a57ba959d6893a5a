import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { NotFoundError, VmvaultError } from '../../src/errors.js';
import { openStorage } from '../../src/storage/open.js';
import { withRetry } from '../../src/storage/retry.js';
import { S3Storage } from '../../src/storage/s3.js';
import { type S3Server, startS3Server } from '../helpers/s3.js';
import { collect, runStorageConformance } from './conformance.js';

// Started at import time so the conformance suite below can use it; a server that
// cannot start rejects here and every test of this file fails (never skips).
const serverPromise: Promise<S3Server> = startS3Server();
serverPromise.catch(() => undefined); // reported by the tests that await it, not as an unhandled rejection
after(async () => (await serverPromise).stop());

runStorageConformance('s3 (s3rver)', async () => {
  const server = await serverPromise;
  // A fresh prefix per test: the same bucket, isolated namespaces.
  const storage = new S3Storage({ bucket: server.bucket, prefix: `t-${randomBytes(6).toString('hex')}`, endpoint: server.endpoint, forcePathStyle: true });
  return { storage, cleanup: async () => undefined };
});

/** A TCP port on 127.0.0.1 that nothing listens on (bound, read back, released). */
async function closedPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as { port: number };
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

describe('S3Storage', () => {
  let server: S3Server;
  before(async () => {
    server = await serverPromise;
  });

  test('a repository URL opens the bucket through openStorage, and the prefix isolates objects', async () => {
    const a = openStorage(server.repoUrl('iso/a'));
    const b = openStorage(server.repoUrl('iso/b'));
    try {
      await a.put('config', new Uint8Array([1]));
      assert.equal(await b.stat('config'), undefined);
      assert.deepEqual((await collect(b.list(''))).map((i) => i.name), []);
      assert.deepEqual((await collect(a.list(''))).map((i) => i.name), ['config']);
      assert.match(a.location, /^s3:\/\/vmvault-test\/iso\/a at http:\/\/127\.0\.0\.1:\d+$/);
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('a wrong endpoint port gives a STORAGE error naming the endpoint, after the retries', async () => {
    const endpoint = `http://127.0.0.1:${await closedPort()}`;
    let retries = 0;
    const storage = withRetry(new S3Storage({ bucket: server.bucket, endpoint, forcePathStyle: true }), {
      attempts: 3,
      baseDelayMs: 1,
      onRetry: () => retries++,
    });
    try {
      await assert.rejects(storage.put('config', new Uint8Array(1)), (err: unknown) => {
        assert.ok(err instanceof VmvaultError, String(err));
        assert.equal(err.code, 'STORAGE');
        assert.ok(err.message.includes(endpoint), err.message);
        assert.match(err.message, /connection refused/);
        assert.match(err.message, /after 3 attempts/);
        assert.match(err.message, /check the endpoint URL and port/);
        return true;
      });
      assert.equal(retries, 2);
    } finally {
      await storage.close();
    }
  });

  test('an unknown host gives an error naming the endpoint', async () => {
    const storage = withRetry(new S3Storage({ bucket: server.bucket, endpoint: 'http://no-such-host.invalid:9000', forcePathStyle: true }), {
      attempts: 1,
    });
    try {
      await assert.rejects(storage.get('config'), (err: unknown) => {
        assert.ok(err instanceof VmvaultError && err.code === 'STORAGE', String(err));
        assert.match(err.message, /cannot reach S3 endpoint http:\/\/no-such-host\.invalid:9000/);
        return true;
      });
    } finally {
      await storage.close();
    }
  });

  test('a missing bucket gives NO_REPOSITORY naming bucket and endpoint, from every method', async () => {
    const storage = withRetry(new S3Storage({ bucket: 'no-such-bucket', endpoint: server.endpoint, forcePathStyle: true }), { attempts: 2, baseDelayMs: 1 });
    const isMissingBucket = (err: unknown): boolean => {
      assert.ok(err instanceof VmvaultError, String(err));
      assert.ok(!(err instanceof NotFoundError), 'not a missing object');
      assert.equal(err.code, 'NO_REPOSITORY');
      assert.match(err.message, /bucket "no-such-bucket" does not exist/);
      assert.ok(err.message.includes(server.endpoint), err.message);
      assert.match(err.message, /create the bucket/);
      return true;
    };
    try {
      await assert.rejects(storage.get('config'), isMissingBucket, 'get');
      await assert.rejects(storage.put('config', new Uint8Array(1)), isMissingBucket, 'put');
      // HEAD cannot tell a missing bucket from a missing key: S3Storage checks the bucket.
      await assert.rejects(storage.stat('config'), isMissingBucket, 'stat');
      await assert.rejects(storage.delete('config'), isMissingBucket, 'delete');
      await assert.rejects(collect(storage.list('')), isMissingBucket, 'list');
    } finally {
      await storage.close();
    }
  });

  test('bad credentials give an access error, not a missing object', async () => {
    // s3rver checks the access key id but not the signature (so not the secret key).
    const saved = process.env['AWS_ACCESS_KEY_ID'];
    process.env['AWS_ACCESS_KEY_ID'] = 'WRONGKEY';
    const storage = withRetry(new S3Storage({ bucket: server.bucket, endpoint: server.endpoint, forcePathStyle: true }), { attempts: 1 });
    try {
      await assert.rejects(storage.get('config'), (err: unknown) => {
        assert.ok(err instanceof VmvaultError && err.code === 'STORAGE', String(err));
        assert.match(err.message, /access denied/);
        assert.match(err.message, /AWS_ACCESS_KEY_ID/);
        return true;
      });
    } finally {
      process.env['AWS_ACCESS_KEY_ID'] = saved;
      await storage.close();
    }
  });
});

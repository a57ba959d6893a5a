import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createServer as createHttpServer, request as httpRequest, type IncomingHttpHeaders, type Server } from 'node:http';
import { createServer, type AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { IntegrityError, NotFoundError, VmvaultError } from '../../src/errors.js';
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

type Tamper = 'none' | 'flip' | 'truncate';

/**
 * An HTTP proxy in front of s3rver that can change PUT bodies on the way: flip one byte
 * (same length) or drop the second half (Content-Length adjusted), as a faulty network
 * or middlebox would. It records the headers of every PUT it forwards. With `cutGets`,
 * that many GET answers are cut off halfway through their body.
 */
async function tamperingProxy(target: string): Promise<{ endpoint: string; mode: Tamper; cutGets: number; puts: Array<{ headers: IncomingHttpHeaders; body: Buffer }>; close(): Promise<void> }> {
  const t = new URL(target);
  const state = { mode: 'none' as Tamper, cutGets: 0, puts: [] as Array<{ headers: IncomingHttpHeaders; body: Buffer }> };
  const server: Server = createHttpServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (d: Buffer) => parts.push(d));
    req.on('end', () => {
      let body = Buffer.concat(parts);
      const headers = { ...req.headers };
      if (req.method === 'PUT') {
        state.puts.push({ headers: req.headers, body });
        if (state.mode === 'flip' && body.length > 0) {
          body = Buffer.from(body);
          body.writeUInt8(body.readUInt8(body.length >> 1) ^ 0x01, body.length >> 1);
        } else if (state.mode === 'truncate') {
          body = body.subarray(0, body.length >> 1);
          headers['content-length'] = String(body.length);
        }
      }
      const out = httpRequest({ host: t.hostname, port: t.port, method: req.method, path: req.url, headers }, (answer) => {
        if (req.method === 'GET' && answer.statusCode === 200 && state.cutGets > 0) {
          // The connection drops halfway through the body, after its full Content-Length was promised.
          state.cutGets--;
          const got: Buffer[] = [];
          answer.on('data', (d: Buffer) => got.push(d));
          answer.on('end', () => {
            const whole = Buffer.concat(got);
            res.writeHead(200, answer.headers);
            res.write(whole.subarray(0, whole.length >> 1), () => res.socket?.destroy());
          });
          return;
        }
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      });
      out.on('error', () => res.destroy());
      out.end(body);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return Object.assign(state, {
    endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  });
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

  test('every put carries Content-MD5: a body changed or cut short on the way is refused, and nothing is stored', async () => {
    const proxy = await tamperingProxy(server.endpoint);
    const prefix = `md5-${randomBytes(6).toString('hex')}`;
    const viaProxy = new S3Storage({ bucket: server.bucket, prefix, endpoint: proxy.endpoint, forcePathStyle: true });
    const direct = new S3Storage({ bucket: server.bucket, prefix, endpoint: server.endpoint, forcePathStyle: true });
    try {
      const data = randomBytes(256 * 1024 + 3);
      await viaProxy.put('chunks/aa/good', data);
      const sent = proxy.puts.at(-1)!;
      assert.equal(sent.headers['content-md5'], createHash('md5').update(data).digest('base64'));
      assert.deepEqual(Buffer.from(await direct.get('chunks/aa/good')), data);

      for (const mode of ['flip', 'truncate'] as const) {
        proxy.mode = mode;
        const name = `chunks/aa/${mode}`;
        await assert.rejects(viaProxy.put(name, data), (err: unknown) => {
          assert.ok(err instanceof VmvaultError && err.code === 'STORAGE', String(err));
          assert.match(err.message, /does not match its Content-MD5, so it was changed or cut short on the way; nothing was stored/);
          assert.equal(err.retriable, true, 'a corrupted transfer is worth another try');
          return true;
        }, mode);
        assert.equal(await direct.stat(name), undefined, `${mode}: nothing stored`);
      }
      assert.deepEqual((await collect(direct.list(''))).map((i) => i.name), ['chunks/aa/good']);
    } finally {
      await viaProxy.close();
      await direct.close();
      await proxy.close();
    }
  });

  test('a read into a buffer cut short by a dropped connection is retried whole, not taken as damage', async () => {
    const proxy = await tamperingProxy(server.endpoint);
    const prefix = `cut-${randomBytes(6).toString('hex')}`;
    const viaProxy = new S3Storage({ bucket: server.bucket, prefix, endpoint: proxy.endpoint, forcePathStyle: true });
    try {
      const data = randomBytes(3 * 1024 * 1024 + 5);
      await viaProxy.put('chunks/cc/x', data);
      const into = Buffer.alloc(4 * 1024 * 1024);
      proxy.cutGets = 1;
      await assert.rejects(viaProxy.getInto('chunks/cc/x', into), (err: unknown) => {
        assert.ok(err instanceof VmvaultError && err.code === 'STORAGE' && err.retriable, `a retriable storage error, not ${String(err)}`);
        return true;
      });
      proxy.cutGets = 2;
      const retried: string[] = [];
      const storage = withRetry(viaProxy, { attempts: 3, baseDelayMs: 1, onRetry: (r) => retried.push(r.op) });
      assert.equal(await storage.getInto!('chunks/cc/x', into), data.length);
      assert.ok(into.subarray(0, data.length).equals(data), 'the whole object, after two cut attempts');
      assert.deepEqual(retried, ['get', 'get']);
    } finally {
      await viaProxy.close();
      await proxy.close();
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

describe('S3 reads bounded by maxBytes', () => {
  test('a body with no Content-Length (chunked) is counted as it arrives and cut off past the bound: memory never holds the rest', async () => {
    let sent = 0;
    let closed = false;
    // A body of 64 MiB, sent as fast as the client takes it.
    const server = createHttpServer((req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Transfer-Encoding': 'chunked' });
      const piece = Buffer.alloc(64 * 1024, 0x5a);
      const pump = () => {
        while (!res.destroyed && sent < 64 * 1024 * 1024) {
          sent += piece.length;
          if (!res.write(piece)) return;
        }
        if (!res.destroyed) res.end();
      };
      res.on('drain', pump);
      res.on('close', () => { closed = true; });
      pump();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as AddressInfo;
    const storage = new S3Storage({ bucket: 'b', endpoint: `http://127.0.0.1:${port}`, forcePathStyle: true });
    try {
      await assert.rejects(storage.get('backups/huge', { maxBytes: 1024 * 1024 }), (err: unknown) =>
        err instanceof IntegrityError && /"backups\/huge" .* is at least \d+ bytes, more than the 1048576 /.test(err.message));
      for (let i = 0; i < 100 && !closed; i++) await new Promise((r) => setTimeout(r, 10));
      assert.ok(closed, 'the connection was dropped');
      assert.ok(sent < 32 * 1024 * 1024, `the server got to send ${sent} bytes only`);
    } finally {
      await storage.close();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  });

  test('an endpoint that accepts the connection and never answers: the error says so, not that it cannot be reached', async () => {
    const held: import('node:net').Socket[] = [];
    const server = createServer((socket) => { held.push(socket); }); // reads the request, never answers
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as AddressInfo;
    const storage = new S3Storage({ bucket: 'b', endpoint: `http://127.0.0.1:${port}`, forcePathStyle: true, socketTimeoutMs: 500 });
    try {
      await assert.rejects(storage.stat('config'), (err: unknown) => err instanceof VmvaultError && err.retriable === true &&
        /accepted the connection and then stopped answering for 0\.5 s: the server is stuck or overloaded/.test(err.message) && !/cannot reach/.test(err.message));
    } finally {
      await storage.close();
      for (const s of held) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    }
  });
});

/**
 * Starts a real S3-protocol server (s3rver) for tests: no mocks of S3. When it cannot
 * start, startS3Server throws, so the tests that need it fail rather than skip.
 *
 * s3rver runs in a child process started with `--openssl-legacy-provider`: it makes its
 * ListObjectsV2 continuation tokens with DES, which OpenSSL 3 (Node ≥ 17) disables, so
 * in-process every listing of more than 1000 keys fails with a 500 InternalError.
 * A child process also keeps its Koa/winston machinery out of the test process.
 *
 * Other s3rver quirks seen with @aws-sdk/client-s3 v3:
 * - It works with requestChecksumCalculation/responseChecksumValidation WHEN_REQUIRED
 *   (the SDK's defaults send flexible checksums that old servers don't know).
 * - HEAD of a key in a missing bucket answers 404 without a body, so the SDK reports
 *   `NotFound`, like a missing key (real S3 does the same); S3Storage checks the bucket.
 * - It checks the access key id (S3RVER) but not SigV4 signatures: a wrong secret key
 *   is accepted, a wrong access key id gives InvalidAccessKeyId.
 * - It writes objects in place, so a PUT cut off half-way leaves a truncated object where
 *   real S3 leaves none: the child patches its store to write, then rename.
 * - It ignores Content-MD5 (real S3, MinIO, Ceph and R2 refuse a body that does not
 *   match it with 400 BadDigest): the same patch checks it, as S3 does, before the rename.
 * - Its default `address` is 'localhost'; we bind 127.0.0.1 to avoid IPv6/IPv4 surprises.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import type { Socket } from 'node:net';
import path from 'node:path';

export interface S3Server {
  /** e.g. http://127.0.0.1:39211 */
  endpoint: string;
  bucket: string;
  /** A repository URL for `prefix` in the bucket, e.g. s3://vmvault-test/p?endpoint=… */
  repoUrl(prefix: string): string;
  /** Credentials and region for child processes (also set in this process). */
  env: Record<string, string>;
  /**
   * The file holding object `key` of the bucket in s3rver's store: its size is the
   * object's (a test may make it a sparse file of gigabytes after putting the object).
   */
  objectFile(key: string): string;
  stop(): Promise<void>;
}

/** Runs in the child: starts s3rver, reports the bound port over IPC, exits with its parent. */
const CHILD_SCRIPT = `
const [modulePath, directory, bucket] = process.argv.slice(1);
const S3rver = require(modulePath);
// Real S3 makes an object visible only once its whole body has arrived; s3rver writes
// straight into the object's file, so a client killed mid-upload leaves a truncated
// object. Write to a temporary file and rename it at the end, as S3 behaves.
const fs = require('fs'), path = require('path'), crypto = require('crypto');
const Store = require(path.join(path.dirname(modulePath), 'stores', 'filesystem.js'));
const putObject = Store.prototype.putObject;
Store.prototype.putObject = async function (object) {
  if (Buffer.isBuffer(object.content)) return putObject.call(this, object);
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fs.promises.mkdir(path.dirname(objectPath), { recursive: true });
  const tmp = objectPath + '.upload-' + crypto.randomBytes(6).toString('hex');
  let size = 0;
  const hash = crypto.createHash('md5');
  try {
    await new Promise((resolve, reject) => {
      let ended = false;
      const out = fs.createWriteStream(tmp);
      object.content.on('data', (c) => { hash.update(c); size += c.length; });
      object.content.on('end', () => { ended = true; });
      object.content.on('error', reject);
      object.content.on('close', () => { if (!ended) reject(new Error('request body ended early')); });
      out.on('error', reject);
      out.on('finish', () => (ended ? resolve() : reject(new Error('request body ended early'))));
      object.content.pipe(out);
    });
  } catch (err) {
    await fs.promises.rm(tmp, { force: true });
    throw err;
  }
  const md5 = hash.digest('hex');
  const sent = object.content.headers && object.content.headers['content-md5'];
  if (sent !== undefined) {
    const S3Error = require(path.join(path.dirname(modulePath), 'models', 'error.js'));
    const digest = Buffer.from(String(sent), 'base64');
    const fail = digest.length !== 16
      ? new S3Error('InvalidDigest', 'The Content-MD5 you specified was invalid.')
      : digest.toString('hex') !== md5 ? new S3Error('BadDigest', 'The Content-MD5 you specified did not match what was received.') : undefined;
    if (fail) {
      await fs.promises.rm(tmp, { force: true });
      throw fail;
    }
  }
  await fs.promises.rename(tmp, objectPath);
  await this.putMetadata(object.bucket, object.key, object.metadata, md5);
  return { size, md5 };
};
const server = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory, configureBuckets: [{ name: bucket }] });
server.run().then(
  (address) => process.send({ port: address.port }),
  (err) => { console.error(err && err.stack || String(err)); process.exit(1); },
);
process.on('disconnect', () => process.exit(0));
`;

const START_TIMEOUT_MS = 20_000;

export async function startS3Server(): Promise<S3Server> {
  const modulePath = createRequire(import.meta.url).resolve('s3rver');
  const directory = await mkdtemp(path.join(tmpdir(), 'vmvault-s3rver-'));
  const bucket = 'vmvault-test';
  const child = spawn(process.execPath, ['--openssl-legacy-provider', '-e', CHILD_SCRIPT, modulePath, directory, bucket], {
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
  });
  let port: number;
  try {
    port = await waitForPort(child);
  } catch (err) {
    child.kill('SIGKILL');
    await rm(directory, { recursive: true, force: true });
    throw err;
  }
  // The test process must be free to exit even if a test forgets stop(); the child
  // then sees its IPC channel close and exits too.
  child.unref();
  child.channel?.unref();
  (child.stderr as Socket | null)?.unref();
  const endpoint = `http://127.0.0.1:${port}`;
  const env: Record<string, string> = {
    AWS_ACCESS_KEY_ID: 'S3RVER',
    AWS_SECRET_ACCESS_KEY: 'S3RVER',
    AWS_REGION: 'us-east-1',
    // Never wait on the EC2 metadata service when looking for credentials.
    AWS_EC2_METADATA_DISABLED: 'true',
    // The SDK warns on every process start under Node < 22: noise in child processes' stderr.
    AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
  };
  Object.assign(process.env, env);
  return {
    endpoint,
    bucket,
    env,
    repoUrl: (prefix) => `s3://${bucket}/${prefix}?endpoint=${endpoint}`,
    // s3rver's filesystem store: <directory>/<bucket>/<key's folders>/<key's last part>._S3rver_object
    objectFile: (key) => {
      const parts = key.split('/');
      return path.join(directory, bucket, ...parts.slice(0, -1), `${parts.at(-1)!}._S3rver_object`);
    },
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.ref(); // or the process may end before the child's exit is seen (it was unref'd)
        child.kill('SIGTERM');
        await exited;
      }
      await rm(directory, { recursive: true, force: true });
    },
  };
}

/** The port the child reports, or an error with its stderr when it exits or hangs. */
function waitForPort(child: ChildProcess): Promise<number> {
  return new Promise((resolve, reject) => {
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const fail = (why: string): void => {
      clearTimeout(timer);
      reject(new Error(`cannot start s3rver for the S3 tests: ${why}${stderr ? `\n${stderr}` : ''}`));
    };
    const timer = setTimeout(() => fail(`no port reported within ${START_TIMEOUT_MS} ms`), START_TIMEOUT_MS);
    child.once('error', (err) => fail(err.message));
    child.once('exit', (code, signal) => fail(`it exited (${signal ?? `code ${code}`})`));
    child.once('message', (msg: { port?: unknown }) => {
      clearTimeout(timer);
      if (typeof msg.port === 'number') resolve(msg.port);
      else fail(`unexpected message ${JSON.stringify(msg)}`);
    });
  });
}

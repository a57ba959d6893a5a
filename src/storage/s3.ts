/**
 * A Storage on an S3 bucket (AWS, MinIO, Ceph, R2, s3rver…): object `a/b` is the key
 * `<prefix>/a/b`. The only module that imports @aws-sdk.
 */
import { createHash } from 'node:crypto';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import {
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { NotFoundError, ThrottledError, VmvaultError, errorMessage, isRetriable, isThrottling } from '../errors.js';
import { checkName, checkPrefix } from './names.js';
import { tooLarge, type GetOptions, type ObjectStat, type RequestOptions, type Storage, type StoredObject } from './storage.js';
import { copyBytes } from '../bytes.js';

export interface S3StorageOptions {
  bucket: string;
  /** Key prefix without leading or trailing "/"; '' for the bucket's root. */
  prefix?: string;
  /** Default: AWS_REGION, else 'us-east-1'. */
  region?: string;
  /** e.g. http://127.0.0.1:9000 for MinIO; default: AWS. */
  endpoint?: string;
  /** Bucket in the path (http://host/bucket/key) instead of the host name. */
  forcePathStyle?: boolean;
  /** Sockets kept per host: room for ~16 parallel uploads plus reads. Default 32. */
  maxSockets?: number;
  /** Give up connecting after this long, so a black-holed endpoint fails (then retries). Default 10 s. */
  connectionTimeoutMs?: number;
  /** Give up on a socket idle this long mid-request. Default 120 s. */
  socketTimeoutMs?: number;
  /**
   * Send each put's MD5 as Content-MD5, so the server refuses a body changed or cut
   * short on the way instead of storing it. Default true; false only to measure its
   * cost (bench/s3-checksum.ts).
   */
  contentMd5?: boolean;
}

/** Network error codes that mean "the endpoint cannot be reached", with a short reason. */
const UNREACHABLE: Record<string, string> = {
  ECONNREFUSED: 'connection refused',
  ENOTFOUND: 'host name not found (DNS)',
  EAI_AGAIN: 'temporary DNS failure',
  ETIMEDOUT: 'connection timed out',
  EHOSTUNREACH: 'host unreachable',
  ENETUNREACH: 'network unreachable',
};

const ACCESS_DENIED = ['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'Forbidden', 'InvalidToken', 'ExpiredToken'];

/**
 * S3Storage implements the Storage contract with single-request PutObject (objects are
 * at most a few MiB), so a put is atomic by S3's own guarantee.
 *
 * The SDK's own retries are off (maxAttempts 1): wrap with withRetry (openStorage does).
 * Flexible checksums are sent and checked only when required: S3-compatible servers
 * reject or mishandle the SDK's default ones. Every put carries Content-MD5 instead,
 * which S3, MinIO, Ceph and R2 all check: a body that arrives altered or short is
 * refused (BadDigest, retried) rather than stored. Reads need no such check: every
 * object is authenticated by the repository's encryption or MAC.
 */
export class S3Storage implements Storage {
  readonly location: string;
  readonly bucket: string;
  readonly prefix: string;
  /** The endpoint, as printed in messages. */
  readonly endpoint: string;
  private readonly client: S3Client;
  private readonly keyPrefix: string;
  private readonly agents: Array<HttpAgent | HttpsAgent>;
  private readonly contentMd5: boolean;
  private readonly socketTimeoutMs: number;
  /** Set once the bucket is known to exist, see `stat`. */
  private bucketChecked: Promise<void> | undefined;

  constructor(opts: S3StorageOptions) {
    this.bucket = opts.bucket;
    this.contentMd5 = opts.contentMd5 ?? true;
    this.socketTimeoutMs = opts.socketTimeoutMs ?? 120_000;
    this.prefix = (opts.prefix ?? '').replace(/^\/+|\/+$/g, '');
    if (this.prefix) checkName(this.prefix);
    this.keyPrefix = this.prefix ? `${this.prefix}/` : '';
    const region = opts.region ?? process.env['AWS_REGION'] ?? 'us-east-1';
    this.endpoint = opts.endpoint ? redactUrl(opts.endpoint) : `https://s3.${region}.amazonaws.com`;
    this.location = `s3://${this.bucket}${this.prefix ? `/${this.prefix}` : ''}` + (opts.endpoint ? ` at ${this.endpoint}` : '');
    const agentOptions = { keepAlive: true, maxSockets: opts.maxSockets ?? 32 };
    const httpAgent = new HttpAgent(agentOptions);
    const httpsAgent = new HttpsAgent(agentOptions);
    this.agents = [httpAgent, httpsAgent];
    this.client = new S3Client({
      region,
      ...(opts.endpoint ? { endpoint: opts.endpoint } : {}),
      forcePathStyle: opts.forcePathStyle ?? false,
      maxAttempts: 1,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      // Options rather than a NodeHttpHandler instance: the SDK builds the handler
      // itself, so we need not import @smithy/node-http-handler (not our dependency).
      requestHandler: {
        httpAgent,
        httpsAgent,
        connectionTimeout: opts.connectionTimeoutMs ?? 10_000,
        socketTimeout: this.socketTimeoutMs,
      },
    });
  }

  /**
   * With maxBytes, a response whose Content-Length is larger is refused before its body
   * is read (the connection is dropped), and the body is counted as it arrives, in case
   * the length was absent or wrong: memory never holds more than maxBytes of it.
   */
  async get(name: string, opts: GetOptions = {}): Promise<Uint8Array> {
    const Key = this.key(name);
    const max = opts.maxBytes ?? Infinity;
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key }));
      const body = res.Body as (AsyncIterable<Uint8Array> & { destroy?: () => void }) | undefined;
      if (!body) return new Uint8Array(0);
      if (res.ContentLength !== undefined && res.ContentLength > max) {
        body.destroy?.();
        throw tooLarge(this, name, res.ContentLength, max);
      }
      const pieces: Uint8Array[] = [];
      let size = 0;
      for await (const piece of body) {
        size += piece.length;
        if (size > max) throw tooLarge(this, name, size, max, true); // leaving the loop destroys the body
        pieces.push(piece);
      }
      const out = new Uint8Array(size);
      let at = 0;
      for (const piece of pieces) at += copyBytes(piece, out, at);
      return out;
    } catch (err) {
      if (err instanceof VmvaultError) throw err;
      throw this.translate(err, 'get', name);
    }
  }

  async getInto(name: string, into: Uint8Array, opts: RequestOptions = {}): Promise<number> {
    const Key = this.key(name);
    const signal = opts.signal;
    try {
      signal?.throwIfAborted();
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key }), signal ? { abortSignal: signal } : {});
      const body = res.Body as (AsyncIterable<Uint8Array> & { destroy?: () => void }) | undefined;
      if (!body) return 0;
      if (res.ContentLength !== undefined && res.ContentLength > into.length) {
        body.destroy?.();
        throw tooLarge(this, name, res.ContentLength, into.length);
      }
      // The response's pieces go straight where they belong: no list of them, no concatenation.
      let at = 0;
      // Cut while the body arrives, too (not only before the answer).
      const cut = () => body.destroy?.();
      signal?.addEventListener('abort', cut, { once: true });
      try {
        for await (const piece of body) {
          if (at + piece.length > into.length) throw tooLarge(this, name, at + piece.length, into.length, true);
          at += copyBytes(piece, into, at);
        }
      } finally {
        signal?.removeEventListener('abort', cut);
      }
      signal?.throwIfAborted();
      return at;
    } catch (err) {
      // Cut short by the caller: its reason, not the SDK's "Request aborted".
      if (signal?.aborted) throw signal.reason;
      if (err instanceof VmvaultError) throw err;
      throw this.translate(err, 'get', name);
    }
  }

  async put(name: string, data: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    const Key = this.key(name);
    const signal = opts.signal;
    try {
      signal?.throwIfAborted();
      const ContentMD5 = this.contentMd5 ? createHash('md5').update(data).digest('base64') : undefined;
      await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key, Body: data, ContentLength: data.byteLength, ContentMD5 }), signal ? { abortSignal: signal } : {});
    } catch (err) {
      // Cut short by the caller: its reason, not the SDK's "Request aborted".
      if (signal?.aborted) throw signal.reason;
      throw this.translate(err, 'put', name);
    }
  }

  async stat(name: string): Promise<ObjectStat | undefined> {
    const Key = this.key(name);
    try {
      const res = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key }));
      return { size: res.ContentLength ?? 0, ...(res.LastModified ? { modified: res.LastModified.getTime() } : {}) };
    } catch (err) {
      const e = this.translate(err, 'stat', name);
      if (!(e instanceof NotFoundError)) throw e;
      // A HEAD response has no body, so a missing bucket looks like a missing key:
      // check the bucket once, or a typo in the bucket name would read as "empty".
      this.bucketChecked ??= this.checkBucket().catch((checkErr: unknown) => {
        this.bucketChecked = undefined;
        throw checkErr;
      });
      await this.bucketChecked;
      return undefined;
    }
  }

  async delete(name: string): Promise<void> {
    const Key = this.key(name);
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key })); // 204 when absent too
    } catch (err) {
      const e = this.translate(err, 'delete', name);
      if (!(e instanceof NotFoundError)) throw e;
    }
  }

  async *list(prefix: string): AsyncIterable<StoredObject> {
    checkPrefix(prefix);
    let token: string | undefined;
    do {
      let page;
      try {
        page = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.keyPrefix + prefix, ContinuationToken: token }),
        );
      } catch (err) {
        throw this.translate(err, 'list', prefix);
      }
      for (const obj of page.Contents ?? []) {
        if (!obj.Key) continue;
        const name = obj.Key.slice(this.keyPrefix.length);
        // "folder/" placeholders made by S3 consoles are not objects of ours.
        if (name === '' || name.endsWith('/')) continue;
        yield { name, size: obj.Size ?? 0, ...(obj.LastModified ? { modified: obj.LastModified.getTime() } : {}), ...(obj.ETag ? { etag: obj.ETag } : {}) };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  async close(): Promise<void> {
    this.client.destroy();
    for (const agent of this.agents) agent.destroy();
  }

  private key(name: string): string {
    checkName(name);
    return this.keyPrefix + name;
  }

  private async checkBucket(): Promise<void> {
    try {
      await this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.keyPrefix, MaxKeys: 1 }));
    } catch (err) {
      throw this.translate(err, 'list', '');
    }
  }

  /** Turns an SDK or network error into a VmvaultError that says what to do. */
  private translate(err: unknown, op: string, name: string): VmvaultError {
    if (err instanceof VmvaultError) return err;
    const e = err as { name?: unknown; code?: unknown; $metadata?: { httpStatusCode?: number } };
    const errName = typeof e.name === 'string' ? e.name : '';
    const code = typeof e.code === 'string' ? e.code : '';
    const status = e.$metadata?.httpStatusCode;
    const what = op === 'list' ? `list ${JSON.stringify(this.keyPrefix + name)}` : `${op} ${JSON.stringify(this.keyPrefix + name)}`;
    const where = `bucket "${this.bucket}" at ${this.endpoint}`;

    if (errName === 'NoSuchBucket') {
      return new VmvaultError('NO_REPOSITORY',
        `S3 bucket "${this.bucket}" does not exist at ${this.endpoint}: create the bucket (vmvault does not create buckets) or fix the bucket name, endpoint or region in the repository URL`,
        { cause: err });
    }
    if (errName === 'NoSuchKey' || errName === 'NotFound' || (status === 404 && op !== 'list')) {
      return new NotFoundError(`object ${JSON.stringify(name)} not found in ${this.location}`, { cause: err });
    }
    if (ACCESS_DENIED.includes(errName) || status === 403) {
      return new VmvaultError('STORAGE',
        `S3 ${what} in ${where}: access denied (${errName || status}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on this bucket`,
        { cause: err });
    }
    if (isThrottling(err)) {
      return new ThrottledError(`S3 ${what} in ${where}: the server asks for fewer requests (${[errName, status && `HTTP ${status}`].filter(Boolean).join(', ')}); vmvault lowers its concurrency and retries`, { cause: err });
    }
    if (errName === 'BadDigest') {
      return new VmvaultError('STORAGE',
        `S3 ${what} in ${where}: the server refused the body: it does not match its Content-MD5, so it was changed or cut short on the way; nothing was stored`,
        { cause: err, retriable: true });
    }
    if (errName === 'CredentialsProviderError') {
      return new VmvaultError('STORAGE',
        `S3 ${what} in ${where}: no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) (${errorMessage(err)})`,
        { cause: err });
    }
    // The connection was made, and then nothing came for the socket timeout: a stuck or
    // overloaded server, or a proxy or firewall that drops the connection silently.
    if (errName === 'TimeoutError' && /of inactivity|because of no activity/.test(errorMessage(err))) {
      return new VmvaultError('STORAGE',
        `S3 ${what} in ${where}: the endpoint accepted the connection and then stopped answering for ${this.socketTimeoutMs / 1000} s: ` +
        'the server is stuck or overloaded, or a proxy or firewall on the way drops the connection; check the server and the network path to it',
        { cause: err, retriable: true });
    }
    const unreachable = UNREACHABLE[code];
    if (unreachable || errName === 'TimeoutError') {
      return new VmvaultError('STORAGE',
        `cannot reach S3 endpoint ${this.endpoint}: ${unreachable ?? 'timed out'} (${errorMessage(err)}): check the endpoint URL and port, and that the server is running and reachable from this host`,
        { cause: err, retriable: isRetriable(err) });
    }
    const detail = [errName, status && `HTTP ${status}`].filter(Boolean).join(', ');
    return new VmvaultError('STORAGE', `S3 ${what} in ${where} failed: ${errorMessage(err)}${detail ? ` (${detail})` : ''}`,
      { cause: err, retriable: isRetriable(err) });
  }
}

/** The URL without user name or password, for messages. */
function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (!u.username && !u.password) return url.replace(/\/+$/, '');
    u.username = '';
    u.password = '';
    return u.toString().replace(/\/+$/, '');
  } catch {
    return url;
  }
}

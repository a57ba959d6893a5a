/**
 * Starts a real S3-protocol server (s3rver) for tests: no mocks of S3. When it cannot
 * start, startS3Server throws, so the tests that need it fail rather than skip.
 *
 * s3rver quirks seen with @aws-sdk/client-s3 v3 (and handled in src/storage/s3.ts):
 * - It works with requestChecksumCalculation/responseChecksumValidation WHEN_REQUIRED
 *   (the defaults send flexible checksums that old servers don't know).
 * - HEAD of a key in a missing bucket answers 404 without a body, so the SDK reports
 *   `NotFound`, like a missing key (real S3 does the same for HEAD).
 * - It accepts any signature with the key pair S3RVER/S3RVER.
 * - Its default `address` is 'localhost'; we bind 127.0.0.1 to avoid IPv6/IPv4 surprises.
 */
import { createRequire } from 'node:module';
import { mkdtemp, rm } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

/** The part of s3rver's (untyped, CommonJS) API we use. */
interface S3rverInstance {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
  httpServer?: { closeAllConnections?(): void };
}
type S3rverConstructor = new (options: {
  address: string;
  port: number;
  silent: boolean;
  directory: string;
  configureBuckets: Array<{ name: string }>;
}) => S3rverInstance;

export interface S3Server {
  /** e.g. http://127.0.0.1:39211 */
  endpoint: string;
  bucket: string;
  /** A repository URL for `prefix` in the bucket, e.g. s3://vmvault-test/p?endpoint=… */
  repoUrl(prefix: string): string;
  /** Credentials and region for child processes (also set in this process). */
  env: Record<string, string>;
  stop(): Promise<void>;
}

export async function startS3Server(): Promise<S3Server> {
  const S3rver = createRequire(import.meta.url)('s3rver') as S3rverConstructor;
  const directory = await mkdtemp(path.join(tmpdir(), 'vmvault-s3rver-'));
  const bucket = 'vmvault-test';
  const server = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory, configureBuckets: [{ name: bucket }] });
  let address: AddressInfo;
  try {
    address = await server.run();
  } catch (err) {
    await rm(directory, { recursive: true, force: true });
    throw new Error(`cannot start s3rver for the S3 tests: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  const endpoint = `http://127.0.0.1:${address.port}`;
  const env: Record<string, string> = {
    AWS_ACCESS_KEY_ID: 'S3RVER',
    AWS_SECRET_ACCESS_KEY: 'S3RVER',
    AWS_REGION: 'us-east-1',
    // Never wait on the EC2 metadata service when looking for credentials.
    AWS_EC2_METADATA_DISABLED: 'true',
  };
  Object.assign(process.env, env);
  return {
    endpoint,
    bucket,
    env,
    repoUrl: (prefix) => `s3://${bucket}/${prefix}?endpoint=${endpoint}`,
    stop: async () => {
      // Idle keep-alive sockets of clients not closed would hold close() for seconds.
      const closing = server.close();
      server.httpServer?.closeAllConnections?.();
      await closing;
      await rm(directory, { recursive: true, force: true });
    },
  };
}

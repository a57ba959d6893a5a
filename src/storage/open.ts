/**
 * Repository URL → Storage: a table from scheme to backend (restic's
 * internal/backend/location/registry.go). parseRepositoryUrl is pure and decides
 * everything; openStorage only builds what it describes.
 */
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { VmvaultError } from '../errors.js';
import { LocalStorage } from './local.js';
import { prefixProblem } from './names.js';
import { type RetryOptions, withRetry } from './retry.js';
import { lazyStorage } from './lazy.js';
import { withAdaptiveConcurrency } from './throttle.js';
import type { Storage } from './storage.js';

/** What a repository URL designates. */
export type RepositoryLocation =
  | { kind: 'local'; /** as written, absolute or relative to the working directory */ path: string }
  | {
      kind: 's3';
      bucket: string;
      /** '' or a key prefix without leading/trailing "/". */
      prefix: string;
      /** From `?region=`; undefined means AWS_REGION, else us-east-1 (see S3Storage). */
      region: string | undefined;
      /** From `?endpoint=`, without a trailing "/"; undefined means AWS. */
      endpoint: string | undefined;
      /** From `?path-style=`, default true when an endpoint is given. */
      forcePathStyle: boolean;
    };

export const ACCEPTED_FORMS = [
  '/abs/path, ./rel/path or rel/path           a local directory',
  'file:///abs/path                            a local directory',
  's3://BUCKET[/PREFIX][?endpoint=URL&region=REGION&path-style=true|false]',
].join('\n  ');

const S3_OPTIONS = ['endpoint', 'region', 'path-style'];

/** Rules of S3 bucket names (lower case, digits, dots, hyphens; 3 to 63 characters). */
const BUCKET_RE = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

/**
 * Parses a repository URL, throwing VmvaultError('BAD_REPOSITORY_URL') with the URL
 * (credentials masked) and the accepted forms when it is not one of them. Anything
 * that looks like `scheme:` is taken as a URL, never as a relative path, so that
 * typos such as `s3:/bucket` or `s4://x` fail instead of creating a local directory.
 */
export function parseRepositoryUrl(url: string): RepositoryLocation {
  const bad = (why: string): VmvaultError =>
    new VmvaultError('BAD_REPOSITORY_URL', `bad repository URL "${maskCredentials(url)}": ${why}\naccepted forms:\n  ${ACCEPTED_FORMS}`);

  if (url.trim() === '') throw bad('it is empty');
  if (url.includes('\0')) throw bad('it contains a NUL character');
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(url)?.[1];
  if (scheme === undefined) return { kind: 'local', path: url };

  const parser = Object.hasOwn(SCHEMES, scheme.toLowerCase()) ? SCHEMES[scheme.toLowerCase()] : undefined;
  if (!parser) {
    const hint = url.startsWith(`${scheme}://`) ? '' : ` (a local path containing ":" can be written ./${maskCredentials(url)})`;
    throw bad(`unknown scheme "${scheme}:"${hint}`);
  }
  if (!url.startsWith(`${scheme}://`)) {
    const rest = url.slice(scheme.length + 1).replace(/^\/+/, '');
    const fixed = `${scheme.toLowerCase()}://${scheme.toLowerCase() === 'file' ? '/' : ''}${rest}`;
    throw bad(`it must start with "${scheme.toLowerCase()}://" (did you mean "${maskCredentials(fixed)}"?)`);
  }
  return parser(url.slice(scheme.length + 3), bad);
}

type Parser = (rest: string, bad: (why: string) => VmvaultError) => RepositoryLocation;

const SCHEMES: Record<string, Parser> = {
  file: (rest, bad) => {
    if (!rest.startsWith('/')) throw bad('a file URL must be file:///absolute/path (three slashes)');
    if (/[?#]/.test(rest)) throw bad('a file URL takes no query or fragment');
    try {
      return { kind: 'local', path: fileURLToPath(`file://${rest}`) };
    } catch (err) {
      throw bad(err instanceof Error ? err.message : String(err));
    }
  },

  s3: (rest, bad) => {
    if (rest.includes('#')) throw bad('it contains a "#" fragment');
    const q = rest.indexOf('?');
    const pathPart = q < 0 ? rest : rest.slice(0, q);
    const query = q < 0 ? '' : rest.slice(q + 1);
    const slash = pathPart.indexOf('/');
    const bucket = slash < 0 ? pathPart : pathPart.slice(0, slash);
    const prefix = slash < 0 ? '' : pathPart.slice(slash + 1).replace(/\/+$/, '');

    if (bucket === '') throw bad('the bucket name is missing (s3://BUCKET/...)');
    if (bucket.includes('@')) throw bad('credentials do not belong in the URL: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY');
    if (!BUCKET_RE.test(bucket) || bucket.includes('..')) {
      throw bad(`"${bucket}" is not a valid bucket name (3 to 63 lower-case letters, digits, "." or "-")`);
    }
    const problem = prefix ? prefixProblem(prefix) ?? (prefix.split('/').includes('') ? 'it has an empty segment' : undefined) : undefined;
    if (problem) throw bad(`invalid prefix "${prefix}": ${problem}`);

    const options = new Map<string, string>();
    for (const [key, value] of new URLSearchParams(query)) {
      if (!S3_OPTIONS.includes(key)) throw bad(`unknown option "${key}" (known: ${S3_OPTIONS.join(', ')})`);
      if (options.has(key)) throw bad(`option "${key}" is given twice`);
      options.set(key, value);
    }

    const endpoint = options.has('endpoint') ? parseEndpoint(options.get('endpoint') ?? '', bad) : undefined;
    const region = options.get('region');
    if (region !== undefined && !/^[a-z0-9-]+$/.test(region)) throw bad(`"${region}" is not a valid region (e.g. us-east-1)`);
    const style = options.get('path-style');
    if (style !== undefined && style !== 'true' && style !== 'false') throw bad('path-style must be true or false');
    const forcePathStyle = style === undefined ? endpoint !== undefined : style === 'true';
    return { kind: 's3', bucket, prefix, region, endpoint, forcePathStyle };
  },
};

function parseEndpoint(value: string, bad: (why: string) => VmvaultError): string {
  let u: URL;
  try {
    u = new URL(value);
  } catch {
    throw bad(`endpoint "${maskCredentials(value)}" is not a URL (e.g. endpoint=http://127.0.0.1:9000)`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw bad(`endpoint "${maskCredentials(value)}" must be an http:// or https:// URL`);
  if (u.username || u.password) throw bad('credentials do not belong in the endpoint: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY');
  if (u.search || u.hash) throw bad(`endpoint "${maskCredentials(value)}" must not have a query or fragment`);
  return value.replace(/\/+$/, '');
}

/**
 * Replaces `user:password@` in any URL inside `text` by `***@`, also after a mistyped
 * `s3:/` or `s3:` and in URL-encoded form (an endpoint given as `http%3A%2F%2F…`).
 */
export function maskCredentials(text: string): string {
  return text
    .replace(/([/:])[^/?#@\s]*@/g, '$1***@')
    .replace(/%2F%2F(?:(?!%2F)[^/?#&\s])*?%40/gi, '%2F%2F***%40');
}

const BACKENDS: { [K in RepositoryLocation['kind']]: (loc: Extract<RepositoryLocation, { kind: K }>) => Storage } = {
  local: (loc) => new LocalStorage(path.resolve(loc.path)),
  // The S3 SDK is loaded only when an S3 repository is used (see lazy.ts); S3 answers
  // SlowDown/503 under load, and the number of requests in flight adapts (throttle.ts).
  s3: (loc) => lazyStorage(s3Location(loc), async () => withAdaptiveConcurrency(new (await import('./s3.js')).S3Storage(loc))),
};

/** What S3Storage prints as its location, known before the SDK is loaded. */
function s3Location(loc: Extract<RepositoryLocation, { kind: 's3' }>): string {
  const prefix = loc.prefix.replace(/^\/+|\/+$/g, '');
  return `s3://${loc.bucket}${prefix ? `/${prefix}` : ''}` + (loc.endpoint ? ` at ${loc.endpoint}` : '');
}

/**
 * Opens the storage a repository URL designates, wrapped with withRetry (and, for S3,
 * withAdaptiveConcurrency inside it, so each attempt takes a slot). Throws
 * VmvaultError('BAD_REPOSITORY_URL') for a URL parseRepositoryUrl rejects. Opening
 * does no I/O: a missing directory or bucket shows at the first operation.
 */
export function openStorage(url: string, opts: { retry?: RetryOptions } = {}): Storage {
  const loc = parseRepositoryUrl(url);
  // TypeScript cannot correlate BACKENDS[loc.kind] with loc's type; the table's type checks each entry.
  const build = BACKENDS[loc.kind] as (l: RepositoryLocation) => Storage;
  return withRetry(build(loc), opts.retry);
}

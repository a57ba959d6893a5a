/**
 * Object-name rules shared by every backend, so that a name accepted by one backend
 * is accepted by all of them and means the same object everywhere.
 */
import { VmvaultError } from '../errors.js';

/** Objects whose last segment starts with this are in-flight writes of LocalStorage. */
export const TEMP_PREFIX = '.tmp-';

/** S3 caps keys at 1024 bytes; the repository's longest name is ~75. */
const MAX_NAME_BYTES = 1024;

/**
 * Why `name` is not a valid object name, or undefined when it is valid.
 * A valid name is a non-empty, relative, slash-separated path with no empty, `.` or
 * `..` segment, no backslash, no NUL and no segment starting with `.tmp-` (those are
 * reserved for temporary files and would never be listed).
 */
export function nameProblem(name: string): string | undefined {
  if (name.length === 0) return 'it is empty';
  const partial = prefixProblem(name);
  if (partial) return partial;
  if (name.split('/').some((s) => s === '')) return 'it has an empty segment (leading, trailing or double "/")';
  return undefined;
}

/**
 * Why `prefix` is not a valid list prefix, or undefined when it is valid. A prefix is a
 * name that may be empty, end with "/" or stop in the middle of a segment.
 */
export function prefixProblem(prefix: string): string | undefined {
  if (prefix.includes('\0')) return 'it contains a NUL character';
  if (prefix.includes('\\')) return 'it contains a backslash';
  if (prefix.startsWith('/')) return 'it is absolute (starts with "/")';
  if (Buffer.byteLength(prefix) > MAX_NAME_BYTES) return `it is longer than ${MAX_NAME_BYTES} bytes`;
  const segments = prefix.split('/');
  if (segments.some((s) => s === '.' || s === '..')) return 'it has a "." or ".." segment';
  if (segments.some((s, i) => s === '' && i > 0 && i < segments.length - 1)) return 'it has an empty segment (double "/")';
  if (segments.some((s) => s.startsWith(TEMP_PREFIX))) return `a segment starts with "${TEMP_PREFIX}", which is reserved for temporary files`;
  return undefined;
}

/** Throws VmvaultError('BAD_INPUT') unless `name` is a valid object name. */
export function checkName(name: string): void {
  const problem = nameProblem(name);
  if (problem) throw new VmvaultError('BAD_INPUT', `invalid storage object name ${JSON.stringify(name)}: ${problem}`);
}

/** Throws VmvaultError('BAD_INPUT') unless `prefix` is a valid list prefix. */
export function checkPrefix(prefix: string): void {
  const problem = prefixProblem(prefix);
  if (problem) throw new VmvaultError('BAD_INPUT', `invalid storage list prefix ${JSON.stringify(prefix)}: ${problem}`);
}

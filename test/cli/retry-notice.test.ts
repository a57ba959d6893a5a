/** The CLI says when storage operations are being retried, without a line per retry. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { retryNotice } from '../../src/cli/context.js';
import { VmvaultError } from '../../src/errors.js';

test('the first retry is said at once, then at most one line per interval, counting the ones not said', () => {
  const said: string[] = [];
  let clock = 0;
  const notice = retryNotice((m) => said.push(m), 30_000, () => clock);
  const error = new VmvaultError('STORAGE', 'S3 put "chunks/ab/x": the endpoint accepted the connection and then stopped answering for 120 s');
  notice({ op: 'put', name: 'chunks/ab/x', attempt: 1, delayMs: 200, error });
  clock = 1_000;
  notice({ op: 'put', name: 'chunks/ab/y', attempt: 1, delayMs: 200, error });
  clock = 20_000;
  notice({ op: 'put', name: 'chunks/ab/x', attempt: 2, delayMs: 400, error });
  assert.equal(said.length, 1);
  assert.match(said[0]!, /^storage put of "chunks\/ab\/x" failed, attempt 1: S3 put .*stopped answering for 120 s; retrying in 0\.2 s$/);
  clock = 31_000;
  notice({ op: 'get', name: 'backups/b', attempt: 3, delayMs: 1_600, error: new Error('socket hang up') });
  assert.equal(said.length, 2);
  assert.match(said[1]!, /^storage get of "backups\/b" failed, attempt 3: socket hang up; retrying in 1\.6 s \(and 2 other retries since the last notice\)$/);
});

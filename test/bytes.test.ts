/** copyBytes (src/bytes.ts): the copy into and out of the chunk pool's shared slots. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { copyBytes } from '../src/bytes.js';

test('copyBytes copies exactly the source, into or out of shared memory, at any offset, and nothing else', () => {
  const shared = () => Buffer.from(new SharedArrayBuffer(1 << 20)).fill(0xee);
  for (const [target, source] of [
    [shared(), randomBytes(300_000)],
    [Buffer.alloc(1 << 20, 0xee), Buffer.from(new SharedArrayBuffer(300_000)).fill(7)],
    [new Uint8Array(new SharedArrayBuffer(1 << 20)).fill(0xee), new Uint8Array(randomBytes(300_000))],
  ] as const) {
    assert.equal(copyBytes(source, target, 12_345), source.length);
    assert.deepEqual(Buffer.from(target.subarray(12_345, 12_345 + source.length)), Buffer.from(source));
    assert.equal(target[12_344], 0xee);
    assert.equal(target[12_345 + source.length], 0xee);
  }
  const one = shared();
  assert.equal(copyBytes(Buffer.of(9), one, (1 << 20) - 1), 1);
  assert.equal(one[(1 << 20) - 1], 9);
  assert.equal(copyBytes(Buffer.alloc(0), one, 5), 0, 'nothing to copy is not an error');
  assert.throws(() => copyBytes(Buffer.alloc(10), one, (1 << 20) - 5), RangeError);
  assert.throws(() => copyBytes(Buffer.alloc(10), one, -1), RangeError);
});

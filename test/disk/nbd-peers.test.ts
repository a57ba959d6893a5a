/** What the NBD server counts clients by (an IPv6 client by its /64), and its log budget. Pure logic. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { LogBudget, peerKey } from '../../src/disk/nbd-peers.js';

describe('NBD peers', () => {
  test('IPv4 as it is; IPv6 by its /64, however written; IPv4-mapped as IPv4; none for a unix socket', () => {
    assert.equal(peerKey('10.0.0.5'), '10.0.0.5');
    assert.equal(peerKey('::ffff:10.0.0.5'), '10.0.0.5');
    assert.equal(peerKey('0:0:0:0:0:ffff:a00:5'), '10.0.0.5');
    assert.equal(peerKey('2001:db8:1:2::1'), '2001:db8:1:2::/64');
    assert.equal(peerKey('2001:db8:1:2:ffff:ffff:ffff:ffff'), '2001:db8:1:2::/64', 'another address of the same /64');
    assert.equal(peerKey('2001:0db8:0001:0002:0000:0000:0000:0001'), '2001:db8:1:2::/64', 'leading zeros');
    assert.notEqual(peerKey('2001:db8:1:3::1'), peerKey('2001:db8:1:2::1'), 'the next /64 is another client');
    assert.equal(peerKey('fe80::1%eth0'), 'fe80:0:0:0::/64', 'a zone is no part of the client');
    assert.equal(peerKey('::1'), '0:0:0:0::/64');
    assert.equal(peerKey('::'), '0:0:0:0::/64');
    assert.equal(peerKey('64:ff9b::192.0.2.33'), '64:ff9b:0:0::/64', 'an embedded IPv4 tail');
    assert.equal(peerKey(undefined), undefined);
    assert.equal(peerKey(''), undefined);
  });

  test('a log budget lets N lines through per window, then tells how many it held back, once', async () => {
    const summaries: number[] = [];
    const b = new LogBudget((n) => summaries.push(n), 3, 200);
    const taken = Array.from({ length: 10 }, () => b.take());
    assert.deepEqual(taken, [true, true, true, false, false, false, false, false, false, false]);
    assert.deepEqual(summaries, []);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(summaries, [7], 'the held-back lines, told at the end of the window');
    assert.equal(b.take(), true, 'a new window');
    b.flush();
    assert.deepEqual(summaries, [7], 'nothing held back: no summary');
  });
});

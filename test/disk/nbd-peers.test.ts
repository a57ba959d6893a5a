/** What the NBD server counts clients by (an IPv6 client by its /64), and its log budget. Pure logic. */
import assert from 'node:assert/strict';
import { BlockList } from 'node:net';
import { describe, test } from 'node:test';
import { Rng } from '../helpers/rng.js';
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

  test('generated IPv6 addresses, written every way: same key exactly when Node\'s BlockList puts them in one /64', () => {
    const rng = new Rng(0x6464);
    /** Eight groups, often with runs of zeros (so that :: compresses something) and sometimes an IPv4 tail. */
    const groups = (): number[] => Array.from({ length: 8 }, () => (rng.chance(0.4) ? 0 : rng.chance(0.2) ? 0xffff : rng.int(0x10000)));
    /** One textual form of `g`: full, leading zeros dropped, the longest zero run as ::, upper case, or a dotted IPv4 tail. */
    const write = (g: number[]): string => {
      const hex = g.map((x) => (rng.chance(0.5) ? x.toString(16).padStart(4, '0') : x.toString(16)));
      let text = hex.join(':');
      if (rng.chance(0.5)) {
        let best = [-1, 0];
        for (let i = 0; i < 8;) {
          let j = i;
          while (j < 8 && g[j] === 0) j++;
          if (j - i > best[1]!) best = [i, j - i];
          i = j === i ? i + 1 : j;
        }
        if (best[1]! >= 2) text = `${hex.slice(0, best[0]).join(':')}::${hex.slice(best[0]! + best[1]!).join(':')}`;
      } else if (rng.chance(0.3)) {
        text = `${hex.slice(0, 6).join(':')}:${g[6]! >> 8}.${g[6]! & 0xff}.${g[7]! >> 8}.${g[7]! & 0xff}`;
      }
      return rng.chance(0.3) ? text.toUpperCase() : text;
    };
    const mapped = (g: number[]) => g.slice(0, 5).every((x) => x === 0) && g[5] === 0xffff;
    for (let i = 0; i < 2000; i++) {
      const a = groups();
      // Half the time the same /64 with another interface id.
      const b = rng.chance(0.5) ? [...a.slice(0, 4), ...groups().slice(4)] : groups();
      const [ta, tb] = [write(a), write(b)];
      const what = `case ${i}: ${ta} and ${tb}`;
      if (mapped(a) || mapped(b)) {
        if (mapped(a)) assert.equal(peerKey(ta), `${a[6]! >> 8}.${a[6]! & 0xff}.${a[7]! >> 8}.${a[7]! & 0xff}`, what);
        continue;
      }
      const list = new BlockList();
      list.addSubnet(ta, 64, 'ipv6');
      assert.equal(peerKey(ta) === peerKey(tb), list.check(tb, 'ipv6'), what);
      assert.equal(peerKey(ta), peerKey(write(a)), `${what}: another form of the first`);
    }
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

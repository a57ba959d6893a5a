import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chunkId, deriveKeys, generateMaster, openMaster, sealMaster } from '../../src/crypto/keys.js';
import { fromPaper, toPaper } from '../../src/crypto/paper.js';

test('a key file opens with its passphrase only, and only for its repository', async () => {
  const master = generateMaster();
  const file = await sealMaster(master, 'correct horse', 'repo-a', 'weak');
  assert.deepEqual(await openMaster(file, 'correct horse', 'repo-a'), master);
  assert.equal(await openMaster(file, 'correct horsf', 'repo-a'), undefined);
  assert.equal(await openMaster(file, 'correct horse', 'repo-b'), undefined);
  assert.equal(file.kdf.algorithm, 'argon2id13');
});

test('chunk ids are keyed: another key gives another id', () => {
  const data = Buffer.from('same data');
  const a = deriveKeys(generateMaster());
  const b = deriveKeys(generateMaster());
  assert.match(chunkId(a, data), /^[0-9a-f]{64}$/);
  assert.equal(chunkId(a, data), chunkId(a, Buffer.from('same data')));
  assert.notEqual(chunkId(a, data), chunkId(b, data));
});

test('paper key round trip, with sloppy typing', () => {
  const master = generateMaster();
  const repoId = '0123456789abcdef0123456789abcdef';
  const paper = toPaper(master, repoId);
  assert.deepEqual(fromPaper(paper), { master, repoId });
  const sloppy = paper
    .split('\n')
    .map((l) => l.replace(/^(\d+): (.*)$/, (_m, n: string, rest: string) => `${n}: ${rest.toLowerCase().replace(/-/g, ' ').replace(/0/g, 'o').replace(/1/g, 'l')}`))
    .join('\n');
  assert.notEqual(sloppy, paper);
  assert.deepEqual(fromPaper(sloppy).master, master);
});

test('paper key typos are caught on their line', () => {
  const paper = toPaper(generateMaster(), '0123456789abcdef0123456789abcdef');
  const lines = paper.split('\n');
  const line2 = lines.findIndex((l) => l.startsWith('2: '));
  const chars = lines[line2]!.split('');
  const pos = 4; // first key character of line 2
  chars[pos] = chars[pos] === 'A' ? 'B' : 'A';
  const typo = [...lines.slice(0, line2), chars.join(''), ...lines.slice(line2 + 1)].join('\n');
  assert.throws(() => fromPaper(typo), /line 2 does not match its checksum/);
  const missing = lines.filter((_, i) => i !== line2).join('\n');
  assert.throws(() => fromPaper(missing), /line 2 is missing/);
  assert.throws(() => fromPaper(paper.replace(/check: \S+/, 'check: ZZZZ')), /final check/);
});

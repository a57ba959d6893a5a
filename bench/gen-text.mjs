#!/usr/bin/env node
// Writes SIZE_MIB MiB of log-like text to stdout: timestamps, levels, request ids,
// paths, dictionary-like words and now and then a base64 blob. Compressible (zstd -3
// gets about 3x) but never repeating, so neither tool can deduplicate it.
// Deterministic for a given SEED; fast (~50 MB/s), so the bench image builds quickly.
//   node bench/gen-text.mjs SIZE_MIB SEED > file
import { writeSync } from 'node:fs';

const sizeMiB = Number(process.argv[2] ?? 64);
let s = (Number(process.argv[3] ?? 1) * 2654435761) >>> 0 || 1;
const rnd = () => { // xorshift32
  s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
  return s;
};
const pick = (a) => a[rnd() % a.length];

const syl = ['ka', 'lo', 'mi', 'ne', 'ru', 'ta', 'vo', 'shi', 'pre', 'con', 'dat', 'ex', 'ion', 'ver', 'al', 'ment', 'or', 'un', 'sto', 'ble'];
const words = Array.from({ length: 4000 }, () => Array.from({ length: 1 + (rnd() % 4) }, () => pick(syl)).join(''));
const levels = ['INFO', 'INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'];
const services = ['api', 'db', 'auth', 'cache', 'worker', 'mail', 'search', 'billing'];
const verbs = ['GET', 'GET', 'POST', 'PUT', 'DELETE'];
const hex = (n) => (n >>> 0).toString(16).padStart(8, '0');
const b64 = Buffer.alloc(48);

const target = sizeMiB * 1024 * 1024;
const buf = Buffer.alloc(4 * 1024 * 1024 + 4096);
let pos = 0;
const put = (str) => { pos += buf.latin1Write(str, pos); };
const flush = () => {
  const n = Math.min(pos, target - written);
  for (let off = 0; off < n;) off += writeSync(1, buf, off, n - off);
  written += n;
  pos = 0;
};
let written = 0;
let t = 1_700_000_000_000 + (rnd() % 1_000_000_000);
let second = -1;
let stamp = '';
while (written < target) {
  t += rnd() % 97;
  if (Math.floor(t / 1000) !== second) { second = Math.floor(t / 1000); stamp = new Date(t).toISOString().slice(0, 20); }
  put(stamp); put(String(t % 1000).padStart(3, '0')); put('Z '); put(pick(levels)); put(' '); put(pick(services));
  put(`-${rnd() % 16} [req ${hex(rnd())}] ${pick(verbs)} /v1/${pick(words)}/${rnd() % 100_000} ${rnd() % 8 ? 200 : 500} ${rnd() % 900}ms`);
  for (let w = 3 + (rnd() % 9); w > 0; w--) { put(' '); put(pick(words)); }
  if (rnd() % 10 === 0) {
    for (let j = 0; j < 48; j += 4) b64.writeUInt32LE(rnd(), j);
    put(' payload='); put(b64.toString('base64'));
  }
  put('\n');
  if (pos >= 4 * 1024 * 1024) flush();
}

/**
 * The paper form of a repository's master secret: Crockford base32 in groups of
 * four, one short checksum per line so a typo is caught on the line where it was
 * made, and a final checksum over the whole secret and repository id.
 *
 *   vmvault paper key v1
 *   repository 0f1e…
 *   1: 7ZQK-3M1D-W8XA-0PKE  4C
 *   …
 *   check: H2QX
 */
import { VmvaultError } from '../errors.js';
import { blake2b } from './blake2b.js';
import { MASTER_BYTES } from './keys.js';

const ALPHABET = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
const LINE_CHARS = 16;

function toBase32(bytes: Uint8Array): string {
  let bits = 0;
  let value = 0;
  let out = '';
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += ALPHABET[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    value &= (1 << bits) - 1;
  }
  if (bits > 0) out += ALPHABET[(value << (5 - bits)) & 31];
  return out;
}

function fromBase32(text: string, byteLength: number): Uint8Array {
  const out = new Uint8Array(byteLength);
  let bits = 0;
  let value = 0;
  let i = 0;
  for (const ch of text) {
    value = (value << 5) | ALPHABET.indexOf(ch);
    bits += 5;
    if (bits >= 8) {
      if (i < byteLength) out[i++] = (value >>> (bits - 8)) & 0xff;
      bits -= 8;
    }
    value &= (1 << bits) - 1;
  }
  return out;
}

/** Reads what a person typed: case-insensitive, O for 0, I/L for 1, spaces and dashes ignored. */
function normalise(text: string): string {
  return text.toUpperCase().replace(/[\s-]/g, '').replace(/O/g, '0').replace(/[IL]/g, '1');
}

function check(text: string, chars: number): string {
  const digest = blake2b(16, new TextEncoder().encode(text), null);
  return toBase32(digest).slice(0, chars);
}

/**
 * The two-character checksum of key line `n`. Ten bits: about 1 typo in 1024 slips past
 * it, and is then caught by the final check (twenty bits over the whole key).
 */
export function lineChecksum(n: number, chars: string): string {
  return check(`${n}:${chars}`, 2);
}

export function toPaper(master: Uint8Array, repoId: string): string {
  const body = toBase32(master);
  const lines = ['vmvault paper key v1', `repository ${repoId}`];
  for (let n = 0; n * LINE_CHARS < body.length; n++) {
    const chunk = body.slice(n * LINE_CHARS, (n + 1) * LINE_CHARS);
    const grouped = chunk.match(/.{1,4}/g)!.join('-');
    lines.push(`${n + 1}: ${grouped.padEnd(19)}  ${lineChecksum(n + 1, chunk)}`);
  }
  lines.push(`check: ${check(`${repoId}:${body}`, 4)}`);
  return lines.join('\n') + '\n';
}

/**
 * Parses a paper key. Throws VmvaultError('BAD_INPUT') naming the line with a typo.
 * Returns the master secret and the repository id it was printed for.
 */
export function fromPaper(text: string): { master: Uint8Array; repoId: string } {
  const bad = (msg: string) => new VmvaultError('BAD_INPUT', `paper key: ${msg}`);
  const repo = /^\s*repository\s+([0-9a-filo]{32,64})\s*$/im.exec(text);
  if (!repo) throw bad('the "repository <id>" line is missing');
  const repoId = repo[1]!.toLowerCase().replace(/o/g, '0').replace(/[il]/g, '1');
  let body = '';
  let expected = 1;
  for (const raw of text.split('\n')) {
    const m = /^\s*(\d+)\s*:\s*(.+?)\s+(\S{2})\s*$/.exec(raw);
    if (!m) continue;
    const n = Number(m[1]);
    if (n !== expected) throw bad(`line ${expected} is missing (found line ${n})`);
    const chunk = normalise(m[2]!);
    if ([...chunk].some((c) => !ALPHABET.includes(c))) throw bad(`line ${n} has a character that is not in the key alphabet`);
    if (lineChecksum(n, chunk) !== normalise(m[3]!)) throw bad(`line ${n} does not match its checksum: check that line for a typo`);
    body += chunk;
    expected++;
  }
  const need = Math.ceil((MASTER_BYTES * 8) / 5);
  if (body.length !== need) throw bad(`expected ${need} key characters, found ${body.length}: a line is missing`);
  const total = /^\s*check\s*:\s*(\S+)\s*$/im.exec(text);
  if (!total) throw bad('the "check:" line is missing');
  if (check(`${repoId}:${body}`, 4) !== normalise(total[1]!)) {
    throw bad('the final check does not match: look for a typo in the repository line, the check line, or a key line (a line\'s own checksum misses about 1 typo in 1024)');
  }
  return { master: fromBase32(body, MASTER_BYTES), repoId };
}

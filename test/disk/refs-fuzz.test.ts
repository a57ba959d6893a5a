/**
 * Differential fuzzing of "an image's metadata never makes vmvault open another host
 * file" (src/disk/image-refs.ts), with what qemu really opens as the oracle: real
 * images made by qemu-img (vmdk of every subformat, with a parent, qcow2 v2/v3 with
 * and without a backing file or data file, vdi), their metadata mutated (descriptor
 * text, sparse vmdk headers, qcow2 header fields and extensions, stray bytes), and
 * each mutant opened by `qemu-img info -f FORMAT` under strace in a private
 * directory holding decoy files the mutants name.
 *
 * The invariants, for every mutant:
 * - when qemu opens, stats or reports any file other than the image (a decoy, a
 *   companion extent, any name read from the metadata; system files aside),
 *   imageReferences names at least one reference, so inspectDisk refuses the image;
 * - imageReferences and probeFormat return, never throw; no read is of a bad
 *   position or length, past MAX_READ bytes, or past MAX_TOTAL bytes in all; none hangs;
 * - strace sees qemu open the image itself (else the oracle has gone blind).
 *
 * Deterministic: mutant n of seed s is the same on every run (VMVAULT_FUZZ_SEED,
 * VMVAULT_FUZZ_ITERATIONS for a longer run, VMVAULT_FUZZ_ONLY=n to run one, and
 * VMVAULT_FUZZ_KEEP=dir to keep the mutants that break an invariant).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileReader, imageReferences, probeFormat, type ImageReference, type ReadAt } from '../../src/disk/image-refs.js';
import { tempDir, type TempDir } from '../helpers/images.js';
import { Rng, eachMutant, fuzzRun } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const { iterations: ITERATIONS, seed: SEED, only: ONLY, keep: KEEP } = fuzzRun({ iterations: 320, seed: 0x7ef5 });
/** The largest single read image-refs.ts may ask for: a vmdk descriptor (qemu's 1 MiB less a byte). */
const MAX_READ = MiB;
/** All reads of one call together: two descriptor windows, or 64 qcow2 extensions of 64 KiB. */
const MAX_TOTAL = 8 * MiB;
const CALL_TIMEOUT_MS = 5_000;
const SYSTEM = ['/usr/', '/lib/', '/lib64/', '/etc/', '/proc/', '/sys/', '/dev/', '/run/', '/var/lib/', '/var/cache/', '/nix/'];

type Format = 'qcow2' | 'vmdk' | 'vdi';

// ---------------------------------------------------------------------------
// The directory: root/ holds decoy2 and decoy3, root/img/ the seeds, their extents
// and parents, decoy.raw and sub/decoy4; mutants are written to root/img/ too.

let dir: TempDir;
let root: string;
let imgDir: string;

interface Seed {
  name: string;
  format: Format;
  bytes: Buffer;
  /** vmdk: a text descriptor (the whole file) or a sparse file with an embedded one. */
  vmdk?: 'descriptor' | 'sparse';
}
const seeds: Seed[] = [];

/** Names a mutant may write into its metadata: decoys, companions, protocols, odd spellings. */
function namePool(self: string): string[] {
  return [
    'decoy.raw', '../decoy2', path.join(imgDir, 'decoy.raw'), path.join(root, 'decoy3'), 'sub/decoy4', './decoy.raw', 'missing.raw',
    path.join(imgDir, '..', 'decoy2'), `json:{"driver":"file","filename":"${path.join(root, 'decoy3')}"}`, 'file:decoy.raw', 'nbd:localhost:1',
    self, `./${self}`, `../img/${self}`, '', ' ', '.', '..', 'decoy.raw\0tail', ' decoy.raw', 'decoy.raw ', `${'x'.repeat(511)}decoy.raw`,
    'd\u00e9coy.raw', 'flat-flat.vmdk', 'tg-s001.vmdk', 'tf-f001.vmdk', 'vbase.vmdk', 'base.qcow2', 'decoy"raw', 'decoy.raw\r', 'sub/../decoy.raw',
  ];
}
const nameBytes = (name: string) => Buffer.from(name, 'utf8').toString('latin1');

// ---------------------------------------------------------------------------
// Mutations of a vmdk descriptor's text (latin1: one character per byte).

function extentLine(r: Rng, self: string): string {
  const sp = () => r.pick([' ', ' ', ' ', '\t', '', '  ', '\n', '\r\n', '\v', '\f']);
  const access = r.pick(['RW', 'RW', 'RW', 'RDONLY', 'NOACCESS', 'rw', 'R W', '', 'RWX', 'RW\0']);
  const sectors = r.pick(['2048', '2048', '+2048', '-1', '0', '18446744073709551615', '99999999999999999999', '0x800', '', '1', '4194304']);
  const type = r.pick(['FLAT', 'FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'SESPARSE', 'VMFSRAW', 'VMFSRDM', 'flat', '', 'FLATFLATFLATFLAT']);
  const name = nameBytes(r.pick(namePool(self)));
  const quoted = r.pick([`"${name}"`, `"${name}"`, `"${name}"`, name, `"${name}`, `'${name}'`, `""${name}""`, `" ${name}"`]);
  const offset = r.pick(['', ' 0', ' 0', ' 128', ' -5', ' 18446744073709551616', ' x']);
  return `${access}${sp()}${sectors}${sp()}${type}${sp()}${quoted}${offset}`;
}

function otherLine(r: Rng, self: string): string {
  const name = nameBytes(r.pick(namePool(self)));
  return r.pick([
    `parentFileNameHint="${name}"`, `parentFileNameHint = "${name}"`, `#parentFileNameHint="${name}"`, `parentFileNameHint="${name}`,
    `createType="${r.pick(['monolithicFlat', 'monolithicSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized', 'vmfs', 'vmfsSparse', 'vmfsRaw', 'seSparse', 'custom', ''])}"`,
    `version=${r.pick(['1', '2', '3', '4', '0', ''])}`, `parentCID=${r.pick(['ffffffff', '12345678', '0', 'x'])}`, `CID=${r.pick(['fffffffe', '0'])}`,
    `# ${extentLine(r, self)}`, `ddb.note = "${extentLine(r, self)}"`, `#`, '', '   ', '\0',
  ]);
}

/** One change to descriptor text; `self` is the mutant's own file name. */
function mutateText(text: string, r: Rng, self: string): [string, string] {
  const lines = text.split('\n');
  const at = r.int(lines.length + 1);
  switch (r.int(11)) {
    case 0: case 1: case 2: {
      const line = extentLine(r, self);
      const extent = lines.findIndex((l) => /^(RW|RDONLY|NOACCESS) /.test(l));
      const i = extent >= 0 && r.chance(0.6) ? extent : at;
      lines.splice(i, i === extent ? 1 : 0, line);
      return [lines.join('\n'), `extent line ${JSON.stringify(line)} at line ${i}`];
    }
    case 3: case 4: {
      const line = otherLine(r, self);
      lines.splice(at, r.chance(0.3) ? 1 : 0, line);
      return [lines.join('\n'), `line ${JSON.stringify(line)} at line ${at}`];
    }
    case 5: lines.splice(at, 1); return [lines.join('\n'), `line ${at} deleted`];
    case 6: {
      const eol = r.pick(['\r\n', '\r', '\n\r', '\n\n']);
      return [lines.join(eol), `lines ended with ${JSON.stringify(eol)}`];
    }
    case 7: {
      const i = r.int(text.length + 1);
      const b = r.pick(['\0', '"', '\n', '\r', ' ', '#', '=', String.fromCharCode(r.int(256))]);
      return [text.slice(0, i) + b + text.slice(r.chance(0.5) ? i : i + 1), `byte ${JSON.stringify(b)} at ${i}`];
    }
    case 8: {
      const pre = r.pick(['\n', '   \n', '# x\n', '\t\n', ' \r\n', '#\n\n']);
      return [pre + text, `prefixed ${JSON.stringify(pre)}`];
    }
    case 9: {
      const i = r.int(text.length + 1);
      return [text.slice(0, i), `cut at ${i}`];
    }
    default: {
      const i = r.int(lines.length);
      lines.splice(i, 0, lines[i] ?? '');
      return [lines.join('\n'), `line ${i} doubled`];
    }
  }
}

// ---------------------------------------------------------------------------
// Mutations of binary headers.

function writeLE(img: Buffer, at: number, width: 4 | 8, v: bigint): void {
  if (at + width > img.length) return;
  if (width === 8) img.writeBigUInt64LE(BigInt.asUintN(64, v), at);
  else img.writeUInt32LE(Number(BigInt.asUintN(32, v)), at);
}
function writeBE(img: Buffer, at: number, width: 4 | 8, v: bigint): void {
  if (at + width > img.length) return;
  if (width === 8) img.writeBigUInt64BE(BigInt.asUintN(64, v), at);
  else img.writeUInt32BE(Number(BigInt.asUintN(32, v)), at);
}

const SPARSE_FIELDS: [number, 4 | 8, string, bigint[]][] = [
  [4, 4, 'version', [1n, 2n, 3n, 4n, 0n]], [8, 4, 'flags', [0n, 1n, 2n, 3n, 0x10000n, 0x20000n, 0x30003n, 0xffffffffn]],
  [12, 8, 'capacity', [0n, 0n, 1n, 2048n, 1n << 40n, (1n << 64n) - 1n]], [20, 8, 'granularity', [0n, 1n, 8n, 128n, 129n, 1n << 20n]],
  [28, 8, 'descriptor offset', [0n, 0n, 1n, 2n, 21n, 127n, 1n << 40n, 1n << 55n, (1n << 64n) - 1n]], [36, 8, 'descriptor size', [0n, 1n, 20n, 2048n, 4096n, 1n << 40n]],
  [44, 4, 'grain table entries', [0n, 1n, 512n, 1n << 20n]], [56, 8, 'grain directory offset', [0n, 1n, 0xffffffffffffffffn, 1n << 40n]], [64, 8, 'overhead', [0n, 1n, 128n]],
];

/** The descriptor embedded in a sparse vmdk, as its header places it. */
function embedded(img: Buffer): { at: number; length: number } | undefined {
  const at = Number(img.readBigUInt64LE(28)) * 512;
  const length = Number(img.readBigUInt64LE(36)) * 512;
  if (at === 0 || length === 0 || at >= img.length) return undefined;
  return { at, length: Math.min(length, img.length - at) };
}

function mutateSparse(img: Buffer, r: Rng, self: string): string {
  const d = embedded(img);
  if (d && r.chance(0.55)) {
    const area = img.subarray(d.at, d.at + d.length);
    const nul = area.indexOf(0);
    const [text, what] = mutateText(area.subarray(0, nul < 0 ? area.length : nul).toString('latin1'), r, self);
    const bytes = Buffer.from(text, 'latin1').subarray(0, area.length);
    area.fill(0);
    bytes.copy(area);
    return `embedded descriptor: ${what}`;
  }
  if (r.chance(0.06)) {
    const magic = r.pick(['COWD', 'KDMW', '# Di', 'vers']);
    img.write(magic, 0, 'latin1');
    return `magic ${magic}`;
  }
  if (r.chance(0.1)) {
    const at = r.int(Math.min(img.length, 0x200 + 20 * 512));
    img[at] = r.int(256);
    return `stray byte at ${at}`;
  }
  const [off, width, name, values] = r.pick(SPARSE_FIELDS);
  const v = r.chance(0.8) ? r.pick(values) : r.u64();
  // streamOptimized repeats its header in a footer 1 KiB from the end.
  const footer = r.chance(0.2) && img.length > 1536 && img.subarray(img.length - 1024, img.length - 1020).toString('latin1') === 'KDMV';
  writeLE(img, (footer ? img.length - 1024 : 0) + off, width, v);
  return `${footer ? 'footer ' : ''}${name} = ${v}`;
}

const EXT_DATA_FILE = 0x44415441n;
const EXT_BACKING_FORMAT = 0xe2792acan;
const EXT_FEATURE_TABLE = 0x6803f857n;

/** The header extensions of a qcow2 header cluster, rewritten with `edit`. */
function rewriteExtensions(img: Buffer, edit: (exts: { type: bigint; data: Buffer }[]) => void): void {
  const version = img.readUInt32BE(4);
  const start = version >= 3 ? img.readUInt32BE(100) : 72;
  const exts: { type: bigint; data: Buffer }[] = [];
  let at = start;
  for (let i = 0; i < 32 && at + 8 <= 4096; i++) {
    const type = BigInt(img.readUInt32BE(at));
    const length = img.readUInt32BE(at + 4);
    if (type === 0n || at + 8 + length > 4096) break;
    exts.push({ type, data: Buffer.from(img.subarray(at + 8, at + 8 + length)) });
    at += 8 + Math.ceil(length / 8) * 8;
  }
  edit(exts);
  at = start;
  img.fill(0, start, Math.min(img.length, 0xe00)); // up to the backing file name, which mutants write at 0xe00
  for (const e of exts) {
    if (at + 8 + e.data.length > 0xe00) break;
    writeBE(img, at, 4, e.type);
    writeBE(img, at + 4, 4, BigInt(e.data.length));
    e.data.copy(img, at + 8);
    at += 8 + Math.ceil(e.data.length / 8) * 8;
  }
}

function mutateQcow2(img: Buffer, r: Rng, self: string): string {
  const name = () => Buffer.from(r.pick(namePool(self)), 'utf8');
  switch (r.int(8)) {
    case 0: case 1: {
      const n = name();
      const size = r.pick([n.length, n.length, n.length + 1, n.length - 1, 0, 1023, 1024, 4097, 65536]);
      const at = r.pick([0xe00, 0xe00, 0xe00, 0, 72, 1 << 20, 2 ** 40, 2 ** 63]);
      img.fill(0, 0xe00, 0x1000);
      n.subarray(0, 0x200).copy(img, 0xe00);
      writeBE(img, 8, 8, BigInt(at));
      writeBE(img, 16, 4, BigInt(size));
      return `backing file ${JSON.stringify(n.toString('latin1'))} at ${at}, ${size} bytes`;
    }
    case 2: {
      const n = name();
      const flag = r.chance(0.7);
      if (img.readUInt32BE(4) === 3 && flag) writeBE(img, 72, 8, img.readBigUInt64BE(72) | 4n);
      rewriteExtensions(img, (exts) => {
        const i = exts.findIndex((e) => e.type === EXT_DATA_FILE);
        if (i >= 0) exts.splice(i, 1);
        exts.splice(r.int(exts.length + 1), 0, { type: EXT_DATA_FILE, data: n });
      });
      return `data file extension ${JSON.stringify(n.toString('latin1'))}${flag ? ', incompatible bit' : ''}`;
    }
    case 3: {
      const f = r.pick(['raw', 'qcow2', 'vmdk', 'file', 'json', '', 'nbd', 'vvfat']);
      rewriteExtensions(img, (exts) => exts.unshift({ type: EXT_BACKING_FORMAT, data: Buffer.from(f) }));
      return `backing format extension ${JSON.stringify(f)}`;
    }
    case 4: {
      const bit = r.pick([0n, 1n, 2n, 2n, 3n, 4n, 63n]);
      writeBE(img, 72, 8, img.readBigUInt64BE(72) ^ (1n << bit));
      return `incompatible bit ${bit} flipped`;
    }
    case 5: {
      const [off, width, field, values] = r.pick([
        [4, 4, 'version', [2n, 3n, 1n, 4n]], [8, 8, 'backing_file_offset', [0n, 0xe00n, 72n, 104n, 2n ** 63n, (1n << 64n) - 1n]],
        [16, 4, 'backing_file_size', [0n, 1n, 1023n, 1024n, 0xffffffffn]], [100, 4, 'header_length', [72n, 104n, 112n, 0n, 4096n, 0xffffffffn]],
      ] as const);
      const v = r.pick(values);
      writeBE(img, off, width, v);
      return `${field} = ${v}`;
    }
    case 6: {
      rewriteExtensions(img, (exts) => {
        const e = exts[r.int(exts.length)];
        if (!e) return;
        if (r.chance(0.5)) e.type = r.pick([EXT_DATA_FILE, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, 0x23852875n, 0x0537be77n, 1n]);
        else e.data = e.data.subarray(0, r.int(e.data.length + 1));
      });
      return 'an extension retyped or cut';
    }
    default: {
      const at = r.int(Math.min(img.length, 0x1000));
      img[at] = r.chance(0.5) ? img[at]! ^ (1 << r.int(8)) : r.int(256);
      return `stray byte at ${at}`;
    }
  }
}

function mutateVdi(img: Buffer, r: Rng): string {
  if (r.chance(0.4)) {
    const v = r.pick([1, 2, 3, 4, 0, 5]);
    img.writeUInt32LE(v, 0x4c);
    return `image type ${v}`;
  }
  const at = r.int(Math.min(img.length, 0x200));
  img[at] = r.int(256);
  return `stray byte at ${at}`;
}

/** A mutant: a seed with 1–3 mutations, maybe truncated; written as `self` in root/img. */
function mutant(index: number, self: string): { seed: Seed; img: Buffer; steps: string[] } {
  // Mutant n depends on the seed and n only (test/helpers/rng.ts).
  const r = new Rng((SEED ^ Math.imul(index + 1, 0x9e3779b1)) >>> 0);
  const seed = r.pick(seeds);
  let img = Buffer.from(seed.bytes);
  const steps: string[] = [];
  const n = 1 + (r.chance(0.6) ? 0 : r.int(3));
  for (let i = 0; i < n; i++) {
    if (seed.format === 'qcow2') steps.push(mutateQcow2(img, r, self));
    else if (seed.format === 'vdi') steps.push(mutateVdi(img, r));
    else if (seed.vmdk === 'sparse') steps.push(mutateSparse(img, r, self));
    else {
      const [text, what] = mutateText(img.toString('latin1'), r, self);
      img = Buffer.from(text, 'latin1');
      steps.push(what);
    }
  }
  if (r.chance(0.05)) {
    img = img.subarray(0, r.int(img.length));
    steps.push(`truncated to ${img.length} bytes`);
  }
  return { seed, img, steps };
}

// ---------------------------------------------------------------------------
// Reading a mutant both ways.

/** fileReader, each read checked against the limits and counted. */
function checkedReader(read: ReadAt, deadline: number): ReadAt {
  let total = 0;
  return async (position, length) => {
    if (!Number.isSafeInteger(position) || position < 0 || !Number.isSafeInteger(length) || length < 0) throw new Error(`invariant: a read of ${length} bytes at ${position}`);
    if (length > MAX_READ) throw new Error(`invariant: a read of ${length} bytes`);
    total += length;
    if (total > MAX_TOTAL) throw new Error(`invariant: ${total} bytes read in all`);
    if (Date.now() > deadline) throw new Error(`invariant: still reading after ${CALL_TIMEOUT_MS} ms`);
    return read(position, length);
  };
}

interface Ours { refs?: ImageReference[]; probe?: string; violation?: string }

async function vmvaultReading(file: string, format: Format): Promise<Ours> {
  const fh = await fs.open(file, 'r');
  let timer: NodeJS.Timeout | undefined;
  try {
    const read = checkedReader(fileReader(fh), Date.now() + CALL_TIMEOUT_MS);
    const timeout = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`invariant: no answer in ${CALL_TIMEOUT_MS} ms`)), CALL_TIMEOUT_MS); });
    const probe = await Promise.race([probeFormat(read), timeout]);
    const refs = await Promise.race([imageReferences(read, format, path.basename(file)), timeout]);
    return { refs, probe: 'format' in probe ? probe.format : `foreign ${probe.foreign}` };
  } catch (err) {
    return { violation: `vmvault threw: ${(err as Error).stack}` };
  } finally {
    clearTimeout(timer);
    await fh.close();
  }
}

const TRACED = 'open,openat,openat2,stat,newfstatat,statx,access,readlink';

/** `strace -xx` strings: every byte as \xNN (or a C escape), back to a path. */
function unescape(s: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    if (s[i] !== '\\') { bytes.push(s.charCodeAt(i)); continue; }
    const c = s[++i];
    if (c === 'x') { bytes.push(parseInt(s.slice(i + 1, i + 3), 16)); i += 2; } else bytes.push({ n: 10, r: 13, t: 9, v: 11, f: 12, '"': 34, '\\': 92 }[c!] ?? c!.charCodeAt(0));
  }
  return Buffer.from(bytes).toString('utf8');
}

interface Theirs { others: string[]; sawImage: boolean; exitCode: number; stderr: string }

/**
 * What `qemu-img info -f FORMAT` opens, stats or reports of other files: every path
 * in the strace log or in its JSON (backing file, data file, extents), normalised,
 * the image, its directory and system files aside.
 */
async function qemuReading(file: string, format: Format, log: string): Promise<Theirs> {
  const cwd = path.join(root, 'cwd');
  const r = await execa('strace', ['-f', '-qq', '-xx', '-s', '65535', '-e', `trace=${TRACED}`, '-o', log, 'qemu-img', 'info', '--output=json', '-f', format, file],
    { reject: false, timeout: 30_000, cwd });
  const touched = new Set<string>();
  for (const line of (await fs.readFile(log, 'latin1')).split('\n')) {
    const m = /^\d+\s+(\w+)\((?:(AT_FDCWD|-?\d+), )?"((?:[^"\\]|\\.)*)"/.exec(line);
    if (!m || !TRACED.split(',').includes(m[1]!)) continue;
    const p = unescape(m[3]!);
    if (p === '') continue;
    touched.add(m[2] && m[2] !== 'AT_FDCWD' && !p.startsWith('/') ? `(fd ${m[2]})/${p}` : path.resolve(cwd, p));
  }
  const sawImage = touched.has(file);
  if (r.exitCode === 0) {
    try {
      const j = JSON.parse(r.stdout) as { 'backing-filename'?: string; 'full-backing-filename'?: string; 'format-specific'?: { data?: { 'data-file'?: string; extents?: { filename: string }[] } } };
      const d = j['format-specific']?.data;
      for (const n of [j['backing-filename'], j['full-backing-filename'], d?.['data-file'], ...(d?.extents ?? []).map((e) => e.filename)]) {
        // qemu reports a backing file as written; relative to the image's directory, as it opens it.
        if (n !== undefined) touched.add(path.resolve(path.dirname(file), n));
      }
    } catch { /* not JSON: nothing reported */ }
  }
  const others = [...touched].filter((p) => p !== file && p !== path.dirname(file) && !SYSTEM.some((s) => p.startsWith(s)) && !/\/locale|\.mo$/.test(p));
  return { others, sawImage, exitCode: r.exitCode ?? -1, stderr: r.stderr };
}

interface Result { outcome: string; violation?: string }

async function check(img: Buffer, seed: Seed, file: string, log: string): Promise<Result> {
  await fs.writeFile(file, img);
  const formats = new Set<Format>([seed.format]);
  const ours = await vmvaultReading(file, seed.format);
  if (ours.violation) return { outcome: 'threw', violation: ours.violation };
  // Without a configured format, inspectDisk passes on what probeFormat says: read that way too.
  if (ours.probe === 'qcow2' || ours.probe === 'vmdk' || ours.probe === 'vdi') formats.add(ours.probe);
  const outcomes: string[] = [];
  for (const format of formats) {
    const o = format === seed.format ? ours : await vmvaultReading(file, format);
    if (o.violation) return { outcome: 'threw', violation: o.violation };
    const q = await qemuReading(file, format, log);
    if (!q.sawImage) return { outcome: 'blind', violation: `strace did not see qemu open ${file} (exit ${q.exitCode}): ${q.stderr.slice(0, 300)}` };
    const refs = o.refs!;
    if (q.others.length > 0 && refs.length === 0) {
      return { outcome: 'missed', violation: `-f ${format}: qemu touched ${JSON.stringify(q.others)} (exit ${q.exitCode}), vmvault names nothing` };
    }
    outcomes.push(`${format === seed.format ? '' : `probed ${format}, `}qemu ${q.others.length ? 'touches others' : 'alone'}, vmvault ${refs.length ? 'names' : 'nothing'}`);
  }
  return { outcome: outcomes.join(' / ') };
}

// ---------------------------------------------------------------------------

async function addSeed(name: string, format: Format, createArgs: string[], vmdk?: 'descriptor' | 'sparse'): Promise<void> {
  const file = path.join(imgDir, name);
  await execa('qemu-img', ['create', '-q', '-f', format, ...createArgs, file, ...(createArgs.includes('-b') ? [] : [`${MiB}`])]);
  // The header and metadata: the first 64 KiB (qemu-img makes small files; a flat extent is a separate file).
  const bytes = (await fs.readFile(file)).subarray(0, 64 * KiB);
  seeds.push({ name, format, bytes, ...(vmdk ? { vmdk } : {}) });
}

before(async () => {
  dir = await tempDir('vmvault-refs-fuzz-');
  root = dir.path;
  imgDir = path.join(root, 'img');
  await fs.mkdir(path.join(imgDir, 'sub'), { recursive: true });
  await fs.mkdir(path.join(root, 'cwd'));
  for (const decoy of [path.join(imgDir, 'decoy.raw'), path.join(root, 'decoy2'), path.join(root, 'decoy3'), path.join(imgDir, 'sub', 'decoy4')]) await fs.writeFile(decoy, Buffer.alloc(MiB, 0x5d));
  await addSeed('sparse.vmdk', 'vmdk', [], 'sparse');
  await addSeed('flat.vmdk', 'vmdk', ['-o', 'subformat=monolithicFlat'], 'descriptor');
  await addSeed('tg.vmdk', 'vmdk', ['-o', 'subformat=twoGbMaxExtentSparse'], 'descriptor');
  await addSeed('tf.vmdk', 'vmdk', ['-o', 'subformat=twoGbMaxExtentFlat'], 'descriptor');
  await addSeed('stream.vmdk', 'vmdk', ['-o', 'subformat=streamOptimized'], 'sparse');
  await addSeed('vbase.vmdk', 'vmdk', [], 'sparse');
  await addSeed('child.vmdk', 'vmdk', ['-b', 'vbase.vmdk', '-F', 'vmdk'], 'sparse');
  await addSeed('v2.qcow2', 'qcow2', ['-o', 'compat=0.10']);
  await addSeed('v3.qcow2', 'qcow2', []);
  await addSeed('base.qcow2', 'qcow2', []);
  await addSeed('top.qcow2', 'qcow2', ['-b', 'base.qcow2', '-F', 'qcow2']);
  await addSeed('data.qcow2', 'qcow2', ['-o', `data_file=${path.join(imgDir, 'data.bin')}`]);
  await addSeed('plain.vdi', 'vdi', []);
});
after(async () => { await dir.cleanup(); });

describe('image metadata fuzzed: every file qemu opens is one vmvault names', () => {
  test('the oracle sees: seeds read as qemu reads them, and a descriptor naming decoy.raw is caught both ways', async () => {
    const chained = new Set(['flat.vmdk', 'tg.vmdk', 'tf.vmdk', 'child.vmdk', 'top.qcow2', 'data.qcow2']);
    for (const seed of seeds) {
      const file = path.join(imgDir, `check-${seed.name}`);
      const r = await check(seed.bytes, seed, file, path.join(root, 'check.log'));
      assert.equal(r.violation, undefined, seed.name);
      assert.equal(r.outcome, chained.has(seed.name) ? 'qemu touches others, vmvault names' : 'qemu alone, vmvault nothing', seed.name);
    }
    // The known-bad case: qemu opens the decoy, vmvault names it.
    const bad = path.join(imgDir, 'known-bad.vmdk');
    await fs.writeFile(bad, '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 2048 FLAT "decoy.raw" 0\n');
    const q = await qemuReading(bad, 'vmdk', path.join(root, 'check.log'));
    assert.ok(q.sawImage);
    assert.deepEqual(q.others, [path.join(imgDir, 'decoy.raw')]);
    assert.deepEqual((await vmvaultReading(bad, 'vmdk')).refs, [{ kind: 'vmdk extent', name: 'decoy.raw' }]);
    // And a parser that named nothing would be caught.
    const blind = await qemuReading(path.join(imgDir, 'check-top.qcow2'), 'qcow2', path.join(root, 'check.log'));
    assert.deepEqual(blind.others, [path.join(imgDir, 'base.qcow2')]);
  });

  test(`mutants: qemu opens no file vmvault does not name (seed ${SEED}, ${ONLY === undefined ? ITERATIONS : `mutant ${ONLY}`})`, { timeout: 6 * 3600_000 }, async (t) => {
    const outcomes = new Map<string, number>();
    const bySeed = new Map<string, number>();
    const violations: string[] = [];
    const last = ONLY === undefined ? ITERATIONS : ONLY + 1;
    const started = Date.now();
    await eachMutant(ONLY ?? 0, last, 2, async (index, w) => {
      const self = `m${w}.img`;
      const m = mutant(index, self);
      bySeed.set(m.seed.name, (bySeed.get(m.seed.name) ?? 0) + 1);
      const r = await check(m.img, m.seed, path.join(imgDir, self), path.join(root, `m${w}.log`));
      outcomes.set(`${m.seed.format}: ${r.outcome}`, (outcomes.get(`${m.seed.format}: ${r.outcome}`) ?? 0) + 1);
      if (r.violation) {
        violations.push(`mutant ${index} (seed ${SEED}) of ${m.seed.name} as ${self}: ${m.steps.join('; ')}\n  ${r.violation}`);
        if (KEEP) await fs.writeFile(path.join(KEEP, `refs-mutant-${SEED}-${index}-${m.seed.name}`), m.img);
      }
      if (ONLY !== undefined) t.diagnostic(`mutant ${index} of ${m.seed.name}: ${m.steps.join('; ')} -> ${r.outcome}`);
    });
    t.diagnostic(`${last - (ONLY ?? 0)} mutants in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    t.diagnostic(`seeds: ${[...bySeed].sort().map(([k, n]) => `${k} ${n}`).join(', ')}`);
    t.diagnostic(`outcomes: ${[...outcomes].sort().map(([k, n]) => `${k} ${n}`).join(', ')}`);
    assert.deepEqual(violations, [], violations.slice(0, 20).join('\n'));
    if (ONLY === undefined) {
      // The fuzzing must reach both sides: mutants qemu follows elsewhere, and ones it reads alone.
      const count = (re: RegExp) => [...outcomes].filter(([k]) => re.test(k)).reduce((a, [, n]) => a + n, 0);
      assert.ok(count(/^vmdk: .*qemu touches others/) > ITERATIONS / 20, 'too few vmdk mutants made qemu open another file');
      assert.ok(count(/^qcow2: .*qemu touches others/) > ITERATIONS / 40, 'too few qcow2 mutants made qemu name another file');
      assert.ok(count(/qemu alone/) > ITERATIONS / 10, 'too few mutants qemu read alone');
    }
  });
});

/**
 * Whether a chunk is worth giving to zstd, from a sample of it: encrypted or already
 * compressed data (media, archives, encrypted file systems) fills many VM disks, and
 * zstd level 1 spends about as long failing to shrink 4 MiB of it as hashing and
 * sealing it together. Btrfs decides the same way before it compresses a range
 * (fs/btrfs/compression.c, the "heuristic"): look at samples, and skip data whose
 * bytes are spread evenly.
 *
 * A chunk is called incompressible only when both hold:
 * - the sampled bytes' Shannon entropy is above ENTROPY_SKIP bits per byte (zstd's
 *   entropy coding cannot gain more than half a percent there), and
 * - no two samples are equal: repeats are what zstd's matches would gain on (a block
 *   repeated anywhere in the chunk at a period that brings samples into phase).
 * Any mistake costs only stored bytes (the chunk is stored as it is, as zstd's output
 * is when it does not shrink), never correctness; the format is unchanged.
 */

/** Bytes per sample, and one sample every SAMPLE_EVERY bytes (1/32 of the chunk). */
const SAMPLE_BYTES = 16;
const SAMPLE_EVERY = 512;
/** Smaller inputs are always given to zstd: the sample would be too small to judge. */
const MIN_BYTES = 64 * 1024;
/**
 * Bits per byte. Random data samples at about 7.998; at 7.96 entropy coding could
 * save at most half a percent.
 */
const ENTROPY_SKIP = 7.96;

const counts = new Uint32Array(256);
let seen = new Int32Array(0);

/** True when zstd would almost surely not shrink `data` (see the module comment). */
export function looksIncompressible(data: Uint8Array): boolean {
  if (data.length < MIN_BYTES) return false;
  const samples = Math.floor(data.length / SAMPLE_EVERY);
  counts.fill(0);
  // An open-addressing table of sample offsets (+1), keyed by a hash of the sample's bytes.
  const size = 1 << Math.ceil(Math.log2(samples * 2));
  if (seen.length !== size) seen = new Int32Array(size);
  else seen.fill(0);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  for (let s = 0; s < samples; s++) {
    const at = s * SAMPLE_EVERY;
    for (let i = at; i < at + SAMPLE_BYTES; i++) counts[data[i]!]!++;
    const a = view.getUint32(at, true);
    const b = view.getUint32(at + 4, true);
    const c = view.getUint32(at + 8, true);
    const d = view.getUint32(at + 12, true);
    let h = Math.imul(a ^ Math.imul(b, 0x9e3779b1) ^ Math.imul(c, 0x85ebca77) ^ Math.imul(d, 0xc2b2ae3d), 0x27d4eb2f);
    h ^= h >>> 15;
    for (let slot = h & (size - 1); ; slot = (slot + 1) & (size - 1)) {
      const other = seen[slot]!;
      if (other === 0) {
        seen[slot] = at + 1;
        break;
      }
      if (sameSample(data, other - 1, at)) return false;
    }
  }
  const total = samples * SAMPLE_BYTES;
  let entropy = 0;
  for (const n of counts) {
    if (n === 0) continue;
    const p = n / total;
    entropy -= p * Math.log2(p);
  }
  return entropy > ENTROPY_SKIP;
}

function sameSample(data: Uint8Array, a: number, b: number): boolean {
  for (let i = 0; i < SAMPLE_BYTES; i++) if (data[a + i] !== data[b + i]) return false;
  return true;
}

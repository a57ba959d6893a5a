/**
 * Where a restored chunk holds data. A restore writes into a freshly created image,
 * which already reads as zeros everywhere: writing a chunk's zero runs would only
 * allocate space (a 4 MiB chunk with 64 KiB of data would come back as 4 MiB on disk).
 */

/**
 * The granularity at which zeros are skipped: qcow2's default cluster size, and a
 * multiple of every filesystem block size, so a skipped run is a whole unallocated
 * unit in either format.
 */
export const ZERO_RUN = 64 * 1024;

const ZEROS = Buffer.alloc(ZERO_RUN);

/**
 * The byte ranges [start, end) of `data` to write: `data` cut into `granularity`-sized
 * pieces (the last may be shorter), all-zero pieces dropped, adjacent pieces merged.
 * Empty when `data` is all zeros.
 */
export function dataRuns(data: Uint8Array, granularity = ZERO_RUN): { start: number; end: number }[] {
  if (!Number.isInteger(granularity) || granularity <= 0 || granularity > ZERO_RUN) {
    throw new RangeError(`granularity ${granularity} must be an integer in 1..${ZERO_RUN}`);
  }
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const out: { start: number; end: number }[] = [];
  for (let at = 0; at < buf.length; at += granularity) {
    const end = Math.min(at + granularity, buf.length);
    if (buf.subarray(at, end).equals(ZEROS.subarray(0, end - at))) continue;
    const last = out[out.length - 1];
    if (last && last.end === at) last.end = end;
    else out.push({ start: at, end });
  }
  return out;
}

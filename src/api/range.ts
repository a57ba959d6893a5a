/**
 * The HTTP Range header (RFC 9110 §14), single ranges only: `bytes=A-B`, `bytes=A-`
 * and `bytes=-N`. Several ranges are answered with the whole body (allowed: a server
 * may ignore Range), which no block-device client asks for anyway.
 */
export type RangeResult = { start: number; end: number } | 'unsatisfiable' | undefined;

export function parseRange(header: string | undefined, size: number): RangeResult {
  if (header === undefined) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') {
    const n = Number(m[2]);
    if (n === 0 || size === 0) return 'unsatisfiable';
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size) return 'unsatisfiable';
  if (end < start) return undefined;
  return { start, end };
}

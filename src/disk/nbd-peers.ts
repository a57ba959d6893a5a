/**
 * What the NBD server counts clients by, and how often it says it refused one.
 *
 * - Per-client limits count an IPv6 client by its /64: one host, or one site behind it,
 *   is normally given a whole /64 and can source connections from any of its 2^64
 *   addresses, so counting single addresses would let it open connections without
 *   bound. An IPv4-mapped IPv6 address (`::ffff:10.0.0.5`, what a dual-stack socket
 *   reports for an IPv4 client) counts as its IPv4 address.
 * - A flood of refused connections must not become a flood of log lines (the log's disk
 *   and whoever reads it are the next victims): LogBudget lets a few lines through per
 *   minute and then one summary of how many it left out.
 */
import { isIPv4, isIPv6 } from 'node:net';

/** The key per-client limits count `address` by (see above); undefined for none (a unix socket). */
export function peerKey(address: string | undefined): string | undefined {
  if (address === undefined || address === '') return undefined;
  if (isIPv4(address)) return address;
  const groups = ipv6Groups(address);
  if (!groups) return address;
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) {
    return `${groups[6]! >> 8}.${groups[6]! & 0xff}.${groups[7]! >> 8}.${groups[7]! & 0xff}`;
  }
  return `${groups.slice(0, 4).map((g) => g.toString(16)).join(':')}::/64`;
}

/** The eight 16-bit groups of an IPv6 address (a zone `%eth0` ignored), or undefined when it is not one. */
function ipv6Groups(address: string): number[] | undefined {
  const bare = address.split('%')[0]!;
  if (!isIPv6(bare)) return undefined;
  const parts = (half: string): number[] => {
    if (half === '') return [];
    const out: number[] = [];
    for (const p of half.split(':')) {
      if (p.includes('.')) {
        const [a, b, c, d] = p.split('.').map(Number) as [number, number, number, number];
        out.push((a << 8) | b, (c << 8) | d);
      } else out.push(parseInt(p, 16));
    }
    return out;
  };
  const [head, tail] = bare.split('::') as [string, string | undefined];
  const left = parts(head);
  const right = tail === undefined ? [] : parts(tail);
  const groups = [...left, ...new Array<number>(8 - left.length - right.length).fill(0), ...right];
  return groups.length === 8 ? groups : undefined;
}

/**
 * At most `lines` log lines per `windowMs` for one kind of event. `take()` says whether
 * to write this one; the lines it held back are told in one summary line at the end of
 * the window (`summary(count)`), by an unref'd timer that does not keep the process up.
 */
export class LogBudget {
  private windowEnds = 0;
  private used = 0;
  private held = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly summary: (held: number) => void,
    private readonly lines = 10,
    private readonly windowMs = 60_000,
  ) {}

  take(): boolean {
    const now = Date.now();
    if (now >= this.windowEnds) {
      this.flush();
      this.windowEnds = now + this.windowMs;
      this.used = 0;
    }
    if (this.used < this.lines) {
      this.used++;
      return true;
    }
    this.held++;
    this.timer ??= setTimeout(() => this.flush(), Math.max(0, this.windowEnds - now)).unref();
    return false;
  }

  /** Tells the lines held back so far, if any (also called when the server closes). */
  flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    const held = this.held;
    this.held = 0;
    if (held > 0) this.summary(held);
  }
}

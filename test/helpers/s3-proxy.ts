/**
 * An HTTP proxy in front of the S3 test server, to give tests what s3rver cannot:
 * credentials that may read but not write (PUT, POST and DELETE answered 403
 * AccessDenied, as S3 answers a key without s3:PutObject), and an endpoint that goes
 * down in the middle of an operation (the listening socket and every connection closed:
 * the client sees ECONNREFUSED from then on, as with a stopped server). It also
 * answers `503 SlowDown` when told to (as S3 does to a prefix that gets more requests
 * than it takes), and records every request: what was in flight when it arrived, its
 * answer, and the successful PUTs per key (to count uploads made twice).
 */
import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type ProxyMode = 'pass' | 'read-only';

/** One request as the proxy saw it. */
export interface ProxiedRequest {
  method: string;
  path: string;
  /** Requests in flight at the proxy when this one arrived, itself included. */
  inFlight: number;
  /** ms since the proxy started. */
  start: number;
  end?: number;
  status?: number;
}

/**
 * Decides, when a request arrives, whether to refuse it with 503 SlowDown: `putsServing`
 * counts the PUTs accepted and not yet answered, so `putsServing >= N` lets N uploads
 * through at a time (a bucket with that capacity).
 */
export type ThrottlePolicy = (req: { method: string; path: string; putsServing: number }) => boolean;

export interface S3Proxy {
  endpoint: string;
  /** `url` (a repository URL on the S3 test server) through this proxy. */
  via(url: string): string;
  mode: ProxyMode;
  /** Called for each request before it is answered: e.g. to go down at the first chunk upload. */
  onRequest?: (method: string, path: string) => void;
  /** When set, requests it accepts are answered 503 SlowDown instead of being forwarded. */
  throttle?: ThrottlePolicy;
  /** Wait this long before forwarding or refusing a PUT (a slow link: uploads overlap as they would on one). */
  putDelayMs?: number;
  /** When set, how long to hold back each request before forwarding it, instead of putDelayMs (e.g. only chunk uploads). */
  delayFor?: (method: string, path: string) => number;
  /** When the proxy started (ms since the epoch): `start` and `end` of `log` count from it. */
  startedAt: number;
  /** Every request so far, in order of arrival. */
  log: ProxiedRequest[];
  /** Successful (2xx) PUTs per object key (path without bucket and query), e.g. to find uploads made twice. */
  puts: Map<string, number>;
  /** Stops listening and cuts every connection. */
  down(): Promise<void>;
}

const SLOW_DOWN = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>';
const DENIED = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>';

export async function startS3Proxy(targetEndpoint: string, mode: ProxyMode = 'pass'): Promise<S3Proxy> {
  const target = new URL(targetEndpoint);
  const sockets = new Set<Socket>();
  const forward = (req: IncomingMessage, res: ServerResponse) => {
    const up = request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  };
  const t0 = Date.now();
  let inFlight = 0;
  /** PUTs accepted (not refused) and not yet answered. */
  let putsServing = 0;
  const server = createServer((req, res) => {
    proxy.onRequest?.(req.method ?? '', req.url ?? '');
    if (!server.listening) {
      req.socket.destroy();
      return;
    }
    const method = req.method ?? '';
    const path = req.url ?? '';
    const entry: ProxiedRequest = { method, path, inFlight: ++inFlight, start: Date.now() - t0 };
    proxy.log.push(entry);
    const refuse = proxy.throttle?.({ method, path, putsServing }) ?? false;
    const serving = method === 'PUT' && !refuse;
    if (serving) putsServing++;
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      inFlight--;
      if (serving) putsServing--;
      entry.end = Date.now() - t0;
      // Closed before any answer (the client gave up): no status, and no PUT stored.
      entry.status = res.headersSent ? res.statusCode : undefined;
      if (method === 'PUT' && res.headersSent && res.statusCode >= 200 && res.statusCode < 300) {
        const key = objectKey(path);
        proxy.puts.set(key, (proxy.puts.get(key) ?? 0) + 1);
      }
    };
    res.on('finish', finish);
    res.on('close', finish);
    const proceed = () => {
      if (refuse) {
        req.resume();
        res.writeHead(503, { 'Content-Type': 'application/xml', 'Content-Length': Buffer.byteLength(SLOW_DOWN) });
        res.end(SLOW_DOWN);
        return;
      }
      if (proxy.mode === 'read-only' && ['PUT', 'POST', 'DELETE'].includes(method)) {
        req.resume();
        res.writeHead(403, { 'Content-Type': 'application/xml', 'Content-Length': Buffer.byteLength(DENIED) });
        res.end(DENIED);
        return;
      }
      forward(req, res);
    };
    const delay = proxy.delayFor?.(method, path) ?? (method === 'PUT' ? proxy.putDelayMs ?? 0 : 0);
    if (delay > 0) {
      const timer = setTimeout(proceed, delay);
      res.on('close', () => clearTimeout(timer)); // the client gave up: nothing to forward
    } else proceed();
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  server.unref();
  const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const proxy: S3Proxy = {
    endpoint,
    via: (url) => url.replace(`endpoint=${targetEndpoint}`, `endpoint=${endpoint}`),
    mode,
    startedAt: t0,
    log: [],
    puts: new Map(),
    down: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of sockets) s.destroy();
      await closed;
    },
  };
  return proxy;
}

/** `/bucket/a/b?x=1` → `a/b` (path-style requests, as the tests make them). */
export function objectKey(path: string): string {
  const p = decodeURIComponent(path.split('?')[0] ?? '');
  return p.replace(/^\/[^/]*\/?/, '');
}

/**
 * The largest number of requests in flight at once, per `method` (or all), over the
 * requests that started in [from, to) ms: from the recorded start and end times.
 */
export function peakConcurrency(log: ProxiedRequest[], opts: { method?: string; from?: number; to?: number } = {}): number {
  const events: Array<[number, number]> = [];
  for (const r of log) {
    if (opts.method && r.method !== opts.method) continue;
    if (r.start < (opts.from ?? -Infinity) || r.start >= (opts.to ?? Infinity)) continue;
    events.push([r.start, 1], [r.end ?? Infinity, -1]);
  }
  // Ends before starts at the same millisecond: a request that ended is not in flight.
  events.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let now = 0;
  let peak = 0;
  for (const [, d] of events) peak = Math.max(peak, (now += d));
  return peak;
}

/**
 * An HTTP proxy in front of the S3 test server, to give tests what s3rver cannot:
 * credentials that may read but not write (PUT, POST and DELETE answered 403
 * AccessDenied, as S3 answers a key without s3:PutObject), and an endpoint that goes
 * down in the middle of an operation (the listening socket and every connection closed:
 * the client sees ECONNREFUSED from then on, as with a stopped server).
 */
import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type ProxyMode = 'pass' | 'read-only';

export interface S3Proxy {
  endpoint: string;
  /** `url` (a repository URL on the S3 test server) through this proxy. */
  via(url: string): string;
  mode: ProxyMode;
  /** Called for each request before it is answered: e.g. to go down at the first chunk upload. */
  onRequest?: (method: string, path: string) => void;
  /** Stops listening and cuts every connection. */
  down(): Promise<void>;
}

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
  const server = createServer((req, res) => {
    proxy.onRequest?.(req.method ?? '', req.url ?? '');
    if (!server.listening) {
      req.socket.destroy();
      return;
    }
    if (proxy.mode === 'read-only' && ['PUT', 'POST', 'DELETE'].includes(req.method ?? '')) {
      req.resume();
      res.writeHead(403, { 'Content-Type': 'application/xml', 'Content-Length': Buffer.byteLength(DENIED) });
      res.end(DENIED);
      return;
    }
    forward(req, res);
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
    down: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of sockets) s.destroy();
      await closed;
    },
  };
  return proxy;
}

/**
 * TCP ports for servers a test starts itself on a port it must name up front (a
 * redis-server, a Sentinel's replicas, qemu-nbd, `vmvault up --redis-listen`).
 *
 * A port from `listen(0)` comes from the kernel's ephemeral range, which every
 * outgoing connection and every other `listen(0)` of the parallel test files also draws
 * from: released and used a moment later, it can be taken in between, and a server that
 * then fails to bind (or a ping that reaches someone else's server) breaks a test for
 * no reason of its own. So these ports are drawn at random from 20000 up to the start
 * of the ephemeral range (32768 by default; 20000–32767 where the range starts lower, in
 * part inside it then), and checked free by binding them once. Callers that can should
 * still check that the server answering is theirs (see redis-sentinel.ts).
 */
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:net';

const FLOOR = 20_000;

async function ephemeralFloor(): Promise<number> {
  const range = await readFile('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').catch(() => '32768 60999');
  const low = Number(range.trim().split(/\s+/)[0]);
  return Number.isInteger(low) && low > FLOOR + 1000 ? low : 32_768;
}

function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/** A port on 127.0.0.1 that is free now, below the kernel's ephemeral range where it leaves room. */
export async function freePort(): Promise<number> {
  const top = await ephemeralFloor();
  for (let i = 0; i < 200; i++) {
    const port = FLOOR + Math.floor(Math.random() * (top - FLOOR));
    if (await bindable(port)) return port;
  }
  throw new Error(`no free TCP port on 127.0.0.1 between ${FLOOR} and ${top}`);
}

/**
 * Service processes for tests: `vmvault serve|worker|up` started through the real
 * CLI, their output collected for diagnostics, conditions polled with deadlines.
 */
import { spawnCli } from './cli.js';

export type Proc = ReturnType<typeof spawnCli> & { output(): string };

export const BASE_ENV = { PATH: process.env.PATH, HOME: process.env.HOME, VMVAULT_LOG_LEVEL: 'info' };

export function start(args: string[], env: Record<string, string | undefined> = {}): Proc {
  const p = spawnCli(args, { ...BASE_ENV, ...env }) as Proc;
  let out = '';
  p.stdout?.on('data', (d: Buffer) => { out += d.toString(); });
  p.stderr?.on('data', (d: Buffer) => { out += d.toString(); });
  p.output = () => out;
  return p;
}

export async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 20_000, diag?: () => string, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${diag ? `\n${diag()}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export async function stopProc(p: Proc, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | undefined> {
  if (p.exitCode === null && p.signalCode === null) p.kill(signal);
  const r = await p;
  return r.exitCode;
}

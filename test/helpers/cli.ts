/**
 * Runs the real `vmvault` command (bin/vmvault.js on the compiled tree) as a
 * child process, as an operator would.
 */
import { execa, type ResultPromise } from 'execa';
import { fileURLToPath } from 'node:url';

export const BIN = fileURLToPath(new URL('../../../bin/vmvault.js', import.meta.url));

export interface CliResult { code: number; stdout: string; stderr: string }

export type Env = Record<string, string | undefined>;

export function spawnCli(args: string[], env: Env = {}): ResultPromise<{ reject: false; env: Env; stdin: 'ignore' }> {
  return execa(process.execPath, [BIN, ...args], { reject: false, env: { ...env }, stdin: 'ignore' });
}

export async function cli(args: string[], env: Env = {}): Promise<CliResult> {
  const r = await spawnCli(args, env);
  return { code: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr) };
}

/** Runs and parses --json output; fails with the command's stderr when it exits non-zero. */
export async function cliJson<T = any>(args: string[], env: Env = {}): Promise<T> {
  const r = await cli([...args, '--json'], env);
  if (r.code !== 0) throw new Error(`vmvault ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

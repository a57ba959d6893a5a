#!/usr/bin/env node
// Entry point: runs the built CLI (npm run build produces dist/).
import { statSync } from 'node:fs';
import { availableParallelism } from 'node:os';

// The AWS SDK warns on every start under Node 20; the warning is for SDK maintainers, not operators.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const mtime = (url) => statSync(url, { throwIfNoEntry: false })?.mtimeMs;
// dist/cli/ is the CLI linked into a few files (scripts/bundle.mjs), which starts faster;
// dist/src/ is tsc's output, used when the bundle is missing or older than it.
const compiled = new URL('../dist/src/cli/main.js', import.meta.url);
const bundled = new URL('../dist/cli/main.js', import.meta.url);
const compiledAt = mtime(compiled);
const bundledAt = mtime(bundled);
if (compiledAt === undefined && bundledAt === undefined) {
  process.stderr.write('vmvault: not built yet: run "npm ci && npm run build" in the vmvault directory\n');
  process.exit(1);
}
const entry = bundledAt !== undefined && (compiledAt === undefined || bundledAt >= compiledAt) ? bundled : compiled;
// A command that will open or seal chunks starts its chunk threads now, on the other cores,
// while this thread loads the CLI: they would otherwise take about 0.1 s to start after it
// (src/pipeline/prestart.ts). restore and verify --read-data always need them; a backup of a qcow2
// image starts them anyway before it knows what changed, but an unchanged raw image needs
// none (and would pay their start), so backups only when told qcow2. A wrong guess (an
// option's value taken for the command) costs only threads that are never used.
const args = process.argv.slice(2);
const command = args.find((a) => !a.startsWith('-'));
if (command === 'restore' || (command === 'verify' && args.some((a) => a.startsWith('--read-data'))) || (command === 'backup' && args.some((a) => /(^|=)qcow2$/.test(a)))) {
  const at = new URL(entry === bundled ? '../dist/cli/prestart.js' : '../dist/src/pipeline/prestart.js', import.meta.url);
  try {
    (await import(at.href)).prestartChunkThreads(availableParallelism());
  } catch {
    // Only a head start: the pool starts its own threads, and says why if it cannot.
  }
}
const { main } = await import(entry.href);
const code = await main(process.argv);
process.exitCode = code;
// Keep-alive sockets (S3) must not hold the process open once the command is done.
setTimeout(() => process.exit(code), 0).unref();

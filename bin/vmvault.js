#!/usr/bin/env node
// Entry point: runs the built CLI (npm run build produces dist/).
import { statSync } from 'node:fs';

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
const { main } = await import(entry.href);
const code = await main(process.argv);
process.exitCode = code;
// Keep-alive sockets (S3) must not hold the process open once the command is done.
setTimeout(() => process.exit(code), 0).unref();

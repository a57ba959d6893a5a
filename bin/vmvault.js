#!/usr/bin/env node
// Entry point: runs the compiled CLI (npm run build produces dist/).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

// The AWS SDK warns on every start under Node 20; the warning is for SDK maintainers, not operators.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const entry = new URL('../dist/src/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  process.stderr.write('vmvault: not built yet: run "npm ci && npm run build" in the vmvault directory\n');
  process.exit(1);
}
const { main } = await import(entry.href);
const code = await main(process.argv);
process.exitCode = code;
// Keep-alive sockets (S3) must not hold the process open once the command is done.
setTimeout(() => process.exit(code), 0).unref();

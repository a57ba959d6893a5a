#!/usr/bin/env node
// Entry point: runs the built CLI (npm run build produces dist/).
import { createHash } from 'node:crypto';
import { readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';

// The AWS SDK warns on every start under Node 20; the warning is for SDK maintainers, not operators.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

const mtime = (url) => statSync(url, { throwIfNoEntry: false })?.mtimeMs;
// dist/cli/main.cjs is the CLI linked into one file (scripts/bundle.mjs), which starts faster;
// dist/src/ is tsc's output, used when the bundle is missing or older than it.
const compiled = new URL('../dist/src/cli/main.js', import.meta.url);
const bundled = new URL('../dist/cli/main.cjs', import.meta.url);
const compiledAt = mtime(compiled);
const bundledAt = mtime(bundled);
if (compiledAt === undefined && bundledAt === undefined) {
  process.stderr.write('vmvault: not built yet: run "npm ci && npm run build" in the vmvault directory\n');
  process.exit(1);
}
const useBundle = bundledAt !== undefined && (compiledAt === undefined || bundledAt >= compiledAt);
// A command that will open or seal chunks starts its chunk threads now, on the other cores,
// while this thread loads the CLI: they would otherwise take about 0.1 s to start after it
// (src/pipeline/prestart.ts). restore and verify --read-data always need them; a backup of a qcow2
// image starts them anyway before it knows what changed, but an unchanged raw image needs
// none (and would pay their start), so backups only when told qcow2. A wrong guess (an
// option's value taken for the command) costs only threads that are never used.
const args = process.argv.slice(2);
const command = args.find((a) => !a.startsWith('-'));
if (command === 'restore' || (command === 'verify' && args.some((a) => a.startsWith('--read-data'))) || (command === 'backup' && args.some((a) => /(^|=)qcow2$/.test(a)))) {
  const at = new URL(useBundle ? '../dist/cli/prestart.js' : '../dist/src/pipeline/prestart.js', import.meta.url);
  try {
    (await import(at.href)).prestartChunkThreads(availableParallelism());
  } catch {
    // Only a head start: the pool starts its own threads, and says why if it cannot.
  }
}
const { main } = useBundle ? loadBundle(fileURLToPath(bundled)) : await import(compiled.href);
const code = await main(process.argv);
process.exitCode = code;
// Keep-alive sockets (S3) must not hold the process open once the command is done.
setTimeout(() => process.exit(code), 0).unref();

/**
 * Runs the CommonJS bundle as require() would, but compiled with the V8 code cache
 * beside it (`<file>.cache`, made by scripts/bundle.mjs), which spares compiling it
 * again at every start. The cache starts with the SHA-256 of the source it was made
 * from and of itself, and is used for that source only and whole (V8's own checks compare
 * the source's length, not its bytes, and a release build does not checksum the cache);
 * one V8 refuses (another Node.js version, other V8 flags) is only not used. With
 * VMVAULT_WRITE_CODE_CACHE=1 (the build), the cache is written as the process exits,
 * with the code the command compiled. The bundle has no import() (the build checks):
 * a vm.Script has none without an experimental option.
 */
function loadBundle(file) {
  const bytes = readFileSync(file);
  const digestOf = (payload) => createHash('sha256').update(bytes).update(payload).digest();
  const cacheFile = `${file}.cache`;
  const writeCache = process.env.VMVAULT_WRITE_CODE_CACHE === '1';
  let cachedData;
  if (!writeCache) {
    try {
      const cache = readFileSync(cacheFile);
      if (digestOf(cache.subarray(32)).equals(cache.subarray(0, 32))) cachedData = cache.subarray(32);
    } catch {
      // No cache: compiled from its source, as require() would.
    }
  }
  // The wrapper require() puts around a CommonJS file, on the first line: line numbers stay the file's.
  const source = `(function (exports, require, module, __filename, __dirname) { ${bytes.toString('utf8')}\n})`;
  const script = new vm.Script(source, { filename: file, cachedData });
  const module = { exports: {} };
  script.runInThisContext().call(module.exports, module.exports, createRequire(file), module, file, dirname(file));
  if (writeCache) {
    // A write that fails is reported on stderr; the build, which asked for it, checks the file is there.
    process.once('exit', () => {
      const payload = script.createCachedData();
      writeFileSync(`${cacheFile}.tmp`, Buffer.concat([digestOf(payload), payload]));
      renameSync(`${cacheFile}.tmp`, cacheFile);
    });
  }
  return module.exports;
}

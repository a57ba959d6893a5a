#!/usr/bin/env node
/**
 * Links tsc's output of the CLI (dist/src/cli/main.js) and the worker threads it starts
 * into a few files under dist/cli/, which bin/vmvault.js runs. Node's loader spends
 * about 1 ms per module file: the CLI's own 105 modules, execa's 106 and zod's 95 cost
 * 0.15 s before every command, which is a third of an unchanged backup's time.
 *
 * - The CLI is one CommonJS file, `main.cjs`, with a V8 code cache beside it
 *   (`main.cjs.cache`, made here by running `vmvault --version` once): bin/vmvault.js
 *   compiles it with that cache, which Node 20 offers to vm.Script only, not to ES
 *   modules. Compiling the 1.4 MB file took about 80 ms of every command's start; with
 *   the cache, a command starts about 40 ms sooner. import.meta.url is the bundle's own
 *   URL (in dist/cli/, beside the files below, which is where every module that uses it
 *   looks).
 * - The worker threads (`chunk-worker`, `kdf-worker`) and the launcher's `prestart` are
 *   ES modules, with code splitting.
 *
 * Only vmvault's code and three small packages are linked in. Every other package stays
 * an import of node_modules: native code (zstd-napi), WebAssembly (libsodium), packages
 * that start threads from their own files (pino), and the service's packages (every one
 * of them loads with require(), which the CLI uses for them). Input is tsc's output, so
 * the bundle runs exactly the type-checked code.
 *
 * Run by `npm run build` and `npm test` after tsc. bin/vmvault.js falls back to
 * dist/src/cli/main.js when dist/cli/ is missing or older than it.
 */
import { build } from 'esbuild';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const LINKED = new Set(['execa', 'zod', 'commander']);
const packageOf = (spec) => spec.split('/').slice(0, spec.startsWith('@') ? 2 : 1).join('/');

const externals = {
  name: 'vmvault-externals',
  setup(b) {
    b.onResolve({ filter: /^[^./]/ }, (args) => {
      if (args.path.startsWith('node:')) return { external: true };
      // What a linked package imports is linked too; vmvault's own imports of other packages are not.
      if (args.importer.includes('/node_modules/')) return undefined;
      return LINKED.has(packageOf(args.path)) ? undefined : { external: true };
    });
  },
};

// zod exports its 60-odd message locales as a namespace, which a bundle cannot leave out:
// they were 368 KB of the 825 KB chunk every command parses at start. vmvault uses
// English only (zod's default, which zod/v4/classic/schemas.js imports by itself), so
// that namespace is English alone here.
const zodLocales = {
  name: 'vmvault-zod-locales',
  setup(b) {
    b.onResolve({ filter: /^\.\.\/locales\/index\.js$/ }, (args) =>
      /[/\\]node_modules[/\\]zod[/\\]v4[/\\](core|classic)$/.test(args.resolveDir) ? { path: 'en-only', namespace: 'zod-locales', pluginData: args.resolveDir } : undefined);
    b.onLoad({ filter: /.*/, namespace: 'zod-locales' }, (args) => ({
      contents: `export { default as en } from ${JSON.stringify(path.join(args.pluginData, '..', 'locales', 'en.js'))};`,
      resolveDir: args.pluginData,
    }));
  },
};

await rm(`${root}/dist/cli`, { recursive: true, force: true });
const common = { absWorkingDir: root, bundle: true, platform: 'node', target: 'node20', outdir: 'dist/cli', logLevel: 'warning' };
// The threads' code and the launcher's prestart: ES modules.
await build({
  ...common,
  entryPoints: {
    // Started with new Worker(new URL('./<name>.js', import.meta.url)): they must sit beside the chunks.
    'chunk-worker': 'dist/src/pipeline/chunk-worker.js',
    'kdf-worker': 'dist/src/crypto/kdf-worker.js',
    // Loaded by bin/vmvault.js before the CLI: chunk threads started while the CLI loads.
    prestart: 'dist/src/pipeline/prestart.js',
  },
  splitting: true,
  format: 'esm',
  plugins: [externals, zodLocales],
  // commander is CommonJS: its require() calls need a require in an ES module.
  banner: { js: "import { createRequire as __vmvaultCreateRequire } from 'node:module'; const require = __vmvaultCreateRequire(import.meta.url);" },
});
// The CLI: one CommonJS file.
await build({
  ...common,
  entryPoints: { main: 'dist/src/cli/main.js' },
  outExtension: { '.js': '.cjs' },
  format: 'cjs',
  plugins: [externals, zodLocales],
  define: { 'import.meta.url': '__vmvaultImportMetaUrl' },
  // An import() becomes a require() (the launcher's vm.Script has no import of its own).
  supported: { 'dynamic-import': false },
  // Strict, as the ES modules it is made of: the directive must come before any statement.
  banner: { js: "'use strict'; var __vmvaultImportMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
});
// bin/vmvault.js compiles it with vm.Script, which has no import() of its own without an
// experimental option: esbuild was told to turn each into a require(), and none may remain.
// A bundle that fails a check is removed, so that the launcher falls back to tsc's output.
const bundle = `${root}/dist/cli/main.cjs`;
try {
  // Only ASCII: esbuild escapes what is not in strings, but comments it keeps may hold a
  // dash or an ellipsis, and one such character makes V8 hold the whole 1.5 MB source as a
  // two-byte string, decoded and scanned at every start (about 25 ms here). Escaped, they
  // read the same wherever they are (a comment, a string, a regular expression).
  const cli = (await readFile(bundle, 'utf8')).replace(/[^\x00-\x7f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  await writeFile(bundle, cli);
  const dynamicImport = /\bimport\(/.exec(cli);
  if (dynamicImport) {
    const line = cli.slice(0, dynamicImport.index).split('\n').length;
    throw new Error(`bundle: dist/cli/main.cjs line ${line} has an import() the launcher cannot run: load that module with require() (src/lazy-require.ts) or link it in`);
  }
  // Its code cache, made by the launcher from one run (the code every command runs at start).
  const made = spawnSync(process.execPath, [path.join(root, 'bin', 'vmvault.js'), '--version'], {
    env: { ...process.env, VMVAULT_WRITE_CODE_CACHE: '1' }, stdio: ['ignore', 'ignore', 'inherit'],
  });
  if (made.status !== 0 || !existsSync(`${bundle}.cache`)) {
    throw new Error(`bundle: running the bundled CLI to make its code cache failed (exit ${made.status ?? made.signal})`);
  }
} catch (err) {
  await rm(bundle, { force: true });
  await rm(`${bundle}.cache`, { force: true });
  throw err;
}

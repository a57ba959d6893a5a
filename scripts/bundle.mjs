#!/usr/bin/env node
/**
 * Links tsc's output of the CLI (dist/src/cli/main.js) and the worker threads it starts
 * into a few ES modules under dist/cli/, which bin/vmvault.js runs. Node's loader spends
 * about 1 ms per module file: the CLI's own 105 modules, execa's 106 and zod's 95 cost
 * 0.15 s before every command, which is a third of an unchanged backup's time.
 *
 * Only vmvault's code and three small packages are linked in. Every other package stays
 * an import of node_modules: native code (zstd-napi), WebAssembly (libsodium), packages
 * that start threads from their own files (pino), and the service's packages, which the
 * CLI loads only for `up`, `serve` and `worker` (code splitting keeps them out of the
 * other commands). Input is tsc's output, so the bundle runs exactly the type-checked code.
 *
 * Run by `npm run build` and `npm test` after tsc. bin/vmvault.js falls back to
 * dist/src/cli/main.js when dist/cli/ is missing or older than it.
 */
import { build } from 'esbuild';
import { rm } from 'node:fs/promises';
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
await build({
  absWorkingDir: root,
  entryPoints: {
    main: 'dist/src/cli/main.js',
    // Started with new Worker(new URL('./<name>.js', import.meta.url)): they must sit beside the chunks.
    'chunk-worker': 'dist/src/pipeline/chunk-worker.js',
    'kdf-worker': 'dist/src/crypto/kdf-worker.js',
    // Loaded by bin/vmvault.js before main: chunk threads started while main loads.
    prestart: 'dist/src/pipeline/prestart.js',
  },
  outdir: 'dist/cli',
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  plugins: [externals, zodLocales],
  // commander is CommonJS: its require() calls need a require in an ES module.
  banner: { js: "import { createRequire as __vmvaultCreateRequire } from 'node:module'; const require = __vmvaultCreateRequire(import.meta.url);" },
  logLevel: 'warning',
});

/**
 * The web dashboard at `/`: one static page, its stylesheet, and its script (plain
 * ES modules compiled by the project's tsc from ../ui/ into dist/src/api/ui/, loaded
 * as they are, with hono/client's own ES modules mapped by an import map). Nothing
 * here needs a token: the page holds no data; its script signs in with a bearer token
 * kept in the tab's sessionStorage and calls the API with it, as any other client does.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Context } from 'hono';
import { NotFoundError } from '../../errors.js';
import { builtDir, packageAbove } from '../../package-files.js';
import { DASHBOARD_CSS, dashboardHtml } from '../ui/page.js';
import type { ApiApp, Env } from './common.js';

/** The dashboard's compiled modules (dist/src/api/ui/*.js), by file name. */
const CLIENT_MODULES = ['main.js', 'api.js', 'actions.js', 'browser.js', 'dom.js', 'format.js', 'state.js', 'views.js'];

/** hono/client's modules and what they import, as they are in node_modules/hono/dist. */
const HONO_MODULES = ['client/index.js', 'client/client.js', 'client/utils.js', 'client/fetch-result-please.js', 'utils/cookie.js', 'utils/url.js'];

const IMPORT_MAP = JSON.stringify({ imports: { 'hono/client': '/ui/vendor/hono/client/index.js' } });

/**
 * node_modules/hono/dist/, where hono's ES modules are: found from the package's root,
 * which the CommonJS resolution of `hono` leads to as well (the CLI runs as one
 * CommonJS bundle, where import.meta.resolve does not exist, and require.resolve
 * would name hono's CommonJS files, which a browser cannot load).
 */
function honoDist(): URL {
  const hono = packageAbove(path.dirname(createRequire(import.meta.url).resolve('hono')), (pkg) => pkg.name === 'hono');
  if (!hono) throw new Error('the hono package was not found above its own files: reinstall vmvault (npm ci)');
  return pathToFileURL(path.join(hono.root, 'dist/'));
}

/** Paths the dashboard serves without a token (GET and HEAD). */
export function isDashboardPath(path: string): boolean {
  return path === '/' || /^\/ui\/[a-z0-9./-]+$/.test(path);
}

export function registerDashboard(app: ApiApp): void {
  const uiDir = builtDir('src/api/ui');
  const honoDir = honoDist();
  const files = new Map<string, { url: URL; type: string }>([
    ...CLIENT_MODULES.map((f) => [`/ui/${f}`, { url: new URL(f, uiDir), type: 'text/javascript' }] as const),
    ...HONO_MODULES.map((f) => [`/ui/vendor/hono/${f}`, { url: new URL(f, honoDir), type: 'text/javascript' }] as const),
  ]);
  const cache = new Map<string, Promise<Buffer>>();
  const importMapHash = createHash('sha256').update(IMPORT_MAP).digest('base64');
  const html = dashboardHtml(IMPORT_MAP);
  // Only this origin's scripts, styles and API; the import map is allowed by its hash.
  const csp = `default-src 'none'; script-src 'self' 'sha256-${importMapHash}'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`;
  const secure = (c: Context<Env>) => {
    c.header('Content-Security-Policy', csp);
    c.header('X-Content-Type-Options', 'nosniff');
    c.header('Referrer-Policy', 'no-referrer');
    c.header('Cache-Control', 'no-cache');
  };
  app.get('/', (c) => { secure(c); return c.html(html); });
  app.get('/ui/dashboard.css', (c) => { secure(c); return c.body(DASHBOARD_CSS, 200, { 'Content-Type': 'text/css; charset=utf-8' }); });
  app.get('/ui/*', async (c) => {
    const file = files.get(c.req.path);
    if (!file) throw new NotFoundError(`no dashboard file ${c.req.path}`);
    let data = cache.get(c.req.path);
    if (!data) {
      data = readFile(fileURLToPath(file.url));
      data.catch(() => cache.delete(c.req.path));
      cache.set(c.req.path, data);
    }
    secure(c);
    return c.body(new Uint8Array(await data), 200, { 'Content-Type': `${file.type}; charset=utf-8` });
  });
}

/**
 * The dashboard's files in-process: served without a token, with a Content-Security-
 * Policy that admits only this origin and the page's import map, and every module the
 * page imports (its own and hono/client's, followed from main.js) served as JavaScript.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { hc } from 'hono/client';
import type { PoliciesApp } from '../../../src/api/routes/policies.js';
import type { VmsApp } from '../../../src/api/routes/vms.js';
import { assertError, startFixture, TOKENS, type Fixture } from './fixture.js';

let f: Fixture;
before(async () => { f = await startFixture(); });
after(async () => { await f?.close(); });

const get = (path: string, init: RequestInit = {}) => f.api.app.request(path, init);

describe('the dashboard\'s files', () => {
  test('/ is the page, without a token, under a CSP that allows its import map by hash', async () => {
    const r = await get('/');
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type') ?? '', /^text\/html/);
    const html = await r.text();
    assert.match(html, /<form id="sign-in"/);
    const importMap = /<script type="importmap">(.*?)<\/script>/s.exec(html)?.[1];
    assert.ok(importMap);
    const csp = r.headers.get('content-security-policy') ?? '';
    assert.match(csp, /default-src 'none'/);
    assert.ok(csp.includes(`'sha256-${createHash('sha256').update(importMap).digest('base64')}'`), csp);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff');
  });

  test('every module the page loads is served, following the imports from main.js through the import map', async () => {
    const html = await (await get('/')).text();
    const map = JSON.parse(/<script type="importmap">(.*?)<\/script>/s.exec(html)![1]!) as { imports: Record<string, string> };
    const seen = new Map<string, number>();
    const queue = ['/ui/main.js'];
    while (queue.length) {
      const path = queue.shift()!;
      if (seen.has(path)) continue;
      const r = await get(path);
      assert.equal(r.status, 200, path);
      assert.match(r.headers.get('content-type') ?? '', /^text\/javascript/, path);
      const js = await r.text();
      seen.set(path, js.length);
      for (const m of js.matchAll(/^(?:import|export)\s[^'"]*?from\s*["']([^"']+)["'];?$/gm)) {
        const spec = m[1]!;
        queue.push(map.imports[spec] ?? new URL(spec, `http://x${path}`).pathname);
      }
    }
    assert.ok(seen.has('/ui/vendor/hono/client/index.js') && seen.has('/ui/vendor/hono/utils/url.js'), [...seen.keys()].join(' '));
    assert.ok(seen.size >= 14, [...seen.keys()].join(' '));
    const css = await get('/ui/dashboard.css');
    assert.deepEqual([css.status, css.headers.get('content-type')], [200, 'text/css; charset=utf-8']);
  });

  test('anything else under /ui/ is 404; the dashboard\'s paths are open to GET only', async () => {
    const nope = await get('/ui/vendor/hono/hono.js');
    assert.equal(nope.status, 404);
    assertError({ status: nope.status, body: await nope.json() }, 404, 'NOT_FOUND', /no dashboard file/);
    assertError(await f.call('POST', '/', { body: {} }), 401, 'UNAUTHORIZED');
    assertError(await f.call('GET', '/ui/../v1/vms'), 401, 'UNAUTHORIZED');
  });
});

describe('the typed client the dashboard uses (hono/client), in-process', () => {
  const options = () => ({ headers: { authorization: `Bearer ${TOKENS.viewer}` }, fetch: (input: Request | URL | string, init?: RequestInit) => f.api.app.request(input instanceof Request ? input : String(input), init) });

  test('typed calls reach the routes and carry the token', async () => {
    const vms = hc<VmsApp>('http://localhost', options()).v1.vms;
    const list = await vms.$get({ query: { limit: '2' } });
    assert.equal(list.status, 200);
    if (list.status === 200) assert.deepEqual((await list.json()).items.map((v) => v.name), ['web', 'db']);
    const unknown = await vms[':vm'].$get({ param: { vm: 'nope' } });
    assert.equal(unknown.status, 404);
    const preview = await hc<PoliciesApp>('http://localhost', options()).v1.policies[':name'].preview.$get({ param: { name: 'none' }, query: {} });
    assert.equal(preview.status, 404);
  });
});

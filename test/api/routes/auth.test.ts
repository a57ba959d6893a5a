/**
 * Every route in-process: without a token 401, with an unknown one 401, with a role
 * too low 403 (the role each needs is the one its OpenAPI description states); the
 * open routes, unknown routes, malformed paths, oversized bodies and health.
 */
import assert from 'node:assert/strict';
import { pino } from 'pino';
import { after, before, describe, test } from 'node:test';
import { API_ROUTES, createApi, MAX_BODY_BYTES } from '../../../src/api/app.js';
import { parseConfig } from '../../../src/config/load.js';
import { createRedis } from '../../../src/queue/connection.js';
import { Repository } from '../../../src/repo/repository.js';
import { LocalStorage } from '../../../src/storage/local.js';
import { assertError, startFixture, type Fixture, type Role } from './fixture.js';

let f: Fixture;
before(async () => { f = await startFixture(); });
after(async () => { await f?.close(); });

const EXAMPLE: Record<string, string> = { vm: 'web', id: 'abcd', disk: 'root', name: 'snap1', token: 'x.y' };
const concrete = (path: string) => path.replace(/\{(\w+)\}/g, (_, p: string) => EXAMPLE[p]!);
const BELOW: Record<Role, Role | undefined> = { viewer: undefined, operator: 'viewer', admin: 'operator' };

describe('authentication and roles, route by route', () => {
  test('the OpenAPI document states a role for every route but health and links, and lists every route', async () => {
    const doc = (await f.call('GET', '/v1/openapi.json', { role: 'viewer' })).body;
    const listed = Object.entries(doc.paths as Record<string, Record<string, unknown>>).flatMap(([p, ops]) => Object.keys(ops).map((m) => `${m} ${p}`)).sort();
    assert.deepEqual(listed, API_ROUTES.filter((r) => r.path !== '/v1/openapi.json').map((r) => `${r.method} ${r.path}`).sort());
  });

  test('no token: 401 with WWW-Authenticate; unknown token: 401 that says so; a role too low: 403 naming both roles', async () => {
    const doc = (await f.call('GET', '/v1/openapi.json', { role: 'viewer' })).body;
    let checked = 0;
    for (const [path, ops] of Object.entries(doc.paths as Record<string, Record<string, { description: string }>>)) {
      for (const [method, op] of Object.entries(ops)) {
        const role = /Role: (viewer|operator|admin)\./.exec(op.description)?.[1] as Role | undefined;
        const url = concrete(path);
        const what = `${method.toUpperCase()} ${url}`;
        const body = method === 'post' ? {} : undefined;
        if (!role) {
          assert.ok(path === '/v1/health' || path === '/v1/links/{token}', `${what} needs no token`);
          continue;
        }
        const none = await f.call(method.toUpperCase(), url, { body });
        assertError(none, 401, 'UNAUTHORIZED', /a bearer token is required/);
        assert.match(none.headers.get('www-authenticate') ?? '', /^Bearer realm="vmvault"$/, what);
        const wrong = await f.call(method.toUpperCase(), url, { body, headers: { authorization: 'Bearer not-a-known-token' } });
        assertError(wrong, 401, 'UNAUTHORIZED', /the bearer token is not known/);
        const low = BELOW[role];
        if (low) assertError(await f.call(method.toUpperCase(), url, { role: low, body }), 403, 'FORBIDDEN', new RegExp(`needs the ${role} role; token "${low}-token" has the ${low} role`));
        checked++;
      }
    }
    assert.equal(checked, API_ROUTES.length - 3, 'every route but health, links and the document itself');
  });

  test('the OpenAPI document itself needs a token', async () => {
    assertError(await f.call('GET', '/v1/openapi.json'), 401, 'UNAUTHORIZED');
  });

  test('an unknown route is 404 ROUTE_NOT_FOUND; a malformed path 400; a link token never shows in an error', async () => {
    assertError(await f.call('GET', '/v1/nothing', { role: 'viewer' }), 404, 'ROUTE_NOT_FOUND', /no route GET \/v1\/nothing/);
    // (A Request's URL resolves "." and ".." segments before the app sees it: those are checked over HTTP, in test/api/api.test.ts.)
    assertError(await f.call('GET', '/v1//vms', { role: 'viewer' }), 400, 'BAD_REQUEST', /malformed path/);
    assertError(await f.call('GET', '/v1/vms/a%5Cb', { role: 'viewer' }), 400, 'BAD_REQUEST', /malformed path/);
    assertError(await f.call('GET', '/v1/vms/a%2Fb', { role: 'viewer' }), 400, 'BAD_REQUEST', /malformed path/);
    const r = await f.call('POST', '/v1/links/SECRETTOKEN', { role: 'viewer' });
    assertError(r, 404, 'ROUTE_NOT_FOUND');
    assert.ok(!JSON.stringify(r.body).includes('SECRETTOKEN'));
  });

  test(`a body over ${MAX_BODY_BYTES} bytes is 413 PAYLOAD_TOO_LARGE`, async () => {
    const r = await f.call('POST', '/v1/policies/validate', { role: 'admin', body: { yaml: 'x'.repeat(MAX_BODY_BYTES + 1) } });
    assertError(r, 413, 'PAYLOAD_TOO_LARGE', /limited to 262144 bytes/);
  });
});

describe('GET /v1/health', () => {
  test('needs no token and says ok when Redis and the repository answer', async () => {
    const r = await f.call('GET', '/v1/health');
    assert.equal(r.status, 200);
    assert.deepEqual(r.body, { status: 'ok', redis: 'ok', repository: 'ok' });
  });

  test('is 503 degraded when Redis does not answer', async () => {
    const repo = await Repository.open(new LocalStorage(f.repoUrl), 'routes test passphrase');
    const config = parseConfig('vms: []\n', `${f.dir}/other.yaml`, { host: 'test' });
    const dead = createRedis(`unix://${f.dir}/no-such.sock`, 'producer');
    dead.on('error', () => {});
    const api = createApi({ config, repo, redis: dead, log: pino({ level: 'silent' }) });
    try {
      const r = await api.app.request('/v1/health');
      assert.equal(r.status, 503);
      assert.deepEqual(await r.json(), { status: 'degraded', redis: 'unreachable', repository: 'ok' });
    } finally {
      await api.close();
      dead.disconnect();
    }
  });
});

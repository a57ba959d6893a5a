/**
 * POST /v1/vms and DELETE /v1/vms/{vm} in-process (Hono's app.request), on a real
 * VM file in a temporary state directory: success and every refusal.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { OpenAPIHono } from '@hono/zod-openapi';
import type { Principal } from '../../src/api/auth.js';
import { sendError, toApiError } from '../../src/api/errors.js';
import { registerVmInventory } from '../../src/api/routes/vm-inventory.js';
import { VmInventory } from '../../src/config/inventory.js';
import { parseConfig } from '../../src/config/load.js';
import type { Config } from '../../src/config/schema.js';
import { tempDir, type TempDir } from '../helpers/images.js';

type Env = { Variables: { principal?: Principal } };

function appWith(inventory: VmInventory | undefined) {
  const app = new OpenAPIHono<Env>();
  app.onError((err, c) => sendError(c, toApiError(err)));
  app.use('*', async (c, next) => {
    const role = c.req.header('x-role');
    if (role) c.set('principal', { name: `${role}-token`, role: role as Principal['role'] });
    await next();
  });
  registerVmInventory(app, inventory);
  return app;
}

describe('VM inventory routes', () => {
  let dir: TempDir;
  let config: Config;
  let inventory: VmInventory;
  let app: ReturnType<typeof appWith>;
  const req = async (method: string, path: string, role?: string, body?: unknown) => {
    const r = await app.request(path, {
      method, headers: { ...(role ? { 'x-role': role } : {}), ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
    const text = await r.text();
    return { status: r.status, body: text ? JSON.parse(text) : undefined };
  };

  before(async () => {
    dir = await tempDir('vv-vmroutes-');
    config = parseConfig(`host: hv1\nstateDir: ${JSON.stringify(join(dir.path, 'state'))}\nvms:\n  - name: db\n    disks: [{ path: /img/db.qcow2 }]\n`, join(dir.path, 'vmvault.yaml'));
    inventory = new VmInventory(config);
    await inventory.start();
    app = appWith(inventory);
  });
  after(async () => {
    inventory.stop();
    await dir.cleanup();
  });

  test('an admin adds a VM: 201 with its defaults, written to vms.yaml, in config.vms', async () => {
    const r = await req('POST', '/v1/vms', 'admin', { name: 'web', disks: [{ path: '/img/web.qcow2', format: 'qcow2' }] });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.deepEqual(r.body, { name: 'web', host: 'hv1', driver: 'image', configFiles: [], tags: [], disks: [{ name: 'web', path: '/img/web.qcow2', format: 'qcow2' }] });
    assert.match(await readFile(inventory.file, 'utf8'), /- name: web\n/);
    assert.deepEqual(config.vms.map((v) => v.name), ['db', 'web']);
  });

  test('refusals: no token 401, operator 403, invalid 400 with each problem, name in use 409', async () => {
    const body = { name: 'x', disks: [{ path: '/img/x.raw' }] };
    assert.equal((await req('POST', '/v1/vms', undefined, body)).status, 401);
    const op = await req('POST', '/v1/vms', 'operator', body);
    assert.equal(op.status, 403);
    assert.match(op.body.error.message, /needs the admin role; token "operator-token" has the operator role/);
    const bad = await req('POST', '/v1/vms', 'admin', { name: 'bad name', driver: 'qemu', disks: [{ path: 'rel.raw' }], colour: 'red' });
    assert.equal(bad.status, 400, JSON.stringify(bad.body));
    const paths = (bad.body.error.details as Array<{ path: string }>).map((p) => p.path).sort();
    assert.deepEqual(paths, ['colour', 'disks[0].path', 'name', 'qmpSocket']);
    assert.equal((await req('POST', '/v1/vms', 'admin', { name: 'db', disks: [{ path: '/a.raw' }] })).status, 409);
    assert.equal((await req('POST', '/v1/vms', 'admin', { name: 'web', disks: [{ path: '/a.raw' }] })).status, 409);
    assert.equal((await req('POST', '/v1/vms', 'admin', { disks: [] })).status, 400, 'a body without a name');
    assert.deepEqual(config.vms.map((v) => v.name), ['db', 'web'], 'nothing changed');
  });

  test('DELETE: 204, then 404; a VM of the configuration file is 400; operator 403', async () => {
    assert.equal((await req('DELETE', '/v1/vms/web', 'operator')).status, 403);
    const conf = await req('DELETE', '/v1/vms/db', 'admin');
    assert.equal(conf.status, 400);
    assert.match(conf.body.error.message, /defined in the configuration file/);
    assert.equal((await req('DELETE', '/v1/vms/web', 'admin')).status, 204);
    assert.deepEqual(config.vms.map((v) => v.name), ['db']);
    const gone = await req('DELETE', '/v1/vms/web', 'admin');
    assert.equal(gone.status, 404);
    assert.match(gone.body.error.message, /not in .*vms\.yaml/);
  });

  test('without an inventory the routes answer 503', async () => {
    const bare = appWith(undefined);
    const r = await bare.request('/v1/vms', { method: 'POST', headers: { 'x-role': 'admin', 'content-type': 'application/json' }, body: JSON.stringify({ name: 'a', disks: [] }) });
    assert.equal(r.status, 503);
  });
});

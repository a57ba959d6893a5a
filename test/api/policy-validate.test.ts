/** POST /v1/policies/validate in-process (app.request): a YAML alias bomb is a 400 that says why, not a 500. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import { createApi, type Api } from '../../src/api/app.js';
import { parseConfig } from '../../src/config/load.js';
import { createRedis } from '../../src/queue/connection.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const TOKEN = 'admin-token-0123456789';
const GOOD = 'name: nightly\nschedule: "0 2 * * *"\nselect:\n  vms: [web]\nretention:\n  keepDaily: 7\n';
/** 9^9 strings once expanded, from about 350 bytes; the first alias is at line 2, column 8. */
const BOMB = [
  'a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]',
  ...'bcdefghi'.split('').map((x, i) => `${x}: &${x} [${Array(9).fill(`*${'abcdefghi'[i]}`).join(', ')}]`),
  GOOD,
].join('\n');

let dir: TempDir;
let api: Api;
let redis: ReturnType<typeof createRedis>;

before(async () => {
  dir = await tempDir('vmvault-validate-');
  const repo = await Repository.init(new LocalStorage(`${dir.path}/repo`), 'validate', { kdf: 'weak' });
  const sha = createHash('sha256').update(TOKEN).digest('hex');
  const config = parseConfig(`api:\n  tokens:\n    - { name: admin, role: admin, sha256: ${sha} }\nvms: []\n`, `${dir.path}/vmvault.yaml`, { host: 'test' });
  redis = createRedis('redis://127.0.0.1:1', 'producer', { lazyConnect: true }); // validate never touches Redis
  redis.on('error', () => {});
  api = createApi({ config, repo, redis, log: pino({ level: 'silent' }) });
});

after(async () => {
  await api?.close();
  redis?.disconnect();
  await dir?.cleanup();
});

const validate = (yaml: string) => api.app.request('/v1/policies/validate', {
  method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify({ yaml, file: 'p.yaml' }),
});

describe('POST /v1/policies/validate', () => {
  test('an alias bomb gets 400 BAD_INPUT naming the line and the reason; a good policy still validates', async () => {
    const r = await validate(BOMB);
    assert.equal(r.status, 400);
    const body = (await r.json()) as { error: { code: string; message: string; details: { problems: Array<{ line: number; col: number }> } } };
    assert.equal(body.error.code, 'BAD_INPUT');
    assert.match(body.error.message, /^p\.yaml:2:8: YAML: refused: its aliases \(\*name\) expand to more than 100 copies .*"billion laughs"/);
    assert.deepEqual(body.error.details.problems.map((p) => [p.line, p.col]), [[2, 8]]);

    const ok = await validate(GOOD);
    assert.equal(ok.status, 200);
    assert.equal(((await ok.json()) as { valid: boolean }).valid, true);
    const bad = await validate(GOOD.replace('keepDaily', 'keepDialy'));
    assert.equal(bad.status, 200, 'a policy with problems is a verdict, not a bad request');
    assert.equal(((await bad.json()) as { valid: boolean }).valid, false);
  });
});

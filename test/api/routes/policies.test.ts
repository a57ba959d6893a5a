/** /v1/policies in-process: the policies directory with its problems, and validation. */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { assertError, startFixture, type Fixture } from './fixture.js';

const GOOD = 'name: nightly\nschedule: "0 2 * * *"\nselect:\n  vms: [web]\nretention:\n  keepDaily: 7\n';
let f: Fixture;
before(async () => {
  f = await startFixture();
  await writeFile(join(f.policiesDir, 'nightly.yaml'), GOOD);
  await writeFile(join(f.policiesDir, 'broken.yaml'), GOOD.replace('nightly', 'broken').replace('keepDaily', 'keepDialy'));
});
after(async () => { await f?.close(); });

describe('/v1/policies', () => {
  test('lists the valid policies and the problems of the others, with file and line', async () => {
    const r = await f.call('GET', '/v1/policies', { role: 'viewer' });
    assert.equal(r.status, 200);
    assert.deepEqual(r.body.items.map((p: any) => [p.file, p.policy.name, p.policy.retention.keepDaily]), [[join(f.policiesDir, 'nightly.yaml'), 'nightly', 7]]);
    assert.equal(r.body.problems.length, 1);
    assert.deepEqual([r.body.problems[0].file, r.body.problems[0].line], [join(f.policiesDir, 'broken.yaml'), 6]);
    assert.match(r.body.problems[0].message, /unknown key \(did you mean "keepDaily"\?\)/);
  });

  test('validate: a verdict for good and bad policies; a request without yaml is 400', async () => {
    const ok = await f.call('POST', '/v1/policies/validate', { role: 'admin', body: { yaml: GOOD } });
    assert.deepEqual([ok.status, ok.body.valid, ok.body.policy.name, ok.body.problems], [200, true, 'nightly', []]);
    const bad = await f.call('POST', '/v1/policies/validate', { role: 'admin', body: { yaml: GOOD.replace('0 2 * * *', 'every night'), file: 'n.yaml' } });
    assert.deepEqual([bad.status, bad.body.valid, bad.body.policy], [200, false, null]);
    assert.equal(bad.body.problems[0].file, 'n.yaml');
    assertError(await f.call('POST', '/v1/policies/validate', { role: 'admin', body: { file: 'x.yaml' } }), 400, 'BAD_REQUEST', /yaml/);
  });
});

/**
 * Key files planted in keys/ to slow every open: keys are tried cheapest first, so
 * costly ones sorting before the real key cost a right passphrase nothing, and one
 * open's total Argon2id cost is bounded, a wrong passphrase being told which key
 * files were not tried and how to remove them.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { VmvaultError } from '../../src/errors.js';
import { KDF_MAX, KDF_PRESETS, openMaster, type KeyFile } from '../../src/crypto/keys.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { tempDir, type TempDir } from '../helpers/images.js';

const PASSWORD = 'the real passphrase';

/** A key file that parses, whose Argon2id runs in full, and that no passphrase opens. */
function planted(kdf: { opsLimit: number; memLimit: number }): KeyFile {
  const b64 = (n: number) => randomBytes(n).toString('base64');
  return { version: 1, created: new Date(0).toISOString(), kdf: { algorithm: 'argon2id13', ...kdf, salt: b64(16) }, nonce: b64(24), sealed: b64(48) };
}

describe('costly key files planted in keys/', () => {
  let dir: TempDir;
  let storage: LocalStorage;
  let realKey = '';
  const strong = planted(KDF_PRESETS.strong);

  before(async () => {
    dir = await tempDir('vv-keycost-');
    storage = new LocalStorage(path.join(dir.path, 'repo'));
    const repo = await Repository.init(storage, PASSWORD, { kdf: 'weak' });
    realKey = repo.keyId;
    // Ids that list before the real key's (a random hex id).
    await storage.put('keys/0000000000000001', Buffer.from(JSON.stringify(strong)));
    await storage.put('keys/0000000000000002', Buffer.from(JSON.stringify(planted(KDF_PRESETS.strong))));
    await storage.put('keys/0000000000000003', Buffer.from(JSON.stringify(planted(KDF_MAX))));
  });
  after(async () => dir.cleanup());

  test('the right passphrase opens without running the costly keys\' KDF: faster than one of them', async () => {
    const t0 = Date.now();
    await openMaster(strong, PASSWORD, 'x');
    const oneStrongKdf = Date.now() - t0;
    const t1 = Date.now();
    const repo = await Repository.open(storage, PASSWORD, { cacheDir: false });
    const opened = Date.now() - t1;
    assert.equal(repo.keyId, realKey);
    assert.ok(opened < oneStrongKdf, `open took ${opened} ms, one strong KDF ${oneStrongKdf} ms`);
  });

  test('a wrong passphrase tries keys within the budget only, and names those it did not try', async () => {
    await assert.rejects(Repository.open(storage, 'not it', { cacheDir: false }), (err: unknown) => {
      assert.ok(err instanceof VmvaultError && err.code === 'WRONG_PASSWORD', String(err));
      assert.match(err.message, /opens none of the 3 key\(s\) tried, cheapest first/);
      assert.match(err.message, /1 more, costlier than any key vmvault makes, were not tried, as their key derivation in one open is bounded \(4 GiB × passes in all\): keys\/0000000000000003 \(16 passes of 1024 MiB\)/);
      assert.match(err.message, /vmvault key remove ID/);
      return true;
    });
  });

  test('every key of a preset is tried, however many: with four strong keys listing first, the holder of a fifth opens', async () => {
    const many = new LocalStorage(path.join(dir.path, 'many'));
    const made = await Repository.init(many, 'fifth holder', { kdf: 'strong' });
    for (let i = 1; i <= 4; i++) await many.put(`keys/000000000000000${i}`, Buffer.from(JSON.stringify(planted(KDF_PRESETS.strong))));
    const repo = await Repository.open(many, 'fifth holder', { cacheDir: false });
    assert.equal(repo.keyId, made.keyId);
  });
});

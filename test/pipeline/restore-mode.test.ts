/** Restored files are readable by their owner only, whatever the umask: disks as well as configuration files. */
import assert from 'node:assert/strict';
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { backupVm } from '../../src/vm/drivers.js';
import { restore } from '../../src/pipeline/restore.js';
import { Repository } from '../../src/repo/repository.js';
import { LocalStorage } from '../../src/storage/local.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';

const MiB = 1024 * 1024;
let dir: TempDir;
let repo: Repository;
let backupId: string;
let umask: number;

before(async () => {
  umask = process.umask(0o022); // the usual one: files are created 0644 unless we say otherwise
  dir = await tempDir('vmvault-restore-mode-');
  const disk = await makeImage(dir.path, 'root', 'qcow2', 8 * MiB, [{ offset: 0, length: MiB, pattern: 0x5a }]);
  const conf = join(dir.path, 'vm.conf');
  await writeFile(conf, 'memory=1G\n');
  repo = await Repository.init(new LocalStorage(join(dir.path, 'repo')), 'mode', { kdf: 'weak' });
  backupId = (await backupVm(repo, { vm: 'vm', driver: 'image', disks: [{ path: disk, name: 'root' }], configs: [conf] })).manifest.id;
});

after(async () => {
  process.umask(umask);
  await dir?.cleanup();
});

describe('restore file modes', () => {
  for (const format of ['qcow2', 'raw'] as const) {
    test(`a disk restored as ${format}, and the configuration beside it, are 0600 under umask 022`, async () => {
      const to = join(dir.path, `to-${format}`);
      const r = await restore(repo, { backupId, to, format });
      assert.deepEqual(r.files.map((f) => f.kind).sort(), ['config', 'disk']);
      for (const f of r.files) {
        const mode = (await stat(f.path)).mode & 0o777;
        assert.equal(mode.toString(8), '600', `${f.kind} ${f.path}`);
      }
    });
  }
});

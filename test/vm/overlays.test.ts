/**
 * Overlay creation and clean-up where they can go wrong without QEMU refusing
 * anything: a transaction whose reply is lost, and a directory for overlays that
 * several VMs share. The first runs against a scripted QMP peer (QEMU cannot be made
 * to lose a reply on demand); the second on two real running VMs.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { VmvaultError } from '../../src/errors.js';
import { commitOverlay, createOverlays, recoverOverlays } from '../../src/vm/overlays.js';
import { attachedDisks, overlayPath, type AttachedDisk } from '../../src/vm/qemu-blocks.js';
import { QmpClient } from '../../src/vm/qmp.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { startTestVm, type TestVm } from '../helpers/qemu-vm.js';

const MiB = 1024 * 1024;

/**
 * A QMP peer whose `transaction` never gets its reply (the client's timeout), after
 * QEMU either applied it (`applied`) or not; `queryFails`: the connection is gone too.
 */
function lostReply(base: string, overlay: string, opts: { applied: boolean; queryFails?: boolean }): QmpClient {
  return {
    socketPath: '/fake/qmp.sock',
    async execute(command: string) {
      if (command === 'transaction') throw new VmvaultError('QEMU', 'transaction: no reply from QEMU within 30000 ms', { retriable: true });
      if (command === 'query-block') {
        if (opts.queryFails) throw new VmvaultError('QEMU', 'query-block: QMP connection closed');
        const image = opts.applied
          ? { filename: overlay, format: 'qcow2', 'backing-image': { filename: base, format: 'qcow2' } }
          : { filename: base, format: 'qcow2' };
        return [{ device: '', qdev: 'vd0', inserted: { file: image.filename, 'node-name': 'n0', drv: 'qcow2', image } }];
      }
      throw new Error(`unexpected ${command}`);
    },
  } as unknown as QmpClient;
}

describe('overlays', () => {
  let dir: TempDir;
  before(async () => { dir = await tempDir(); });
  after(async () => { await dir?.cleanup(); });

  describe('a transaction without a reply', () => {
    async function setup(name: string) {
      const base = path.join(dir.path, name);
      await fs.writeFile(base, 'base');
      // The overlay file is made by createOverlays itself (mode 0600) before the transaction.
      const overlay = overlayPath(base, 'abcd1234');
      const disk: AttachedDisk = { path: base, device: 'vd0', topNode: 'n0', format: 'qcow2' };
      return { base, overlay, disk };
    }

    it('that QEMU applied keeps the overlay the VM now runs on, and the instant counts', async () => {
      const { base, overlay, disk } = await setup('applied.qcow2');
      const overlays = await createOverlays(lostReply(base, overlay, { applied: true }), [disk], 'abcd1234');
      assert.deepEqual(overlays.map((o) => o.file), [overlay]);
      assert.ok(existsSync(overlay), 'the overlay the VM writes to was deleted');
    });

    it('that QEMU did not apply removes the overlay file', async () => {
      const { base, overlay, disk } = await setup('refused.qcow2');
      await assert.rejects(createOverlays(lostReply(base, overlay, { applied: false }), [disk], 'abcd1234'), /the VM runs on as before/);
      assert.ok(!existsSync(overlay));
    });

    it('when QEMU cannot be asked either, keeps the file and says the next backup merges it', async () => {
      const { base, overlay, disk } = await setup('unknown.qcow2');
      await assert.rejects(createOverlays(lostReply(base, overlay, { applied: true, queryFails: true }), [disk], 'abcd1234'),
        (err: unknown) => err instanceof VmvaultError && err.message.includes(overlay) && /do not delete them; the next backup/.test(err.message));
      assert.ok(existsSync(overlay), 'an overlay the VM may write to was deleted');
    });
  });

  describe('a directory for overlays shared by two VMs', () => {
    const vms: TestVm[] = [];
    after(async () => { for (const vm of vms) await vm.stop(); });

    it('gives disks of the same file name different overlays, and one VM\'s clean-up leaves the other\'s overlay alone', async () => {
      const shared = path.join(dir.path, 'overlays');
      await fs.mkdir(shared);
      const disks: string[] = [];
      for (const vmDir of ['web', 'db']) {
        await fs.mkdir(path.join(dir.path, vmDir));
        disks.push(await makeImage(path.join(dir.path, vmDir), 'disk0.qcow2', 'qcow2', 4 * MiB));
      }
      assert.notEqual(overlayPath(disks[0]!, 'abcd1234', shared), overlayPath(disks[1]!, 'abcd1234', shared));
      for (const d of disks) vms.push(await startTestVm([d]));
      const warn = () => {};

      const web = await QmpClient.connect(vms[0]!.qmpSocket);
      let overlay: string;
      try {
        // The web VM is mid-backup: its disk runs on an overlay in the shared directory.
        const [o] = await createOverlays(web, await attachedDisks(web, [disks[0]!]), 'abcd1234', shared);
        overlay = o!.file;
        await vms[0]!.write(0, 0, 64 * 1024, 0x5a);

        // The db VM's backup cleans up its own leftovers in the same directory.
        const db = await QmpClient.connect(vms[1]!.qmpSocket);
        try {
          await recoverOverlays(db, [disks[1]!], warn, shared);
        } finally {
          await db.close();
        }
        assert.ok(existsSync(overlay), "the db VM's clean-up deleted the overlay the web VM writes to");

        await commitOverlay(web, o!, warn);
      } finally {
        await web.close();
      }
      assert.ok(!existsSync(overlay));
      await vms[0]!.expect(0, 0, 64 * 1024, 0x5a);
      assert.deepEqual(await vms[0]!.activeFiles(), [disks[0]]);
    });
  });
});

/**
 * QmpClient against a real qemu-system-x86_64 (TCG, no guest OS).
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { VmvaultError } from '../../src/errors.js';
import { QmpClient } from '../../src/vm/qmp.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { startTestVm, type TestVm } from '../helpers/qemu-vm.js';

describe('QmpClient', () => {
  let dir: TempDir;
  let vm: TestVm;
  let qmp: QmpClient;
  before(async () => {
    dir = await tempDir();
    const disk = await makeImage(dir.path, 'disk.qcow2', 'qcow2', 8 * 1024 * 1024);
    vm = await startTestVm([disk]);
    qmp = await QmpClient.connect(vm.qmpSocket);
  });
  after(async () => {
    await qmp?.close();
    await vm?.stop();
    await dir?.cleanup();
  });

  it('runs commands and returns their results', async () => {
    const s = await qmp.execute<{ status: string; running: boolean }>('query-status');
    assert.equal(s.status, 'running');
    const blocks = await qmp.execute<{ inserted?: { 'node-name': string } }[]>('query-block');
    assert.deepEqual(blocks.map((b) => b.inserted?.['node-name']), ['disk0']);
  });

  it("turns a QMP error into a QEMU error with QEMU's description", async () => {
    await assert.rejects(qmp.execute('no-such-command'), (err: unknown) =>
      err instanceof VmvaultError && err.code === 'QEMU' && /^no-such-command: .*not (?:been )?found/i.test(err.message));
    await assert.rejects(qmp.execute('block-job-complete', { device: 'nothing' }), /block-job-complete: .*nothing/);
    // The connection is still usable after errors.
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running');
  });

  it('runs HMP commands, including qemu-io on a guest device', async () => {
    assert.match(await qmp.hmp('info status'), /running/);
    await qmp.hmp('qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x5a 0 4096"');
    await vm.expect(0, 0, 4096, 0x5a);
    await assert.rejects(vm.expect(0, 0, 4096, 0x5b), /Pattern verification failed/);
  });

  it('keeps events that arrive before waitEvent is called', async () => {
    await qmp.execute('stop');
    await new Promise((r) => setTimeout(r, 100)); // STOP is surely in by now.
    const data = await qmp.waitEvent('STOP', undefined, 1000);
    assert.deepEqual(data ?? {}, {});
    const mark = qmp.eventMark();
    await qmp.execute('cont');
    await qmp.waitEvent('RESUME', undefined, 5000, { after: mark });
    // An event is handed out once: a second wait for it times out.
    await assert.rejects(qmp.waitEvent('RESUME', undefined, 200, { after: mark }), /no RESUME event within 200 ms/);
  });

  it('runs jobs to the end and reports their errors', async () => {
    await qmp.runJob('snapshot-save', { 'job-id': 'save-1', tag: 't1', vmstate: 'disk0', devices: ['disk0'] }, 60_000);
    assert.match(await qmp.hmp('info snapshots'), /t1/);
    await qmp.runJob('snapshot-delete', { 'job-id': 'del-1', tag: 't1', devices: ['disk0'] }, 60_000);
    await assert.rejects(
      qmp.runJob('snapshot-save', { 'job-id': 'save-2', tag: 't2', vmstate: 'disk0', devices: ['missing-node'] }, 60_000),
      (err: unknown) => err instanceof VmvaultError && err.code === 'QEMU' && /^snapshot-save: .*missing-node/.test(err.message));
    const jobs = await qmp.execute<unknown[]>('query-jobs');
    assert.deepEqual(jobs, [], 'concluded jobs are dismissed');
  });

  it('says clearly when the socket does not exist, is not listening, or is busy', async () => {
    const missing = path.join(dir.path, 'nothing.sock');
    await assert.rejects(QmpClient.connect(missing), (err: unknown) =>
      err instanceof VmvaultError && err.code === 'NOT_FOUND' && err.message.includes(missing) && /qmpSocket/.test(err.message));
    // The monitor serves one client: a second one gets no greeting.
    await assert.rejects(QmpClient.connect(vm.qmpSocket, { timeoutMs: 500 }), /no QMP greeting .* another client/);
  });

  it('fails pending work when the connection closes', async () => {
    const other = await makeImage(dir.path, 'other.qcow2', 'qcow2', 1024 * 1024);
    const short = await startTestVm([other]);
    const c = await QmpClient.connect(short.qmpSocket);
    const waiting = assert.rejects(c.waitEvent('NEVER', undefined, 10_000), /closed/);
    await short.stop();
    await waiting;
    await assert.rejects(c.execute('query-status'), /closed/);
    await c.close();
  });
});

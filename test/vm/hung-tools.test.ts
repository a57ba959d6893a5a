/**
 * qemu-img and virsh runs that never finish (storage that stopped answering, a dead
 * libvirtd) are stopped after their bound, and the backup fails with an error naming
 * the tool, the subcommand and the image: the repository lock is given back, nothing
 * is committed, and the image is left as the real qemu-img last wrote it. Fakes of
 * both tools, first in PATH, hang on the subcommands a test names and hand everything
 * else to the real qemu-img; bounds are shortened with VMVAULT_TOOL_TIMEOUTS.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { execa } from 'execa';
import { imageCheck, WriterStopped } from '../../src/disk/qemu.js';
import { toolTimeoutMs } from '../../src/disk/tool-timeouts.js';
import { Repository } from '../../src/repo/repository.js';
import { readLocks } from '../../src/repo/locks.js';
import { LocalStorage } from '../../src/storage/local.js';
import { backupVm } from '../../src/vm/drivers.js';
import { virsh, VirshTimeout } from '../../src/vm/virsh.js';
import { makeImage, tempDir, verifyPatterns, waitForExit, type TempDir } from '../helpers/images.js';
import { instantRestore } from '../../src/vm/instant-restore.js';

const MiB = 1024 * 1024;
const DATA = [{ offset: MiB, length: 2 * MiB, pattern: 0x4d }];

/** The image's vmvault bitmaps and snapshots, read without a lock (-U). */
async function oursIn(file: string): Promise<{ bitmaps: string[]; snapshots: string[] }> {
  const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', '-U', '-f', 'qcow2', file])).stdout) as {
    snapshots?: { name: string }[]; 'format-specific': { data: { bitmaps?: { name: string }[] } };
  };
  const ours = (names: string[]) => names.filter((n) => n.startsWith('vmvault-'));
  return { bitmaps: ours((info['format-specific'].data.bitmaps ?? []).map((b) => b.name)), snapshots: ours((info.snapshots ?? []).map((x) => x.name)) };
}

describe('qemu-img and virsh runs that do not finish', { timeout: 180_000 }, () => {
  let dir: TempDir;
  let bin: string;
  let repo: Repository;
  const saved = { PATH: process.env.PATH, VMVAULT_TOOL_TIMEOUTS: process.env.VMVAULT_TOOL_TIMEOUTS };

  /** The fakes read what to do from files beside them (a child's environment may be narrowed). */
  const hang = (pattern: string) => fs.writeFile(path.join(bin, 'hang'), pattern);
  const checkSays = (json: string) => fs.writeFile(path.join(bin, 'check-says'), json);

  before(async () => {
    dir = await tempDir();
    bin = path.join(dir.path, 'bin');
    await fs.mkdir(bin);
    const real = (await execa('sh', ['-c', 'command -v qemu-img'])).stdout.trim();
    // qemu-img: sleeps when its arguments match the regex in ./hang (leaving ./hung); once it
    // has, answers `check` with ./check-says when there is one; else the real qemu-img runs.
    await fs.writeFile(path.join(bin, 'qemu-img'), `#!/bin/bash
here=$(dirname "$0")
if [[ -s "$here/hang" && "$*" =~ $(cat "$here/hang") ]]; then touch "$here/hung"; exec sleep 1000; fi
if [[ "$1" == check && -s "$here/check-says" && -e "$here/hung" ]]; then cat "$here/check-says"; exit 2; fi
exec ${real} "$@"
`, { mode: 0o755 });
    // virsh: records its arguments, then never answers.
    await fs.writeFile(path.join(bin, 'virsh'), `#!/bin/bash
echo "$*" >> "$(dirname "$0")/virsh.log"
exec sleep 1000
`, { mode: 0o755 });
    process.env.PATH = `${bin}:${process.env.PATH}`;
    repo = await Repository.init(new LocalStorage(path.join(dir.path, 'repo')), 'pw', { kdf: 'weak' });
  });
  afterEach(async () => {
    await fs.rm(path.join(bin, 'hang'), { force: true });
    await fs.rm(path.join(bin, 'check-says'), { force: true });
    await fs.rm(path.join(bin, 'hung'), { force: true });
    if (saved.VMVAULT_TOOL_TIMEOUTS === undefined) delete process.env.VMVAULT_TOOL_TIMEOUTS;
    else process.env.VMVAULT_TOOL_TIMEOUTS = saved.VMVAULT_TOOL_TIMEOUTS;
  });
  after(async () => {
    process.env.PATH = saved.PATH;
    await dir.cleanup();
  });

  /** The backup fails with the error `check` accepts, within `withinMs`; no lock is left and nothing is committed. */
  async function failsWithin(img: string, withinMs: number, check: (err: Error) => boolean): Promise<void> {
    const committed = await repo.backupIds();
    const started = Date.now();
    await assert.rejects(backupVm(repo, { vm: 'hung', driver: 'image', disks: [{ path: img, format: 'qcow2' }], warn: () => {} }), (err: Error) => {
      assert.ok(check(err), err.message);
      return true;
    });
    assert.ok(Date.now() - started < withinMs, `failed after ${Date.now() - started} ms`);
    assert.deepEqual(await readLocks(repo), [], 'the repository lock was given back');
    assert.deepEqual(await repo.backupIds(), committed, 'nothing was committed');
  }

  it('a qemu-img snapshot -c that hangs is stopped after the metadata bound: the error names it, the image and the clean check; the new bitmap is removed again', async () => {
    process.env.VMVAULT_TOOL_TIMEOUTS = 'metadata=4000';
    const img = await makeImage(dir.path, 'snap.qcow2', 'qcow2', 8 * MiB, DATA);
    await hang('^snapshot -q -c ');
    await failsWithin(img, 30_000, (err) => err instanceof WriterStopped && err.checksClean && err.code === 'QEMU' &&
      new RegExp(`^qemu-img snapshot -c vmvault-[0-9a-f]+ did not finish within 4 s on ${img} and was stopped \\(its storage may not be answering.*; ` +
        'since then the image checks clean \\(qemu-img check.*Check the storage before the next backup').test(err.message));
    assert.deepEqual(await oursIn(img), { bitmaps: [], snapshots: [] }, 'no snapshot; the bitmap added before it removed');
    assert.deepEqual(await imageCheck(img), { corruptions: 0 });
    await verifyPatterns(img, 'qcow2', DATA);
    // Nothing of the stopped run stands in the way of the next backup.
    await fs.rm(path.join(bin, 'hang'));
    const r = await backupVm(repo, { vm: 'hung', driver: 'image', disks: [{ path: img, format: 'qcow2' }] });
    assert.equal(r.manifest.disks[0]!.mode, 'full');
  });

  it('a qemu-img bitmap --add that hangs leaves the image byte for byte as it was', async () => {
    process.env.VMVAULT_TOOL_TIMEOUTS = 'metadata=4000';
    const img = await makeImage(dir.path, 'bitmap.qcow2', 'qcow2', 8 * MiB, DATA);
    const bytes = await fs.readFile(img);
    await hang('^bitmap --add ');
    await failsWithin(img, 30_000, (err) => err instanceof WriterStopped && err.checksClean &&
      err.message.startsWith(`qemu-img bitmap --add vmvault-`) && err.message.includes(`within 4 s on ${img} and was stopped`));
    assert.equal(Buffer.compare(await fs.readFile(img), bytes), 0);
  });

  it('a stopped writer after which the check finds corruption says so, and nothing more is written to the image', async () => {
    process.env.VMVAULT_TOOL_TIMEOUTS = 'metadata=4000';
    const img = await makeImage(dir.path, 'bad.qcow2', 'qcow2', 8 * MiB, DATA);
    await hang('^snapshot -q -c ');
    // The check before the first write is the real one; the one after the stopped snapshot finds damage.
    await checkSays('{"check-errors": 0, "corruptions": 2, "leaks": 0}');
    await failsWithin(img, 30_000, (err) => err instanceof WriterStopped && !err.checksClean &&
      /since then the image has 2 metadata corruption\(s\) \(qemu-img check\): start no VM on it.*restore the disk from its last backup.*repair a copy/.test(err.message));
    assert.equal((await oursIn(img)).bitmaps.length, 1, 'the bitmap added before the snapshot was left alone');
  });

  it('a qemu-img check that does not finish: the disk is read in full, and the warning speaks of a slow check, not of damage', async () => {
    process.env.VMVAULT_TOOL_TIMEOUTS = 'check=1000';
    const img = await makeImage(dir.path, 'slow.qcow2', 'qcow2', 8 * MiB, DATA);
    await hang('^check ');
    const warnings: string[] = [];
    const r = await backupVm(repo, { vm: 'slow', driver: 'image', disks: [{ path: img, format: 'qcow2' }], warn: (m: string) => warnings.push(m) });
    const entry = r.manifest.disks[0]!;
    assert.equal(entry.mode, 'full');
    assert.equal(entry.bitmap, undefined);
    assert.match(entry.reason!, /could not be checked \(qemu-img check did not finish within 1 s and was stopped\)/);
    const w = warnings.find((x) => x.includes(img)) ?? '';
    assert.match(w, /qemu writes nothing to an image whose metadata was not checked.*qemu-img check -f qcow2 .*VMVAULT_TOOL_TIMEOUTS=check=/);
    assert.doesNotMatch(w, /Stop using it|repair a copy/);
    assert.deepEqual(await oursIn(img), { bitmaps: [], snapshots: [] });
  });

  it('virsh that does not answer is stopped after its subcommand\'s bound, with keepalive asked for', async () => {
    process.env.VMVAULT_TOOL_TIMEOUTS = 'virsh-query=700,virsh-job=2500';
    const log = path.join(bin, 'virsh.log');
    let started = Date.now();
    await assert.rejects(virsh(['domstate', 'vm1'], 'vm1'), (err: Error) => err instanceof VirshTimeout &&
      /^virsh domstate on domain "vm1" did not finish within 0.7 s and was stopped: libvirtd, the domain's QEMU or its guest agent is not answering\. Check "virsh domstate vm1"/.test(err.message));
    const query = Date.now() - started;
    started = Date.now();
    await assert.rejects(virsh(['domjobabort', 'vm1'], 'vm1'), (err: Error) => err instanceof VirshTimeout &&
      /within 2.5 s .*may still be under way in libvirt \(virsh domjobinfo vm1\)/.test(err.message));
    const job = Date.now() - started;
    assert.ok(query < 5000 && job >= 2400 && job < 10_000, `query stopped after ${query} ms, job after ${job} ms`);
    assert.deepEqual((await fs.readFile(log, 'utf8')).trim().split('\n'), ['-k 5 -K 3 domstate vm1', '-k 5 -K 3 domjobabort vm1']);
    // The libvirt driver's first call meets it: the backup fails, its lock given back, nothing committed.
    const committed = await repo.backupIds();
    started = Date.now();
    await assert.rejects(backupVm(repo, { vm: 'lv', driver: 'libvirt', domain: 'vm1', disks: [], warn: () => {} }), VirshTimeout);
    assert.ok(Date.now() - started < 10_000);
    assert.deepEqual(await readLocks(repo), []);
    assert.deepEqual(await repo.backupIds(), committed);
  });

  it("an instant restore's QEMU that never finishes starting is stopped after its bound, with the QEMU it had left running; nothing of the restore is kept", async () => {
    // A fake qemu-system-x86_64: starts a "daemon" that writes the pid file (its command line
    // names it, as QEMU's does), then never returns, as a -daemonize that never finishes setting up.
    await fs.writeFile(path.join(bin, 'qemu-system-x86_64'), `#!/bin/bash
pf=""; prev=""; for a in "$@"; do [[ "$prev" == -pidfile ]] && pf=$a; prev=$a; done
node -e 'setTimeout(() => {}, 1e6)' -- qemu-daemon -pidfile "$pf" &
echo $! > "$pf"
exec sleep 1000
`, { mode: 0o755 });
    process.env.VMVAULT_TOOL_TIMEOUTS = 'vm-start=1500';
    const img = await makeImage(dir.path, 'instant.qcow2', 'qcow2', 8 * MiB, DATA);
    const { manifest } = await backupVm(repo, { vm: 'instant', driver: 'image', disks: [{ path: img, format: 'qcow2', name: 'root' }] });
    const to = path.join(dir.path, 'instant-out');
    let daemon = 0;
    const started = Date.now();
    await assert.rejects(instantRestore(repo, { backupId: manifest.id, to, vm: { start: {} } }), (err: Error) => {
      const m = /^QEMU did not finish starting within 1.5 s and was stopped \(and the QEMU it had forked, pid (\d+)\)\. .*nothing of the restore was kept$/.exec(err.message);
      daemon = Number(m?.[1] ?? 0);
      return m !== null;
    });
    assert.ok(Date.now() - started < 15_000, `failed after ${Date.now() - started} ms`);
    await waitForExit(daemon, 5000);
    assert.equal(await fs.readFile(`/proc/${daemon}/cmdline`, 'utf8').then((c) => c.includes('qemu-daemon'), () => false), false, 'the QEMU it left is gone');
    const left = await fs.readdir(to);
    assert.deepEqual(left.filter((f) => /instant-restore\.json|overlay|root\.(qcow2|raw)$/.test(f)), [], `left: ${left.join(', ')}`);
  });

  it('VMVAULT_TOOL_TIMEOUTS overrides the bounds it names and refuses what it cannot read', () => {
    process.env.VMVAULT_TOOL_TIMEOUTS = 'map=1234, virsh-commit = 99';
    assert.equal(toolTimeoutMs('map'), 1234);
    assert.equal(toolTimeoutMs('virsh-commit'), 99);
    assert.equal(toolTimeoutMs('metadata'), 10 * 60_000);
    process.env.VMVAULT_TOOL_TIMEOUTS = 'metadata=soon';
    assert.throws(() => toolTimeoutMs('metadata'), (e: Error & { code?: string }) => e.code === 'BAD_INPUT' && /VMVAULT_TOOL_TIMEOUTS has "metadata=soon"/.test(e.message));
  });
});

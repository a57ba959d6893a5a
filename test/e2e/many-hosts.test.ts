/**
 * Many hosts, one bucket: three real `vmvault worker` processes, each configured as its
 * own host, back up three VMs at the same time into ONE repository on the S3 test server.
 * The VMs are clones of one qcow2 image with small differences, so they share most chunks.
 * Three rounds, each changing a few chunks of every clone; the backups carry a policy
 * that keeps the last one, so each commit enqueues a prune (run by whichever worker takes
 * it, while other backups may still run), and `vmvault gc` runs between rounds 2 and 3.
 * Then: every kept backup restores identical (qemu-img compare), `verify --read-data`
 * passes, and uploads made twice are counted (one proxy per host, so each PUT is known
 * by host) and must lie in the race window.
 *
 * The race window: a backup asks storage (a HEAD, ChunkIndex.present) for each chunk it
 * reads that it has not stored itself, before sealing and uploading it. A chunk is therefore
 * uploaded twice only when another host's HEAD of it came before the first upload of it
 * finished, i.e. when two hosts were uploading the same chunk at the same time. The test
 * checks exactly that for each duplicate, from the proxies' logs.
 * NOT asserted, and not given by the chunk index being built in parallel either (index
 * objects are written as a backup goes and read at its start): a bound on the NUMBER of
 * duplicates. Hosts reading identical clones in the same order at the same speed may
 * upload many of the same chunks at once; only claiming chunks across hosts (e.g. in
 * Redis) would bound that. The figures are printed.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Job } from 'bullmq';
import { compareImages } from '../../src/disk/qemu.js';
import { closeRedis, createRedis } from '../../src/queue/connection.js';
import { enqueueBackup, hostQueue } from '../../src/queue/enqueue.js';
import { cli, cliJson } from '../helpers/cli.js';
import { makeImage, writePattern } from '../helpers/images.js';
import { start, stopProc, waitFor, type Proc } from '../helpers/procs.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startS3Server, type S3Server } from '../helpers/s3.js';
import { objectKey, startS3Proxy, type S3Proxy } from '../helpers/s3-proxy.js';
import type { BackupJobResult } from '../../workers/host-agent.js';
import { PASSWORD } from './harness.js';

const KiB = 1024;
const CHUNK = 256 * KiB;
const CHUNKS = 96;
const HOSTS = ['hosta', 'hostb', 'hostc'];
const ROUNDS = 3;

let s3: S3Server;
let redis: TestRedis;
let work: string;
const proxies: S3Proxy[] = [];
before(async () => {
  work = await mkdtemp(join(tmpdir(), 'vmvault-hosts-'));
  s3 = await startS3Server();
  redis = await startRedis();
  for (const _ of HOSTS) proxies.push(await startS3Proxy(s3.endpoint));
});
after(async () => {
  for (const p of proxies) await p.down();
  await redis?.stop();
  await s3?.stop();
  await rm(work, { recursive: true, force: true });
});

test('three hosts back up clones into one S3 repository at once, with prune and gc: all restore identical, uploads twice only in the race window', async () => {
  const repoUrl = s3.repoUrl('fleet');
  const env = { PATH: process.env.PATH, HOME: process.env.HOME, ...s3.env, VMVAULT_REPOSITORY: repoUrl, VMVAULT_PASSWORD: PASSWORD };
  const init = await cli(['init', '--kdf', 'weak', '--chunk-size', '256K'], env);
  assert.equal(init.code, 0, init.stderr);

  // One base image, every chunk its own; each VM a full copy with its own small changes.
  const base = await makeImage(work, 'base.qcow2', 'qcow2', CHUNKS * CHUNK,
    Array.from({ length: CHUNKS }, (_, i) => ({ offset: i * CHUNK, length: CHUNK, pattern: i + 1 })));
  const vms = HOSTS.map((host, n) => ({ host, name: `vm${n + 1}`, disk: join(work, `vm${n + 1}.qcow2`) }));
  for (const vm of vms) await copyFile(base, vm.disk);

  const passFile = join(work, 'password');
  await writeFile(passFile, `${PASSWORD}\n`, { mode: 0o600 });
  const policies = join(work, 'policies');
  await mkdir(policies);
  await writeFile(join(policies, 'fleet.yaml'), `name: fleet\nschedule: "0 3 * * *"\nselect:\n  vms: [${vms.map((v) => v.name).join(', ')}]\nretention:\n  keepLast: 1\n`);
  const workers: Proc[] = [];
  const producer = createRedis(redis.url, 'producer');
  producer.on('error', () => {});
  const queues = HOSTS.map((h) => hostQueue(producer, h));
  try {
    for (const [n, vm] of vms.entries()) {
      const configFile = join(work, `${vm.host}.yaml`);
      await writeFile(configFile, [
        `repository: { url: ${JSON.stringify(proxies[n]!.via(repoUrl))}, passwordFile: ${JSON.stringify(passFile)} }`,
        `redis: { url: ${JSON.stringify(redis.url)} }`,
        `host: ${vm.host}`,
        `policiesDir: ${JSON.stringify(policies)}`,
        `stateDir: ${JSON.stringify(join(work, `state-${vm.host}`))}`,
        'vms:',
        `  - { name: ${vm.name}, disks: [{ path: ${JSON.stringify(vm.disk)}, format: qcow2 }] }`,
        '',
      ].join('\n'));
      workers.push(start(['worker', '--host', vm.host], { ...s3.env, VMVAULT_CONFIG: configFile }));
    }
    const output = () => workers.map((w) => w.output()).join('\n');
    await waitFor('the three workers', () => (output().match(/worker started/g) ?? []).length >= HOSTS.length, 60_000, output);

    /** Per round, per VM: the backup id and a copy of the image as it was backed up. */
    const made: Array<Array<{ id: string; image: string }>> = [];
    for (let round = 1; round <= ROUNDS; round++) {
      // Small differences: two chunks per VM and round (a chunk of round 1 comes back in round 3).
      for (const [n, vm] of vms.entries()) {
        await writePattern(vm.disk, 'qcow2', (10 + n) * CHUNK, CHUNK, 0x80 + round * 8 + n);
        await writePattern(vm.disk, 'qcow2', (40 + round * 4 + n) * CHUNK, CHUNK / 2, round === 3 ? 0x80 + 8 + n : 0xc0 + round * 8 + n);
      }
      if (round === 3) {
        // The prune jobs round 2's commits enqueued may not have run yet: prune now, so that gc has something to delete.
        const pruning = await cli(['prune', '--policy', join(policies, 'fleet.yaml')], env);
        assert.equal(pruning.code, 0, pruning.stderr);
        const gc = await cliJson(['gc'], env);
        assert.ok(gc.chunksDeleted > 0, `gc between rounds deletes the chunks only pruned backups used (${JSON.stringify(gc)})`);
      }
      const jobs = await Promise.all(vms.map((vm, n) => enqueueBackup(queues[n]!, { vm: vm.name, disks: [{ path: vm.disk, format: 'qcow2' }], policy: 'fleet' }, { jobId: `round${round}-${vm.name}` })));
      const done: Job[] = [];
      for (const [n, job] of jobs.entries()) {
        let finished: Job | undefined;
        await waitFor(`backup of ${vms[n]!.name} in round ${round}`, async () => {
          const state = await (await Job.fromId(queues[n]!, job.id!))?.getState();
          // Read again once finished: a job read just before it completed has no return value yet.
          if (state === 'completed' || state === 'failed') finished = await Job.fromId(queues[n]!, job.id!);
          return finished !== undefined;
        }, 180_000, output, 200);
        assert.equal(await finished!.getState(), 'completed', `${finished!.failedReason}\n${output()}`);
        done.push(finished!);
      }
      const copies = [];
      for (const [n, vm] of vms.entries()) {
        const image = join(work, `${vm.name}-round${round}.qcow2`);
        await copyFile(vm.disk, image);
        copies.push({ id: (done[n]!.returnvalue as BackupJobResult).id, image });
      }
      made.push(copies);
    }

    // Prune jobs were enqueued by each commit; run it once more from the CLI so that it is done.
    const pruned = await cli(['prune', '--policy', join(policies, 'fleet.yaml')], env);
    assert.equal(pruned.code, 0, pruned.stderr);
    const kept = (await cliJson<Array<{ id: string; vm: string }>>(['backups'], env));
    assert.deepEqual(kept.map((b) => b.vm).sort(), vms.map((v) => v.name), 'one backup per VM kept (keepLast 1)');
    for (const [n, vm] of vms.entries()) {
      const last = made[ROUNDS - 1]![n]!;
      assert.ok(kept.some((b) => b.id === last.id), `the kept backup of ${vm.name} is its last one`);
      const out = join(work, `restore-${vm.name}`);
      const restored = await cliJson(['restore', last.id, '--to', out], env);
      const disk = restored.files.find((f: { kind: string }) => f.kind === 'disk');
      assert.equal((await compareImages(last.image, disk.path, 'qcow2', 'qcow2')).identical, true, `${vm.name} restores identical`);
    }
    const verify = await cli(['verify', '--read-data'], env);
    assert.equal(verify.code, 0, `${verify.stdout}\n${verify.stderr}`);

    // Uploads per chunk, by host.
    type Put = { host: string; start: number; end: number };
    const putsByKey = new Map<string, Put[]>();
    const heads = new Map<string, Array<Put & { status: number }>>();
    for (const [n, p] of proxies.entries()) {
      for (const r of p.log) {
        if (!r.path.includes('/chunks/') || r.end === undefined) continue;
        const key = objectKey(r.path);
        const entry = { host: HOSTS[n]!, start: r.start + p.startedAt, end: r.end + p.startedAt };
        if (r.method === 'PUT' && r.status === 200) putsByKey.set(key, [...(putsByKey.get(key) ?? []), entry]);
        if (r.method === 'HEAD') heads.set(key, [...(heads.get(key) ?? []), { ...entry, status: r.status ?? 0 }]);
      }
    }
    let duplicates = 0;
    let overlapping = 0;
    for (const [key, puts] of putsByKey) {
      puts.sort((a, b) => a.end - b.end);
      const first = puts[0]!;
      for (const dup of puts.slice(1)) {
        duplicates++;
        // Its host asked (HEAD → 404) before the first upload of this chunk had finished.
        const asked = (heads.get(key) ?? []).filter((h) => h.host === dup.host && h.status === 404 && h.start <= first.end && h.end <= dup.start + 1);
        if (dup.host !== first.host && asked.length > 0) overlapping++;
        else assert.fail(`chunk ${key} was uploaded again by ${dup.host} outside the race window: first upload by ${first.host} ended at ${first.end}, this one started at ${dup.start}`);
      }
    }
    const unique = putsByKey.size;
    const totalPuts = [...putsByKey.values()].reduce((n, p) => n + p.length, 0);
    console.log(`# many hosts: ${HOSTS.length} hosts × ${ROUNDS} rounds, ${CHUNKS} chunks per image; ${unique} distinct chunks stored with ${totalPuts} PUTs: `
      + `${duplicates} uploaded twice, every one while another host was uploading the same chunk (a whole image would be ${CHUNKS})`);
    assert.equal(overlapping, duplicates);
  } finally {
    for (const w of workers) await stopProc(w).catch(() => {});
    for (const q of queues) await q.close().catch(() => {});
    await closeRedis(producer);
  }
});

/**
 * Scheduled backups as the service runs them: a host worker that is already running
 * (repository open, key derived once) takes backup jobs from its queue, against restic
 * started per backup as a cron job would. Measures, side by side in one run, the time
 * from enqueueing a job to its completion for an unchanged VM and for an incremental
 * after 2% of the disk changed, on a copy of bench/run.sh's 4 GiB image.
 *
 *   npm run build && node dist/bench/worker.js IMAGE WORKDIR [ROUNDS]
 *
 * (bench/worker.sh does this with run.sh's image.) Prints a table and writes
 * bench/results/worker.json.
 */
import { execa } from 'execa';
import { copyFile, mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { QueueEvents } from 'bullmq';
import { pino } from 'pino';
import { startEmbeddedRedis } from '../src/queue/embedded-redis.js';
import { createConnection } from '../src/queue/connection.js';
import { enqueueBackup, hostQueue } from '../src/queue/enqueue.js';
import { Repository } from '../src/repo/repository.js';
import { openStorage } from '../src/storage/open.js';
import { restore } from '../src/pipeline/restore.js';
import { startHostWorker, type BackupJobResult } from '../workers/host-agent.js';

const [image, work, roundsArg] = process.argv.slice(2);
if (!image || !work) {
  process.stderr.write('usage: node dist/bench/worker.js IMAGE WORKDIR [ROUNDS]\n');
  process.exit(2);
}
const ROUNDS = Number(roundsArg ?? 3);
const MiB = 1024 * 1024;
const PASS = 'bench-passphrase';
const RESULTS = new URL('../../bench/results/worker.json', import.meta.url);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const secondsOf = async (fn: () => Promise<unknown>) => {
  const t = performance.now();
  await fn();
  return +((performance.now() - t) / 1000).toFixed(3);
};

await rm(work, { recursive: true, force: true });
await mkdir(work, { recursive: true });
const vDisk = join(work, 'disk.qcow2');
const rDisk = join(work, 'disk-restic.qcow2');
await copyFile(image, vDisk);
await copyFile(image, rDisk);
const redis = await startEmbeddedRedis({ dir: work, socketPath: join(work, 'redis.sock') });
const repoUrl = join(work, 'repo-vmvault');
await Repository.init(openStorage(repoUrl), PASS);
const resticRepo = join(work, 'repo-restic');
const resticEnv = { RESTIC_PASSWORD: PASS, RESTIC_REPOSITORY: resticRepo, RESTIC_CACHE_DIR: join(work, 'restic-cache') };
await execa('restic', ['init'], { env: resticEnv });

const worker = await startHostWorker({ host: 'bench', redisUrl: redis.url, repoUrl, passphrase: PASS, logger: pino({ level: 'silent' }), stateDir: join(work, 'state'), progressIntervalMs: 1000 });
const connection = createConnection(redis.url, 'producer');
const queue = hostQueue(connection, 'bench');
const eventsConnection = createConnection(redis.url, 'worker');
const events = new QueueEvents(queue.name, { connection: eventsConnection });
await events.waitUntilReady();

/** One backup job, from enqueueing to completion. */
async function job(): Promise<{ seconds: number; result: BackupJobResult }> {
  let result: BackupJobResult | undefined;
  const seconds = await secondsOf(async () => {
    const j = await enqueueBackup(queue, { vm: 'bench', disks: [{ path: vDisk, name: 'root', format: 'qcow2' }] });
    result = await j.waitUntilFinished(events) as BackupJobResult;
  });
  return { seconds, result: result! };
}
const restic = () => secondsOf(() => execa('restic', ['backup', '--json', rDisk], { env: resticEnv }));
/** 20 of the 1024 4-MiB regions (in bench/run.sh's data slots) get 1 MiB of a new pattern, on both copies. */
async function change(round: number): Promise<void> {
  const regions = new Set<number>();
  let seed = 7 + round;
  while (regions.size < 20) {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    regions.add(((seed >> 8) % 32) * 2 * 16 + ((seed >> 3) % 16));
  }
  const cmds = [...regions].flatMap((r, i) => ['-c', `write -P ${0x80 + round * 20 + i} ${r * 4 * MiB} 1M`]);
  for (const f of [vDisk, rDisk]) await execa('qemu-io', ['-f', 'qcow2', ...cmds, f]);
}

let last = '';
const runs: Record<string, { seconds: number; mode?: string; bytesRead?: number; jobSeconds?: number }[]> = {};
const add = (k: string, r: { seconds: number; mode?: string; bytesRead?: number; jobSeconds?: number }) => (runs[k] ??= []).push(r);
try {
  const first = await job();
  add('full.vmvault', { seconds: first.seconds, mode: first.result.disks[0]!.mode });
  add('full.restic', { seconds: await restic() });
  for (let round = 1; round <= ROUNDS; round++) {
    const s = await job();
    add('same.vmvault', { seconds: s.seconds, mode: s.result.disks[0]!.mode, bytesRead: s.result.stats.bytesRead, jobSeconds: s.result.stats.seconds });
    add('same.restic', { seconds: await restic() });
  }
  for (let round = 1; round <= ROUNDS; round++) {
    await change(round);
    const s = await job();
    add('incr.vmvault', { seconds: s.seconds, mode: s.result.disks[0]!.mode, bytesRead: s.result.stats.bytesRead, jobSeconds: s.result.stats.seconds });
    add('incr.restic', { seconds: await restic() });
    last = s.result.id;
  }
} finally {
  await worker.close();
  await events.close();
  await queue.close();
  connection.disconnect();
  eventsConnection.disconnect();
  await redis.stop('SIGKILL');
}
// The last incremental restores identical to the disk (which nothing wrote since).
const repo = await Repository.open(openStorage(repoUrl), PASS, { cacheDir: false });
const restored = await restore(repo, { backupId: last, to: join(work, 'restored'), format: 'raw' });
await execa('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', vDisk, restored.files[0]!.path]);

const row = (name: string, key: string, goal: number) => {
  const v = median(runs[`${key}.vmvault`]!.map((r) => r.seconds));
  const r = median(runs[`${key}.restic`]!.map((x) => x.seconds));
  return { case: name, vmvaultSeconds: v, resticSeconds: r, vmvaultOverRestic: +(v / r).toFixed(3), goal, goalMet: v / r <= goal };
};
const rows = [row('unchanged VM (qcow2)', 'same', 0.5), row('2% changed, bitmap incremental', 'incr', 0.1)];
const problems = [...runs['same.vmvault']!, ...runs['incr.vmvault']!].filter((r) => r.mode !== 'incremental').map((r) => `a backup was ${r.mode}, not incremental`);
const out = {
  date: new Date().toISOString(),
  what: 'vmvault: a running host worker (vmvault worker) takes backup jobs from its queue; seconds from enqueueing to completion. restic: `restic backup` of the qcow2 file, started per backup. Same qemu-io writes on both copies.',
  loadAverage: (await import('node:os')).loadavg()[0],
  rows, runs, problems,
};
await writeFile(RESULTS, JSON.stringify(out, null, 2) + '\n');
for (const r of rows) {
  console.log(`${r.case.padEnd(32)} vmvault ${r.vmvaultSeconds.toFixed(3)} s  restic ${r.resticSeconds.toFixed(3)} s  vmvault/restic ${r.vmvaultOverRestic} (goal <= ${r.goal}: ${r.goalMet ? 'yes' : 'NO'})`);
}
for (const p of problems) console.error(`bench: ${p}`);
console.log(`full backup, for reference: vmvault ${runs['full.vmvault']![0]!.seconds} s, restic ${runs['full.restic']![0]!.seconds} s; the last incremental restores identical`);
await rm(work, { recursive: true, force: true });

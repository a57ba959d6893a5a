/**
 * What Content-MD5 on every S3 put costs (see src/storage/s3.ts):
 *  1. MD5 throughput over 4 MiB buffers on one core (it runs on the main thread, where
 *     the uploads are sent from);
 *  2. S3Storage.put of 4 MiB objects, 8 at a time, to a null S3 server (a child process
 *     that reads each body and answers 200), with and without Content-MD5;
 *  3. set against the full backup of bench/results/latest.json: the MD5 of the bytes it
 *     stored, in seconds of one core, as a share of that backup's wall time.
 *
 *   npm run build && node dist/bench/s3-checksum.js     # OBJECTS=64 ROUNDS=3; about 15 s
 *
 * Writes bench/results/s3-checksum.json.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { S3Storage } from '../src/storage/s3.js';

const MiB = 1024 * 1024;
const OBJECT = 4 * MiB;
const OBJECTS = Number(process.env['OBJECTS'] ?? 64);
const ROUNDS = Number(process.env['ROUNDS'] ?? 3);
const IN_FLIGHT = 8;
const RESULTS = fileURLToPath(new URL('../../bench/results/', import.meta.url));

const NULL_S3 = `
const http = require('http');
const srv = http.createServer((req, res) => { req.resume(); req.on('end', () => { res.writeHead(200, { ETag: '"0"' }); res.end(); }); });
srv.keepAliveTimeout = 60000;
srv.listen(0, '127.0.0.1', () => process.send(srv.address().port));
process.on('disconnect', () => process.exit(0));
`;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function md5MiBps(buffers: Buffer[]): number {
  for (const b of buffers.slice(0, 4)) createHash('md5').update(b).digest(); // warm up
  const t = process.hrtime.bigint();
  for (const b of buffers) createHash('md5').update(b).digest('base64');
  return (buffers.length * OBJECT) / MiB / (Number(process.hrtime.bigint() - t) / 1e9);
}

async function putMiBps(endpoint: string, buffers: Buffer[], contentMd5: boolean): Promise<number> {
  const s3 = new S3Storage({ bucket: 'bench', endpoint, forcePathStyle: true, contentMd5 });
  try {
    await s3.put('warm', buffers[0]!);
    const t = process.hrtime.bigint();
    let next = 0;
    await Promise.all(Array.from({ length: IN_FLIGHT }, async () => {
      while (next < buffers.length) {
        const i = next++;
        await s3.put(`chunks/${i}`, buffers[i]!);
      }
    }));
    return (buffers.length * OBJECT) / MiB / (Number(process.hrtime.bigint() - t) / 1e9);
  } finally {
    await s3.close();
  }
}

Object.assign(process.env, { AWS_ACCESS_KEY_ID: 'bench', AWS_SECRET_ACCESS_KEY: 'bench', AWS_REGION: 'us-east-1', AWS_EC2_METADATA_DISABLED: 'true', AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' });
const child = spawn(process.execPath, ['-e', NULL_S3], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
try {
  const port = await new Promise<number>((resolve, reject) => { child.once('message', (p) => resolve(p as number)); child.once('exit', () => reject(new Error('the null S3 server exited'))); });
  const endpoint = `http://127.0.0.1:${port}`;
  const buffers = Array.from({ length: OBJECTS }, () => randomBytes(OBJECT));
  const md5: number[] = [];
  const withMd5: number[] = [];
  const without: number[] = [];
  for (let r = 0; r < ROUNDS; r++) { // alternated, so drift in the machine's load hits both alike
    md5.push(md5MiBps(buffers));
    without.push(await putMiBps(endpoint, buffers, false));
    withMd5.push(await putMiBps(endpoint, buffers, true));
  }
  type Run = { seconds: number; repositoryBytes: number };
  const latest = JSON.parse(await readFile(`${RESULTS}latest.json`, 'utf8')) as { runs: Record<string, Run | Run[]> };
  const recorded = latest.runs['full.vmvault']!; // one run, or (since bench/run.sh repeats steps) a list of runs
  const full = Array.isArray(recorded) ? recorded[0]! : recorded;
  const storedMiB = full.repositoryBytes / MiB;
  const md5Seconds = storedMiB / median(md5);
  const result = {
    date: new Date().toISOString(),
    machine: { cpus: availableParallelism(), loadAverage: loadavg()[0], node: process.version },
    objectMiB: OBJECT / MiB, objects: OBJECTS, rounds: ROUNDS, putsInFlight: IN_FLIGHT,
    md5MiBpsOneCore: Math.round(median(md5)),
    putMiBpsWithoutMd5: Math.round(median(without)),
    putMiBpsWithMd5: Math.round(median(withMd5)),
    putThroughputWithOverWithout: +(median(withMd5) / median(without)).toFixed(3),
    fullBackup: {
      from: 'bench/results/latest.json (local repository)',
      seconds: full.seconds, storedMiB: Math.round(storedMiB),
      storedMiBps: Math.round(storedMiB / full.seconds),
      md5CoreSeconds: +md5Seconds.toFixed(2),
      md5ShareOfWallTime: +(md5Seconds / full.seconds).toFixed(3),
    },
  };
  console.log(JSON.stringify(result, null, 2));
  await writeFile(`${RESULTS}s3-checksum.json`, JSON.stringify(result, null, 2) + '\n');
} finally {
  child.kill();
}

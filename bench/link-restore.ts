/**
 * Restore through a signed link with stock qemu-img (QEMU's curl driver), against
 * the restore pipeline writing the same disk locally. Counts runs that stall (killed
 * after STALL_S seconds) as well as timing the others.
 *
 *   npm run build && node dist/bench/link-restore.js          # RUNS=10 DATA_MIB=96 SIZE_MIB=256 STALL_S=30
 *
 * Everything lives in a temporary directory removed at the end.
 */
import { execa } from 'execa';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { serve } from '@hono/node-server';
import type { AddressInfo } from 'node:net';
import { pino } from 'pino';
import { createApi } from '../src/api/app.js';
import { linkKey, signLink } from '../src/api/links.js';
import { parseConfig } from '../src/config/load.js';
import { backupVm } from '../src/vm/drivers.js';
import { restore } from '../src/pipeline/restore.js';
import { createRedis } from '../src/queue/connection.js';
import { Repository } from '../src/repo/repository.js';
import { LocalStorage } from '../src/storage/local.js';

const env = (name: string, dflt: number) => Number(process.env[name] ?? dflt);
const RUNS = env('RUNS', 10);
const DATA_MIB = env('DATA_MIB', 96);
const SIZE_MIB = env('SIZE_MIB', 256);
const STALL_S = env('STALL_S', 30);

const w = await mkdtemp(join(tmpdir(), 'vmvault-bench-link-'));
try {
  await execa('dd', ['if=/dev/urandom', `of=${w}/data.raw`, 'bs=1M', `count=${DATA_MIB}`, 'status=none']);
  await execa('truncate', ['-s', `${SIZE_MIB}M`, `${w}/data.raw`]);
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', `${w}/data.raw`, `${w}/src.qcow2`]);
  await rm(`${w}/data.raw`);
  const repo = await Repository.init(new LocalStorage(`${w}/repo`), 'bench', { kdf: 'weak' });
  const { manifest } = await backupVm(repo, { vm: 'bench', driver: 'image', disks: [{ path: `${w}/src.qcow2`, name: 'root', format: 'qcow2' }] });

  // The API needs Redis only for jobs; the disk routes never touch it.
  const redis = createRedis('redis://127.0.0.1:1', 'producer', { lazyConnect: true });
  redis.on('error', () => {});
  const api = createApi({ config: parseConfig('vms: []\n', 'bench.yaml', { host: 'bench' }), repo, redis, log: pino({ level: 'warn' }) });
  const server = serve({ fetch: api.app.fetch, hostname: '127.0.0.1', port: 0 });
  await new Promise((r) => server.once('listening', r));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/links/${signLink(linkKey(repo.keys.macKey), { backup: manifest.id, disk: 'root', expires: Math.floor(Date.now() / 1000) + 86400 })}`;

  const link: number[] = [];
  let stalled = 0;
  for (let i = 0; i < RUNS; i++) {
    const t = Date.now();
    const r = await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', url, `${w}/out.qcow2`], { timeout: STALL_S * 1000, reject: false });
    if (r.timedOut) stalled++;
    else if (r.exitCode !== 0) throw new Error(`qemu-img convert failed: ${r.stderr}`);
    else {
      link.push(Date.now() - t);
      const c = await execa('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', `${w}/src.qcow2`, `${w}/out.qcow2`], { reject: false });
      if (c.exitCode !== 0) throw new Error('the image pulled through the link differs from the source');
    }
    await rm(`${w}/out.qcow2`, { force: true });
  }
  const local: number[] = [];
  for (let i = 0; i < Math.min(RUNS, 3); i++) {
    const t = Date.now();
    await restore(repo, { backupId: manifest.id, to: `${w}/local-${i}`, format: 'qcow2' });
    local.push(Date.now() - t);
    await rm(`${w}/local-${i}`, { recursive: true, force: true });
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
  console.log(JSON.stringify({
    image: { sizeMiB: SIZE_MIB, dataMiB: DATA_MIB }, runs: RUNS, stalled,
    linkMedianMs: median(link), localRestoreMedianMs: median(local), linkOverLocal: +(median(link) / median(local)).toFixed(2),
  }, null, 2));
  server.close();
  await api.close();
  redis.disconnect();
} finally {
  await rm(w, { recursive: true, force: true });
}
process.exit(0);

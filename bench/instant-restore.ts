/**
 * Instant restore against a full restore of the same backup: the time from the
 * command to the VM's first QMP answer (`vmvault restore --instant --start`), the time
 * until the copy has pivoted, and the time a plain `vmvault restore` takes before a VM
 * could start at all. Both run the real CLI.
 *
 *   npm run build && node dist/bench/instant-restore.js      # SIZE_MIB=4096 DATA_MIB=256 RATE=0
 *
 * The disk: SIZE_MIB of raw, mostly zeros, with DATA_MIB of random bytes in 32 MiB
 * slots spread over it. QEMU runs under software emulation (no guest OS). Everything
 * lives in a temporary directory removed at the end.
 */
import { execa } from 'execa';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { backupVm } from '../src/vm/drivers.js';
import { QmpClient } from '../src/vm/qmp.js';
import { Repository } from '../src/repo/repository.js';
import { LocalStorage } from '../src/storage/local.js';

const env = (name: string, dflt: number) => Number(process.env[name] ?? dflt);
const SIZE_MIB = env('SIZE_MIB', 4096);
const DATA_MIB = env('DATA_MIB', 256);
const RATE = process.env.RATE ?? '0';
const BIN = fileURLToPath(new URL('../../bin/vmvault.js', import.meta.url));
const PASS = 'bench passphrase';

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'vmvault-bench-instant-'));
  let qemuPid: number | undefined;
  try {
    const src = join(work, 'disk.raw');
    await execa('qemu-img', ['create', '-q', '-f', 'raw', src, `${SIZE_MIB}M`]);
    const slots = Math.ceil(DATA_MIB / 32);
    const stride = Math.floor(SIZE_MIB / slots);
    for (let i = 0; i < slots; i++) {
      await execa('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', 'count=32', `seek=${i * stride}`, 'conv=notrunc', 'status=none']);
    }
    const repoPath = join(work, 'repo');
    const repo = await Repository.init(new LocalStorage(repoPath), PASS, { kdf: 'weak' });
    const id = (await backupVm(repo, { vm: 'bench', driver: 'image', disks: [{ path: src, name: 'root', format: 'raw' }] })).manifest.id;
    const cliEnv = { ...process.env, VMVAULT_REPOSITORY: repoPath, VMVAULT_PASSWORD: PASS };

    let t = Date.now();
    await execa(process.execPath, [BIN, 'restore', id, '--to', join(work, 'full'), '--json'], { env: cliEnv });
    const full = (Date.now() - t) / 1000;
    await execa('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, join(work, 'full', 'root.raw')]);

    const to = join(work, 'instant');
    const sock = join(to, 'qmp.sock');
    t = Date.now();
    const proc = execa(process.execPath, [BIN, 'restore', id, '--instant', '--to', to, '--start', '--machine', 'pc,accel=tcg', '--memory', '128', ...(RATE !== '0' ? ['--rate', RATE] : []), '--json'], { env: cliEnv });
    let qmp: QmpClient | undefined;
    while (!qmp) {
      if (existsSync(sock)) qmp = await QmpClient.connect(sock, { timeoutMs: 2000 }).catch(() => undefined);
      if (!qmp) await new Promise((r) => setTimeout(r, 10));
    }
    await qmp.execute('query-status');
    const firstAnswer = (Date.now() - t) / 1000;
    qemuPid = Number((await readFile(join(to, 'qemu.pid'), 'utf8')).trim());
    await proc;
    const pivoted = (Date.now() - t) / 1000;
    await qmp.execute('quit').catch(() => undefined);
    await qmp.close();
    for (let i = 0; i < 100 && existsSync(`/proc/${qemuPid}`); i++) await new Promise((r) => setTimeout(r, 100));
    await execa('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, join(to, 'root.raw')]);

    const rows = [
      ['full restore (vmvault restore), until the disk is written', full],
      ['instant restore: command to the VM\'s first QMP answer', firstAnswer],
      ['instant restore: command to the pivot (copy done, export stopped)', pivoted],
    ] as const;
    console.log(`disk: ${SIZE_MIB} MiB raw, ${slots * 32} MiB random data, rest zeros; copy rate ${RATE === '0' ? 'unlimited' : RATE}/s`);
    for (const [what, s] of rows) console.log(`${what.padEnd(70)} ${s.toFixed(2).padStart(8)} s`);
    console.log(`both restored images compare equal to the source (qemu-img compare)`);
  } finally {
    if (qemuPid && existsSync(`/proc/${qemuPid}`)) process.kill(qemuPid, 'SIGKILL');
    await rm(work, { recursive: true, force: true });
  }
}

await main();

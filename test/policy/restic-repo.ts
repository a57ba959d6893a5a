/**
 * A real restic repository for comparing our retention planner with
 * `restic forget --dry-run`, made fast enough for a test.
 *
 * `restic init` and a few real `restic backup --time` runs make the repository and
 * its data; then, since each restic run spends ~0.5 s deriving the key (scrypt) and a
 * backup per generated time would take minutes, the helper
 * - re-seals the master key under weak scrypt parameters (like restic's own
 *   TestUseLowSecurityKDFParameters), and
 * - writes further snapshots directly: a snapshot is an encrypted JSON file named by
 *   the SHA-256 of its bytes (restic design document, "Snapshots"), sealed like
 *   every restic file: IV ‖ AES-256-CTR(plaintext) ‖ Poly1305-AES(ciphertext).
 * restic then reads these as it reads its own; a mistake here makes restic fail
 * loudly (bad MAC, bad id), never agree silently.
 */
import { createCipheriv, createHash, randomBytes, scryptSync } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';

export interface ResticVersion { text: string; major: number; minor: number; patch: number }

/** The installed restic's version, or undefined when `restic` is not on PATH. */
export async function resticVersion(): Promise<ResticVersion | undefined> {
  const r = await execa('restic', ['version'], { reject: false });
  const m = /restic (\d+)\.(\d+)\.(\d+)/.exec(String(r.stdout));
  if (r.exitCode !== 0 || !m) return undefined;
  return { text: `restic ${m[1]}.${m[2]}.${m[3]}`, major: Number(m[1]), minor: Number(m[2]), patch: Number(m[3]) };
}

/** restic ≥ 0.16 keeps the oldest snapshot while a rule has counts left, and knows `unlimited`. */
export const hasOldestRule = (v: Pick<ResticVersion, 'major' | 'minor'>) => v.major > 0 || v.minor >= 16;

// ---- restic's crypto (internal/crypto/crypto.go) -------------------------------

interface Keys { enc: Buffer; k: Buffer; r: Buffer }

const le = (b: Buffer) => BigInt(`0x${Buffer.from(b).reverse().toString('hex') || '0'}`);

function poly1305(msg: Buffer, r16: Buffer, s16: Buffer): Buffer {
  const r = le(r16) & 0x0ffffffc0ffffffc0ffffffc0fffffffn;
  const p = (1n << 130n) - 5n;
  let acc = 0n;
  for (let i = 0; i < msg.length; i += 16) {
    const block = msg.subarray(i, i + 16);
    acc = ((acc + le(block) + (1n << BigInt(8 * block.length))) * r) % p;
  }
  acc = (acc + le(s16)) & ((1n << 128n) - 1n);
  return Buffer.from(acc.toString(16).padStart(32, '0'), 'hex').reverse();
}

function mac(keys: Keys, nonce: Buffer, ciphertext: Buffer): Buffer {
  const aes = createCipheriv('aes-128-ecb', keys.k, null).setAutoPadding(false);
  return poly1305(ciphertext, keys.r, aes.update(nonce));
}

function open(keys: Keys, data: Buffer): Buffer {
  const nonce = data.subarray(0, 16);
  const ct = data.subarray(16, data.length - 16);
  if (!mac(keys, nonce, ct).equals(data.subarray(data.length - 16))) throw new Error('restic-repo: MAC mismatch (wrong password or format)');
  const d = createCipheriv('aes-256-ctr', keys.enc, nonce);
  return Buffer.concat([d.update(ct), d.final()]);
}

function seal(keys: Keys, plaintext: Buffer): Buffer {
  const nonce = randomBytes(16);
  const c = createCipheriv('aes-256-ctr', keys.enc, nonce);
  const ct = Buffer.concat([c.update(plaintext), c.final()]);
  return Buffer.concat([nonce, ct, mac(keys, nonce, ct)]);
}

const split64 = (b: Buffer): Keys => ({ enc: b.subarray(0, 32), k: b.subarray(32, 48), r: b.subarray(48, 64) });
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

// ---- the repository ------------------------------------------------------------

const PASSWORD = 'vmvault-test';

export interface ResticRepo {
  dir: string;
  /** Runs restic on this repository (no cache; TZ=UTC unless `tz`) and returns its stdout; with `reject` false a failure returns it too. */
  restic(args: string[], options?: { reject?: boolean; tz?: string }): Promise<string>;
  /** A real `restic backup --time` of a tiny file, as host `host`. */
  backup(host: string, time: Date): Promise<void>;
  /**
   * Writes a snapshot of the same tree with this host and time, without running restic.
   * With `zone`, the time is recorded with that zone's offset, as a backup taken on a
   * host in that zone would be; restic run with TZ=zone then reads it in that zone.
   */
  addSnapshot(host: string, time: Date, zone?: string): Promise<void>;
  close(): Promise<void>;
}

/** `restic init` in a temporary directory, with a fast key and a first real backup. */
export async function createResticRepo(): Promise<ResticRepo> {
  const dir = await mkdtemp(join(tmpdir(), 'vmvault-restic-'));
  const repo = join(dir, 'repo');
  const env = { RESTIC_PASSWORD: PASSWORD, TZ: 'UTC', RESTIC_CACHE_DIR: join(dir, 'cache') };
  const restic = async (args: string[], o: { reject?: boolean; tz?: string } = {}) =>
    String((await execa('restic', ['--repo', repo, '--no-cache', '-q', ...args], { env: { ...env, TZ: o.tz ?? 'UTC' }, reject: o.reject ?? true })).stdout);
  await execa('restic', ['init', '--repo', repo, '-q'], { env });
  const master = await weakenKey(repo);
  const file = join(dir, 'disk.img');
  await writeFile(file, 'vmvault restic comparison\n');
  const stamp = (t: Date) => t.toISOString().slice(0, 19).replace('T', ' ');
  const backup = async (host: string, time: Date) => {
    await restic(['backup', '--host', host, '--time', stamp(time), file]);
  };
  await backup('template', new Date('2000-01-01T00:00:00Z'));
  const [template] = JSON.parse(await restic(['snapshots', '--json'])) as Array<{ tree: string }>;
  const addSnapshot = async (host: string, time: Date, zone?: string) => {
    const json = { time: zone ? isoInZone(time, zone) : time.toISOString(), tree: template!.tree, paths: [file], hostname: host, username: 'vmvault' };
    const sealed = seal(master, Buffer.from(JSON.stringify(json)));
    await writeFile(join(repo, 'snapshots', sha256(sealed)), sealed);
  };
  return { dir: repo, restic, backup, addSnapshot, close: () => rm(dir, { recursive: true, force: true }) };
}

/** `2024-10-27T02:30:00+01:00`: the wall clock of `time` in `zone`, with its offset. */
export function isoInZone(time: Date, zone: string): string {
  const f = new Intl.DateTimeFormat('en-US', { timeZone: zone, hourCycle: 'h23', year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  const p = Object.fromEntries(f.formatToParts(time).map((x) => [x.type, x.value]));
  const wall = `${p.year}-${p.month}-${p.day}T${p.hour}:${p.minute}:${p.second}`;
  const offset = Math.round((Date.parse(`${wall}Z`) - Math.floor(time.getTime() / 1000) * 1000) / 60000);
  const abs = Math.abs(offset);
  return `${wall}${offset < 0 ? '-' : '+'}${String(Math.floor(abs / 60)).padStart(2, '0')}:${String(abs % 60).padStart(2, '0')}`;
}

/** Re-seals the repository's master key with N=1024 scrypt; returns the master key. */
async function weakenKey(repo: string): Promise<Keys> {
  const [name] = await readdir(join(repo, 'keys'));
  const key = JSON.parse(await readFile(join(repo, 'keys', name!), 'utf8')) as { N: number; r: number; p: number; salt: string; data: string };
  const user = split64(scryptSync(PASSWORD, Buffer.from(key.salt, 'base64'), 64, { N: key.N, r: key.r, p: key.p, maxmem: 1 << 30 }));
  const masterJson = open(user, Buffer.from(key.data, 'base64'));
  const m = JSON.parse(masterJson.toString()) as { encrypt: string; mac: { k: string; r: string } };
  const salt = randomBytes(64);
  const weak = { ...key, N: 1024, r: 8, p: 1, salt: salt.toString('base64'), data: '' };
  weak.data = seal(split64(scryptSync(PASSWORD, salt, 64, { N: 1024, r: 8, p: 1 })), masterJson).toString('base64');
  const bytes = Buffer.from(JSON.stringify(weak));
  await writeFile(join(repo, 'keys', sha256(bytes)), bytes);
  await unlink(join(repo, 'keys', name!));
  return { enc: Buffer.from(m.encrypt, 'base64'), k: Buffer.from(m.mac.k, 'base64'), r: Buffer.from(m.mac.r, 'base64') };
}

/**
 * The service configuration file (`vmvault.yaml`), as a zod schema. Rules that span
 * several keys (unique names, known hosts, the QMP socket of a qemu VM) are in
 * `checkConfig`, which runs on the raw value even when the schema fails, so that
 * an operator sees every problem of a file at once. See `vmvault.example.yaml`.
 *
 * Unknown keys are errors: a typo must not silently leave a VM out of its backups.
 */
import { hostname } from 'node:os';
import { isIP } from 'node:net';
import { isAbsolute } from 'node:path';
import * as z from 'zod';
import { IMAGE_FORMATS } from '../disk/image-format.js';
import { diskNameFromPath } from '../pipeline/names.js';
import { formatPath, type YamlIssue, type YamlPosition } from '../policy/load.js';
import { NAME_RE, cronSchedule, nameRule } from '../policy/schema.js';
import { isValidTimeZone } from '../policy/retention.js';
import { parseRepositoryUrl } from '../storage/open.js';
import { formatRedisUrl, parseRedisUrl } from './redis.js';
import { ALERT_KEYS, alertsSchema } from './alerts.js';

export const DEFAULT_STATE_DIR = '/var/lib/vmvault';
export const DEFAULT_POLICIES_DIR = 'policies';
export const DEFAULT_LISTEN = '127.0.0.1:8740';
export const DEFAULT_PASSWORD_ENV = 'VMVAULT_PASSWORD';

/** VM and host names end up in job ids and queue names (BullMQ forbids ":"). */
const name = (what: string) => z.string({ error: `expected a ${what}` }).regex(NAME_RE, `a ${what} is ${nameRule}`);
const nonEmpty = (what: string) => z.string({ error: `expected ${what}` }).min(1, `${what} cannot be empty`);
const absolutePath = (what: string) =>
  z.string({ error: `expected ${what} (an absolute path)` }).refine((p) => isAbsolute(p), `${what} must be an absolute path (it is read on the VM's host)`);
const list = <T extends z.ZodType>(item: T, what: string) => z.array(item, { error: `expected a list of ${what}` }).default([]);

/** `host:port` or `[v6]:port`; undefined when malformed. */
export function parseListen(listen: string): { host: string; port: number } | undefined {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s[\]]+)):(\d{1,5})$/.exec(listen);
  const port = Number(m?.[3]);
  // Port 0: any free port (tests, several services on one machine); the service logs the one it got.
  if (!m || !(port >= 0 && port <= 65535)) return undefined;
  return { host: (m[1] ?? m[2])!, port };
}

const repositoryUrl = z.string({ error: 'expected a repository URL' }).superRefine((url, ctx) => {
  try {
    parseRepositoryUrl(url);
  } catch (err) {
    const why = (err as Error).message.split('\n')[0]!;
    ctx.addIssue({ code: 'custom', message: `${why}; expected s3://BUCKET[/PREFIX][?endpoint=URL&region=R], file:///abs/path or a directory path` });
  }
});

/** A repository and where its passphrase comes from; `needsPassword`: one of passwordFile or passwordEnv must be given (no default variable). */
const repositoryOf = (needsPassword: boolean) => z
  .strictObject({
    url: repositoryUrl,
    passwordFile: nonEmpty('a password file path').optional(),
    passwordEnv: z.string({ error: 'expected an environment variable name' }).regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'expected an environment variable name such as VMVAULT_PASSWORD').optional(),
  }, { error: 'expected url and passwordFile or passwordEnv' })
  .superRefine((r, ctx) => {
    if (r.passwordFile !== undefined && r.passwordEnv !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['passwordEnv'], message: 'the password comes from passwordFile or passwordEnv, not both: remove one' });
    }
    if (needsPassword && r.passwordFile === undefined && r.passwordEnv === undefined) {
      ctx.addIssue({ code: 'custom', message: 'give passwordFile or passwordEnv: this repository has a passphrase of its own' });
    }
  })
  .transform((r) => (r.passwordFile !== undefined
    ? { url: r.url, passwordFile: r.passwordFile }
    : { url: r.url, passwordEnv: r.passwordEnv ?? DEFAULT_PASSWORD_ENV }));
const repositorySchema = repositoryOf(false);

const redisUrl = z.string({ error: 'expected a Redis URL' }).superRefine((url, ctx) => {
  try {
    parseRedisUrl(url);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: (err as Error).message.replace(/^bad Redis URL "[^"]*": /, '') });
  }
});

const redisNode = (what: string) => z.strictObject({
  host: nonEmpty(`the ${what}'s host`),
  port: z.number({ error: `expected the ${what}'s port (a number)` }).int().min(1, 'a port is 1 to 65535').max(65535, 'a port is 1 to 65535'),
}, { error: `expected a ${what}: { host, port }` });

/**
 * One Redis server (`url`), a primary found through Redis Sentinel (`sentinels` + `name`),
 * or a Redis Cluster (`cluster`); each becomes one URL (config/redis.ts).
 */
const redisSchema = z.strictObject({
  url: redisUrl.optional(),
  sentinels: z.array(redisNode('Sentinel'), { error: 'expected a list of Sentinels: [{ host, port }]' }).min(1, 'list at least one Sentinel').optional(),
  /** The primary's name, as in the Sentinels' "sentinel monitor NAME host port quorum". */
  name: nonEmpty('the primary\'s name').optional(),
  cluster: z.array(redisNode('cluster node'), { error: 'expected a list of cluster nodes: [{ host, port }]' }).min(1, 'list at least one cluster node').optional(),
  username: nonEmpty('a user name').optional(),
  password: nonEmpty('a password').optional(),
  sentinelPassword: nonEmpty('a password').optional(),
  db: z.number({ error: 'expected a database number' }).int().min(0).max(99).optional(),
  tls: z.boolean({ error: 'expected true or false' }).optional(),
}, { error: 'expected { url }, { sentinels, name } or { cluster }' }).superRefine((r, ctx) => {
  const issue = (path: string, message: string) => ctx.addIssue({ code: 'custom', path: [path], message });
  const forms = [r.url !== undefined && 'url', r.sentinels !== undefined && 'sentinels', r.cluster !== undefined && 'cluster'].filter(Boolean);
  if (forms.length > 1) issue(forms[1] as string, `give one of url, sentinels (with name) or cluster, not ${forms.join(' and ')}`);
  if (r.url !== undefined) {
    for (const k of ['name', 'username', 'password', 'sentinelPassword', 'db', 'tls'] as const) {
      if (r[k] !== undefined) issue(k, `${k} goes with sentinels or cluster; with url, put it in the URL (redis://user:password@host:port/db, rediss:// for TLS)`);
    }
  }
  // Shown at sentinels: an issue at a missing key would only say it is missing.
  if (r.sentinels !== undefined && r.name === undefined) issue('sentinels', 'Sentinels need the name of the primary they watch (as in "sentinel monitor NAME …"): add name');
  if (r.sentinels === undefined && r.name !== undefined) issue('name', 'name is the primary\'s name for Sentinel: add sentinels: [{ host, port }], or remove name');
  if (r.sentinels === undefined && r.sentinelPassword !== undefined) issue('sentinelPassword', 'sentinelPassword needs sentinels');
  if (r.cluster !== undefined && r.db !== undefined) issue('db', 'a Redis Cluster has only database 0: remove db');
  if (forms.length === 0) {
    const stray = (['username', 'password', 'sentinelPassword', 'db', 'tls'] as const).find((k) => r[k] !== undefined);
    if (stray) issue(stray, `${stray} needs url, sentinels or cluster`);
  }
}).transform((r): { url?: string } => {
  const auth = { ...(r.username ? { username: r.username } : {}), ...(r.password !== undefined ? { password: r.password } : {}) };
  if (r.sentinels) {
    return { url: formatRedisUrl({ kind: 'sentinel', sentinels: r.sentinels, name: r.name ?? '', db: r.db ?? 0, ...auth, ...(r.sentinelPassword !== undefined ? { sentinelPassword: r.sentinelPassword } : {}), tls: r.tls ?? false }) };
  }
  if (r.cluster) return { url: formatRedisUrl({ kind: 'cluster', nodes: r.cluster, ...auth, tls: r.tls ?? false }) };
  return r.url !== undefined ? { url: r.url } : {};
});

const diskSchema = z.strictObject({
  path: absolutePath('a disk path'),
  name: name('disk name').optional(),
  /** As the VM uses it; without it vmvault detects it once and pins it (a guest cannot change it later). */
  format: z.enum(IMAGE_FORMATS as readonly ['qcow2', 'raw', 'vmdk', 'vdi'], { error: `expected one of ${IMAGE_FORMATS.join(', ')}` }).optional(),
  /** A linked clone: its backing files (or vmdk extents) are read through it. Without it an image naming another file is refused. */
  allowChain: z.boolean({ error: 'expected true or false' }).optional(),
}, { error: 'expected a disk: { path, name?, format?, allowChain? }' });

export const DRIVERS = ['image', 'qemu', 'libvirt'] as const;

export const vmSchema = z.strictObject({
  name: name('VM name'),
  /** Default: the configuration's own `host`. */
  host: name('host name').optional(),
  driver: z.enum(DRIVERS, { error: `expected a driver: ${DRIVERS.join(', ')}` }).default('image'),
  disks: list(diskSchema, 'disks: [{ path, name? }]'),
  configFiles: list(absolutePath('a configuration file path'), 'configuration file paths'),
  tags: list(nonEmpty('a tag'), 'tags'),
  qmpSocket: absolutePath('a QMP socket path').optional(),
  guestAgentSocket: absolutePath('a guest agent socket path').optional(),
}, { error: 'expected a VM: { name, host, disks, ... }' });

const TOKEN_HINT = 'tokens are stored as hashes only: remove token and put its SHA-256 in sha256 (printf %s TOKEN | sha256sum)';

const tokenSchema = z.strictObject({
  name: nonEmpty('a token name'),
  role: z.enum(['viewer', 'operator', 'admin'], { error: 'expected a role: viewer, operator or admin' }),
  sha256: z.string({ error: 'expected the SHA-256 of the token in hex (printf %s TOKEN | sha256sum)' })
    .regex(/^[0-9A-Fa-f]{64}$/, 'expected 64 hex digits: the SHA-256 of the token (printf %s TOKEN | sha256sum)')
    .transform((h) => h.toLowerCase()),
  /** Present only to say what to do instead: a plain token is always an error. */
  token: z.never({ error: TOKEN_HINT }).optional(),
}, { error: 'expected a token: { name, role, sha256 }' });

const apiSchema = z.strictObject({
  listen: z.string({ error: 'expected host:port' }).refine((l) => parseListen(l) !== undefined, 'expected host:port such as 127.0.0.1:8740 or [::1]:8740').default(DEFAULT_LISTEN),
  tokens: list(tokenSchema, 'tokens: [{ name, role, sha256 }]'),
  /** The API's address as clients reach it (behind a TLS proxy): signed disk links are made with it. */
  publicUrl: z.string({ error: 'expected a URL' }).refine((u) => {
    try {
      const url = new URL(u);
      return (url.protocol === 'https:' || url.protocol === 'http:') && (url.pathname === '/' || url.pathname === '') && !url.search && !url.hash;
    } catch {
      return false;
    }
  }, 'expected the API\'s public origin, such as https://backup.example.com (no path)').optional(),
}, { error: 'expected listen, tokens and publicUrl' });

const hostSchema = z.strictObject({
  restoreRoots: list(absolutePath('a restore root'), 'restore roots (absolute paths)'),
  /** Besides loopback, the one address NBD exports of backups may listen on (POST /v1/backups/{id}/exports). */
  exportAddress: z.string({ error: 'expected an IP address' }).refine((a) => isIP(a) !== 0, 'expected an IP address such as 10.0.0.5 (NBD exports listen on it besides loopback)').optional(),
}, { error: 'expected { restoreRoots: [absolute paths], exportAddress? }' });

/** What `maintenance.verify.readData` accepts: none, all, a percentage, or rotate N (scheduler/maintenance.ts). */
export const READ_DATA_RE = /^(none|all|\d{1,3}(\.\d+)?%|rotate \d{1,4})$/;

/** When the service runs verify and gc (each run is a job on the shared maintenance queue). */
const maintenanceSchema = z.strictObject({
  timezone: z.string({ error: 'expected an IANA time zone such as Europe/Paris' })
    .refine(isValidTimeZone, { error: (iss) => `unknown time zone "${String(iss.input)}": expected an IANA name such as Europe/Paris or UTC` }).optional(),
  verify: z.strictObject({
    schedule: cronSchedule,
    readData: z.string({ error: 'expected none, all, a percentage or rotate N' })
      .regex(READ_DATA_RE, 'expected none (only check chunks exist), all, a percentage such as 10%, or "rotate 7" (the next seventh of the chunks each run)')
      .refine((r) => !/^rotate 0+$/.test(r) && !/^0+(\.0+)?%$/.test(r) && !(r.endsWith('%') && Number(r.slice(0, -1)) > 100), 'rotate N needs N ≥ 1; a percentage is above 0 and at most 100')
      .default('none'),
  }, { error: 'expected { schedule, readData }' }).optional(),
  gc: z.strictObject({ schedule: cronSchedule }, { error: 'expected { schedule }' }).optional(),
  /** An off-site copy: the service's repository copied into `to` (vmvault copy), each run one job. */
  copy: z.strictObject({ schedule: cronSchedule, to: repositoryOf(true) }, { error: 'expected { schedule, to: { url, passwordFile or passwordEnv } }' }).optional(),
}, { error: 'expected { timezone?, verify?: { schedule, readData }, gc?: { schedule }, copy?: { schedule, to } }' });

export const configSchema = z.strictObject({
  repository: repositorySchema.optional(),
  redis: redisSchema.default({}),
  stateDir: nonEmpty('a directory').default(DEFAULT_STATE_DIR),
  host: name('host name').default(() => hostname()),
  /** Default DEFAULT_POLICIES_DIR beside the file; applied by parseConfig, which records that it did. */
  policiesDir: nonEmpty('a directory').optional(),
  vms: list(vmSchema, 'VMs'),
  api: apiSchema.prefault({}),
  hosts: z.record(name('host name'), hostSchema, { error: 'expected a mapping from host name to { restoreRoots }' }).default({}),
  maintenance: maintenanceSchema.default({}),
  /** Where alerts go (webhooks, e-mail): src/config/alerts.ts. */
  alerts: alertsSchema.optional(),
}, { error: 'expected a mapping with repository, redis, host, vms, api, hosts…' });

type Parsed = z.output<typeof configSchema>;
export type RepositoryConfig = NonNullable<Parsed['repository']>;
export type DiskConfig = z.output<typeof diskSchema> & { name: string };
export type VmConfig = Omit<z.output<typeof vmSchema>, 'host' | 'disks'> & { host: string; disks: DiskConfig[] };
export type ApiToken = Omit<z.output<typeof tokenSchema>, 'token'>;
export type Role = ApiToken['role'];
/** A loaded configuration: defaults applied, every VM with its host and disk names, paths absolute. */
export type Config = Omit<Parsed, 'vms' | 'api' | 'policiesDir'> & {
  vms: VmConfig[];
  api: { listen: string; tokens: ApiToken[]; publicUrl?: string };
  policiesDir: string;
  /**
   * True when the file named no policiesDir: the service creates the default one when
   * it is missing, but refuses to start on a named one that is missing (a typo).
   */
  policiesDirDefaulted: boolean;
};

/** Every key the file may use at any level, to suggest a fix for a typo. */
export const CONFIG_KEYS: readonly string[] = [
  ...Object.keys(configSchema.shape), 'url', 'passwordFile', 'passwordEnv',
  ...Object.keys(vmSchema.shape), ...Object.keys(diskSchema.shape), ...Object.keys(apiSchema.shape), 'role', 'sha256', 'restoreRoots', 'exportAddress',
  ...Object.keys(maintenanceSchema.shape), 'schedule', 'readData', 'to', ...ALERT_KEYS,
  'sentinels', 'cluster', 'username', 'password', 'sentinelPassword', 'db', 'tls', 'port',
];

const asObject = (v: unknown): Record<string, unknown> => (v !== null && typeof v === 'object' && !Array.isArray(v) ? v as Record<string, unknown> : {});
const asArray = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);

/** Each repeated value of `key` among `items`, pointing at the later one and naming the earlier. */
function duplicates(items: unknown[], key: string, base: readonly PropertyKey[], what: string, position: YamlPosition): YamlIssue[] {
  const first = new Map<unknown, number>();
  const out: YamlIssue[] = [];
  items.forEach((item, i) => {
    const value = asObject(item)[key];
    if (typeof value !== 'string') return;
    const j = first.get(value);
    if (j === undefined) first.set(value, i);
    else out.push({ path: [...base, i, key], message: `${what} "${value}" is already used by ${formatPath([...base, j], '(config)')} (line ${position([...base, j, key]).line})` });
  });
  return out;
}

/** Rules across keys, on the raw (possibly invalid) value; see the file comment. */
export function checkConfig(raw: unknown, position: YamlPosition, defaultHost: string): YamlIssue[] {
  const top = asObject(raw);
  const self = typeof top.host === 'string' ? top.host : defaultHost;
  const hosts = asObject(top.hosts);
  const vms = asArray(top.vms);
  const out = duplicates(vms, 'name', ['vms'], 'VM name', position);
  vms.forEach((v, i) => {
    const vm = asObject(v);
    const label = typeof vm.name === 'string' ? `VM "${vm.name}"` : `vms[${i}]`;
    if (typeof vm.host === 'string' && vm.host !== self && !Object.hasOwn(hosts, vm.host)) {
      out.push({ path: ['vms', i, 'host'], message: `${label} is on host "${vm.host}", which is neither this host ("${self}") nor listed under hosts` });
    }
    const driver = vm.driver ?? 'image';
    const disks = asArray(vm.disks);
    if ((driver === 'image' || driver === 'qemu') && disks.length === 0) {
      out.push({ path: ['vms', i, 'disks'], message: `${label} needs at least one disk with the ${String(driver)} driver: disks: [{ path: /var/lib/libvirt/images/NAME.qcow2 }]` });
    }
    if (driver === 'qemu' && vm.qmpSocket === undefined) {
      out.push({ path: ['vms', i, 'qmpSocket'], message: `${label} uses the qemu driver, which needs qmpSocket: the path of the running QEMU's QMP socket` });
    }
    const named = disks.map((d) => ({ name: effectiveDiskName(asObject(d)) }));
    for (const dup of duplicates(named, 'name', ['vms', i, 'disks'], 'disk name', position)) {
      const at = dup.path[3] as number;
      const explicit = asObject(disks[at]).name !== undefined;
      out.push({ path: explicit ? dup.path : ['vms', i, 'disks', at, 'path'], message: explicit ? dup.message : `${dup.message}: give the disks distinct name: keys` });
    }
  });
  out.push(...duplicates(asArray(asObject(top.api).tokens), 'name', ['api', 'tokens'], 'token name', position));
  return out;
}

/** A disk's name in backups: its `name`, else its file name without extension. */
export function effectiveDiskName(disk: { name?: unknown; path?: unknown }): string | undefined {
  if (typeof disk.name === 'string') return disk.name;
  return typeof disk.path === 'string' ? diskNameFromPath(disk.path) : undefined;
}

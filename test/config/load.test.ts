/** The service configuration: the example loads, defaults apply, and every problem is FILE:LINE:COL: key.path: message. */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VmvaultError } from '../../src/errors.js';
import { ConfigFileError, configPathFrom, loadConfig, parseConfig, secretEnvNames, selectVms, vmsOnHost } from '../../src/config/load.js';

/** At the repository's top level: above dist/test/config/, or the working directory when built elsewhere. */
const EXAMPLE = [fileURLToPath(new URL('../../../vmvault.example.yaml', import.meta.url)), join(process.cwd(), 'vmvault.example.yaml')]
  .find((f) => existsSync(f)) ?? 'vmvault.example.yaml';

/** The problems of a configuration text, as the lines an operator sees. */
function problems(text: string, file = 'c.yaml'): string[] {
  try {
    parseConfig(text, file, { host: 'hv1' });
  } catch (err) {
    assert.ok(err instanceof ConfigFileError, `expected a ConfigFileError, got ${String(err)}`);
    assert.ok(err instanceof VmvaultError && err.code === 'BAD_INPUT');
    assert.equal(err.message, err.problems.map((p) => `${p.file}:${p.line}:${p.col}: ${p.path}: ${p.message}`).join('\n'));
    return err.message.split('\n');
  }
  return assert.fail('the configuration was accepted');
}

const vm = (name: string, extra = '') => `  - name: ${name}\n    disks: [{ path: /img/${name}.qcow2 }]\n${extra}`;

describe('the example configuration', () => {
  test('vmvault.example.yaml loads', async () => {
    const c = await loadConfig(EXAMPLE);
    assert.equal(c.host, 'hv1');
    assert.deepEqual(c.repository, { url: 's3://vmvault-backups/prod?endpoint=https://s3.example.net&region=eu-west-1', passwordEnv: 'VMVAULT_PASSWORD' });
    assert.deepEqual(c.redis, { url: 'redis://127.0.0.1:6379/0' });
    assert.equal(c.policiesDir, join(dirname(EXAMPLE), 'policies'));
    assert.deepEqual(c.vms.map((v) => [v.name, v.host, v.driver, v.disks.map((d) => d.name)]), [
      ['web-1', 'hv1', 'image', ['web-1', 'data']],
      ['db-primary', 'hv2', 'qemu', ['root', 'pgdata']],
    ]);
    assert.deepEqual(c.api.tokens.map((t) => [t.name, t.role]), [['ops-team', 'admin'], ['dashboard', 'viewer']]);
    assert.deepEqual(c.hosts.hv2, { restoreRoots: ['/srv/vms/restored', '/mnt/scratch'] });
    assert.deepEqual(c.maintenance, { timezone: 'Europe/Paris', verify: { schedule: '0 4 * * *', readData: 'rotate 7' }, gc: { schedule: '30 5 * * 0' } });
  });

  test('its VMs select as the example policies expect', async () => {
    const c = await loadConfig(EXAMPLE);
    assert.deepEqual(selectVms(c, { tags: ['production'] }).vms.map((v) => v.name), ['web-1', 'db-primary']);
    assert.deepEqual(vmsOnHost(c, 'hv2').map((v) => v.name), ['db-primary']);
  });
});

describe('defaults', () => {
  test('a minimal file: every default applied, paths relative to the file', () => {
    const c = parseConfig(`vms:\n${vm('a')}`, '/etc/vmvault/vmvault.yaml');
    assert.deepEqual(c, {
      redis: {}, stateDir: '/var/lib/vmvault', host: hostname(), policiesDir: '/etc/vmvault/policies', policiesDirDefaulted: true,
      vms: [{ name: 'a', host: hostname(), driver: 'image', disks: [{ path: '/img/a.qcow2', name: 'a' }], configFiles: [], tags: [] }],
      api: { listen: '127.0.0.1:8740', tokens: [] }, hosts: {}, repository: undefined, maintenance: {},
    });
  });

  test('an empty mapping is a valid configuration with no VMs', () => {
    assert.deepEqual(parseConfig('{}', '/c.yaml', { host: 'hv1' }).vms, []);
  });

  test('the repository password: VMVAULT_PASSWORD unless a file or another variable is named', () => {
    const repo = (text: string) => parseConfig(`repository:\n${text}`, '/etc/vmvault/c.yaml').repository;
    assert.deepEqual(repo('  url: /backups\n'), { url: '/backups', passwordEnv: 'VMVAULT_PASSWORD' });
    assert.deepEqual(repo('  url: repo\n  passwordFile: secret\n'), { url: '/etc/vmvault/repo', passwordFile: '/etc/vmvault/secret' });
    assert.deepEqual(repo('  url: s3://bucket/p\n  passwordEnv: REPO_PW\n'), { url: 's3://bucket/p', passwordEnv: 'REPO_PW' });
  });

  test('the config path: --config, else VMVAULT_CONFIG', () => {
    assert.equal(configPathFrom('/a.yaml', { VMVAULT_CONFIG: '/b.yaml' }), '/a.yaml');
    assert.equal(configPathFrom(undefined, { VMVAULT_CONFIG: '/b.yaml' }), '/b.yaml');
    assert.equal(configPathFrom(undefined, {}), undefined);
  });
});

describe('problems, each at its FILE:LINE:COL', () => {
  test('malformed YAML and an empty file', () => {
    assert.deepEqual(problems('vms: [\n'), ['c.yaml:2:1: YAML: Flow sequence in block collection must be sufficiently indented and end with a ]']);
    assert.deepEqual(problems(''), ['c.yaml:1:1: (config): the file is empty: expected at least vms: [...]']);
    assert.deepEqual(problems('- a\n'), ['c.yaml:1:1: (config): expected a mapping with repository, redis, host, vms, api, hosts…']);
  });

  test('unknown keys, with a suggestion for a near miss', () => {
    assert.deepEqual(problems(`polciesDir: p\nvms:\n${vm('a', '    tag: [x]\n')}colour: blue\n`), [
      'c.yaml:1:1: polciesDir: unknown key (did you mean "policiesDir"?)',
      'c.yaml:5:5: vms[0].tag: unknown key (did you mean "tags"?)',
      'c.yaml:6:1: colour: unknown key',
    ]);
  });

  test('duplicate VM names name both occurrences; bad names are refused', () => {
    assert.deepEqual(problems(`vms:\n${vm('a')}${vm('b')}${vm('a')}${vm('x:y')}`), [
      'c.yaml:6:11: vms[2].name: VM name "a" is already used by vms[0] (line 2)',
      'c.yaml:8:11: vms[3].name: a VM name is letters, digits, ".", "_" or "-", starting with a letter or digit, at most 64 characters',
    ]);
  });

  test('disks: at least one for image and qemu, names unique within a VM, paths absolute, known formats', () => {
    assert.deepEqual(problems(`vms:
  - name: a
    disks: []
  - name: b
    disks:
      - { path: /x/disk.qcow2 }
      - { path: /y/disk.qcow2 }
      - { path: rel.raw, name: r, format: qed }
  - name: c
    driver: libvirt
`), [
      'c.yaml:3:12: vms[0].disks: VM "a" needs at least one disk with the image driver: disks: [{ path: /var/lib/libvirt/images/NAME.qcow2 }]',
      'c.yaml:7:17: vms[1].disks[1].path: disk name "disk" is already used by vms[1].disks[0] (line 6): give the disks distinct name: keys',
      'c.yaml:8:17: vms[1].disks[2].path: a disk path must be an absolute path (it is read on the VM\'s host)',
      'c.yaml:8:43: vms[1].disks[2].format: expected one of qcow2, raw, vmdk, vdi',
    ]);
  });

  test('the qemu driver needs its QMP socket; an unknown driver', () => {
    assert.deepEqual(problems(`vms:\n${vm('a', '    driver: qemu\n')}${vm('b', '    driver: xen\n')}`), [
      'c.yaml:2:5: vms[0].qmpSocket: VM "a" uses the qemu driver, which needs qmpSocket: the path of the running QEMU\'s QMP socket',
      'c.yaml:7:13: vms[1].driver: expected a driver: image, qemu, libvirt',
    ]);
  });

  test('a VM on a host that is neither this one nor listed under hosts', () => {
    assert.deepEqual(problems(`hosts:\n  hv2: { restoreRoots: [/r] }\nvms:\n${vm('a', '    host: hv3\n')}${vm('b', '    host: hv2\n')}`), [
      'c.yaml:6:11: vms[0].host: VM "a" is on host "hv3", which is neither this host ("hv1") nor listed under hosts',
    ]);
  });

  test('restore roots must be absolute; host names are checked', () => {
    assert.deepEqual(problems('hosts:\n  hv2: { restoreRoots: [restored] }\n  "bad:name": {}\n'), [
      'c.yaml:2:25: hosts.hv2.restoreRoots[0]: a restore root must be an absolute path (it is read on the VM\'s host)',
      'c.yaml:3:3: hosts.bad:name: a host name is letters, digits, ".", "_" or "-", starting with a letter or digit, at most 64 characters',
    ]);
  });

  test('a plain API token is refused with how to store its hash', () => {
    assert.deepEqual(problems('api:\n  tokens:\n    - name: ci\n      role: operator\n      token: s3cret\n'), [
      'c.yaml:3:7: api.tokens[0].sha256: missing: "sha256" is required',
      'c.yaml:5:14: api.tokens[0].token: tokens are stored as hashes only: remove token and put its SHA-256 in sha256 (printf %s TOKEN | sha256sum)',
    ]);
  });

  test('API: bad listen address, role, hash, duplicate token names', () => {
    assert.deepEqual(problems(`api:
  listen: localhost
  tokens:
    - { name: a, role: root, sha256: abc }
    - { name: a, role: viewer, sha256: ${'f'.repeat(64)} }
`), [
      'c.yaml:2:11: api.listen: expected host:port such as 127.0.0.1:8740 or [::1]:8740',
      'c.yaml:4:24: api.tokens[0].role: expected a role: viewer, operator or admin',
      'c.yaml:4:38: api.tokens[0].sha256: expected 64 hex digits: the SHA-256 of the token (printf %s TOKEN | sha256sum)',
      'c.yaml:5:15: api.tokens[1].name: token name "a" is already used by api.tokens[0] (line 4)',
    ]);
  });

  test('API public URL: an http(s) origin, nothing more', () => {
    assert.equal(parseConfig('api: { publicUrl: "https://backup.example.com" }\n', 'c.yaml', { host: 'hv1' }).api.publicUrl, 'https://backup.example.com');
    assert.equal(parseConfig('api: {}\n', 'c.yaml', { host: 'hv1' }).api.publicUrl, undefined);
    for (const bad of ['backup.example.com', 'ftp://x', 'https://x/api', 'https://x/?a=1']) {
      assert.deepEqual(problems(`api: { publicUrl: "${bad}" }\n`), [`c.yaml:1:19: api.publicUrl: expected the API's public origin, such as https://backup.example.com (no path)`], bad);
    }
  });

  test('repository and Redis URLs, and both password sources at once', () => {
    assert.deepEqual(problems('repository:\n  url: s4://bucket\n  passwordFile: /pw\n  passwordEnv: PW\nredis:\n  url: http://localhost\n'), [
      'c.yaml:2:8: repository.url: bad repository URL "s4://bucket": unknown scheme "s4:"; expected s3://BUCKET[/PREFIX][?endpoint=URL&region=R], file:///abs/path or a directory path',
      'c.yaml:4:16: repository.passwordEnv: the password comes from passwordFile or passwordEnv, not both: remove one',
      'c.yaml:6:8: redis.url: unknown scheme "http:" (accepted: redis://[user:password@]host[:port][/db], rediss://…, unix:///path/to/socket[?db=N], redis-sentinel://[:password@]host:port[,host:port…]/MASTER-NAME[/db], redis-cluster://[:password@]host:port[,host:port…])',
    ]);
    assert.deepEqual(problems('repository:\n  passwordEnv: PW\n'), ['c.yaml:2:3: repository.url: missing: "url" is required']);
  });

  test('Redis over a unix socket, and IPv6 listen addresses, are accepted', () => {
    const c = parseConfig('redis: { url: "unix:///run/vmvault/redis.sock" }\napi: { listen: "[::1]:9000" }\n', '/c.yaml', { host: 'h' });
    assert.equal(c.redis.url, 'unix:///run/vmvault/redis.sock');
    assert.equal(c.api.listen, '[::1]:9000');
  });

  test('maintenance: schedules are cron expressions, readData none/all/p%/rotate N, time zones known', () => {
    const ok = parseConfig('maintenance:\n  verify: { schedule: "0 4 * * *" }\n', 'c.yaml');
    assert.deepEqual(ok.maintenance, { verify: { schedule: '0 4 * * *', readData: 'none' } });
    for (const r of ['all', '10%', '0.5%', 'rotate 7', 'rotate 1']) {
      assert.equal(parseConfig(`maintenance:\n  verify: { schedule: "0 4 * * *", readData: "${r}" }\n`, 'c.yaml').maintenance.verify?.readData, r);
    }
    const lines = problems([
      'maintenance:',
      '  timezone: Mars/Olympus',
      '  verify:',
      '    schedule: "61 * * * *"',
      '    readData: rotate',
      '  gc: { schedule: "0 5 * * 0", dryRun: true }',
      '  prune: {}',
      '',
    ].join('\n'));
    assert.match(lines[0]!, /^c\.yaml:2:13: maintenance\.timezone: unknown time zone "Mars\/Olympus"/);
    assert.match(lines[1]!, /^c\.yaml:4:15: maintenance\.verify\.schedule: "61 \* \* \* \*" is not a valid/);
    assert.match(lines[2]!, /^c\.yaml:5:15: maintenance\.verify\.readData: expected none .*rotate 7/);
    assert.ok(lines.some((l) => /maintenance\.gc.*dryRun/.test(l)), lines.join('\n'));
    assert.ok(lines.some((l) => /maintenance.*prune/.test(l)), lines.join('\n'));
    for (const bad of ['rotate 0', '0%', '150%']) {
      assert.match(problems(`maintenance:\n  verify: { schedule: "0 4 * * *", readData: "${bad}" }\n`)[0]!, /maintenance\.verify\.readData/, bad);
    }
  });

  test('maintenance.copy: a schedule and the repository copied to, its directory and password file relative to the file; its password variable kept from the tools', () => {
    const c = parseConfig('maintenance:\n  copy:\n    schedule: "0 6 * * *"\n    to: { url: offsite, passwordFile: offsite.pass }\n', '/etc/vmvault/c.yaml');
    assert.deepEqual(c.maintenance.copy, { schedule: '0 6 * * *', to: { url: '/etc/vmvault/offsite', passwordFile: '/etc/vmvault/offsite.pass' } });
    const s3 = parseConfig('maintenance:\n  copy: { schedule: "0 6 * * *", to: { url: "s3://offsite/vmvault", passwordEnv: OFFSITE_PASS } }\n', 'c.yaml');
    assert.deepEqual(s3.maintenance.copy?.to, { url: 's3://offsite/vmvault', passwordEnv: 'OFFSITE_PASS' });
    assert.ok(secretEnvNames(s3).includes('OFFSITE_PASS'));
    const lines = problems('maintenance:\n  copy: { schedule: "0 6 * * *" }\n');
    assert.ok(lines.some((l) => /maintenance\.copy.*to/.test(l)), lines.join('\n'));
    assert.ok(problems('maintenance:\n  copy: { schedule: "0 6 * * *", to: { url: x, passwordFile: a, passwordEnv: B } }\n').some((l) => /not both/.test(l)));
    // No default variable: the repository copied to has a passphrase of its own.
    assert.ok(problems('maintenance:\n  copy: { schedule: "0 6 * * *", to: { url: x } }\n').some((l) => /maintenance\.copy\.to: give passwordFile or passwordEnv/.test(l)));
  });

  test('several problems in one file are all reported, in file order', () => {
    const lines = problems(`stateDir: 3
vms:
${vm('a', '    host: nowhere\n')}${vm('a')}api:
  tokens: [{ name: t, role: admin, token: x }]
hots: {}
`);
    assert.deepEqual(lines.map((l) => l.split(': ')[0]), [
      'c.yaml:1:11', 'c.yaml:5:11', 'c.yaml:6:11', 'c.yaml:9:12', 'c.yaml:9:43', 'c.yaml:10:1',
    ]);
    assert.match(lines[5]!, /hots: unknown key \(did you mean "host"\?\)/);
  });
});

describe('loadConfig', () => {
  test('reads a file; an unreadable file is BAD_INPUT naming it', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'vmvault-config-'));
    try {
      const file = join(dir, 'vmvault.yaml');
      await writeFile(file, `stateDir: state\nvms:\n${vm('a')}`);
      const c = await loadConfig(file, { host: 'hv1' });
      assert.equal(c.stateDir, join(dir, 'state'));
      assert.equal(c.policiesDir, join(dir, 'policies'));
      await assert.rejects(loadConfig(join(dir, 'missing.yaml')), (err: unknown) =>
        err instanceof VmvaultError && err.code === 'BAD_INPUT' && err.message.startsWith(`${join(dir, 'missing.yaml')}: cannot read configuration file`));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('selectVms and vmsOnHost', () => {
  const config = parseConfig(`hosts: { hv2: {} }
vms:
${vm('web-1', '    tags: [web, production]\n')}${vm('web-2', '    tags: [web]\n    host: hv2\n')}${vm('db', '    tags: [database, production]\n    host: hv2\n')}`, '/c.yaml', { host: 'hv1' });

  test('by names, in inventory order, with the unknown names', () => {
    const s = selectVms(config, { vms: ['db', 'ghost', 'web-1'] });
    assert.deepEqual(s.vms.map((v) => v.name), ['web-1', 'db']);
    assert.deepEqual(s.unknown, ['ghost']);
  });

  test('by tags, and by names or tags at once (each VM once)', () => {
    assert.deepEqual(selectVms(config, { tags: ['web'] }).vms.map((v) => v.name), ['web-1', 'web-2']);
    assert.deepEqual(selectVms(config, { tags: ['nothing'] }), { vms: [], unknown: [] });
    const s = selectVms(config, { vms: ['web-1'], tags: ['production'] });
    assert.deepEqual(s.vms.map((v) => v.name), ['web-1', 'db']);
    assert.deepEqual(s.unknown, []);
  });

  test('vmsOnHost: a VM without host is on the configuration\'s own host', () => {
    assert.deepEqual(vmsOnHost(config, 'hv1').map((v) => v.name), ['web-1']);
    assert.deepEqual(vmsOnHost(config, 'hv2').map((v) => v.name), ['web-2', 'db']);
    assert.deepEqual(vmsOnHost(config, 'hv9'), []);
  });
});

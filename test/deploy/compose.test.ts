/**
 * docker-compose.yml: Debian's docker-compose accepts it (`docker-compose config`),
 * and the command lines and environment of its vmvault services (vmvault-init, serve,
 * worker) run natively, as written, against a local redis-server and the S3 test
 * server. Only what names the containers' world is rewritten: the hosts and ports of
 * redis and minio, the API's listen address, paths (mounted files, volumes, the
 * secret) to temporary directories, and the S3 credentials to the test server's.
 * Then a VM is added through the API, backed up and restored identical.
 * The Dockerfile cannot be built here (no Docker daemon): its build stage is checked to
 * copy every input of `npm run build` and to build with it.
 */
import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { execa } from 'execa';
import { parse } from 'yaml';
import { cli } from '../helpers/cli.js';
import { BASE_ENV, start, stopProc, waitFor, type Proc } from '../helpers/procs.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startS3Server, type S3Server } from '../helpers/s3.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const MiB = 1024 * 1024;

interface Service {
  command?: string[];
  entrypoint?: string[];
  environment?: Record<string, string>;
  volumes?: Array<{ type: string; source?: string; target: string } | string>;
  secrets?: Array<string | { source: string }>;
}
interface Compose { services: Record<string, Service>; secrets?: Record<string, { file: string }> }

/** `docker-compose config`: the file as compose resolves it (anchors merged, variables substituted, paths absolute). */
async function resolved(file = join(ROOT, 'docker-compose.yml')): Promise<{ code: number; stderr: string; compose?: Compose }> {
  const r = await execa('docker-compose', ['-f', file, 'config'], { cwd: ROOT, reject: false, env: { ...BASE_ENV } as Record<string, string>, extendEnv: false });
  return { code: r.exitCode ?? -1, stderr: r.stderr, ...(r.exitCode === 0 ? { compose: parse(r.stdout) as Compose } : {}) };
}

/** Volumes in either syntax (docker-compose 1.29 prints SOURCE:TARGET[:MODE]). */
function volumesOf(svc: Service): Array<{ type: 'bind' | 'volume'; source: string; target: string }> {
  return (svc.volumes ?? []).map((v) => {
    if (typeof v !== 'string') return { type: v.type === 'bind' ? 'bind' : 'volume', source: v.source ?? '', target: v.target };
    const [source, target] = v.split(':') as [string, string];
    return { type: source.startsWith('/') || source.startsWith('.') ? 'bind' : 'volume', source, target };
  });
}

describe('docker-compose.yml', () => {
  let dir: TempDir;
  let redis: TestRedis;
  let s3: S3Server;
  let compose: Compose;
  const procs: Proc[] = [];

  before(async () => {
    dir = await tempDir('vv-compose-');
    [redis, s3] = await Promise.all([startRedis(), startS3Server()]);
  });
  after(async () => {
    for (const p of procs) await stopProc(p, 'SIGKILL').catch(() => {});
    await s3?.stop();
    await redis?.stop();
    await dir?.cleanup();
  });

  test('docker-compose config accepts it; a broken copy is refused', async () => {
    const r = await resolved();
    assert.equal(r.code, 0, r.stderr);
    compose = r.compose!;
    assert.deepEqual(Object.keys(compose.services).sort(), ['minio', 'minio-init', 'redis', 'serve', 'vmvault-init', 'worker']);
    const redisCmd = (compose.services.redis!.command ?? []).join(' ');
    assert.match(redisCmd, /--appendonly yes/);
    assert.match(redisCmd, /--maxmemory-policy noeviction/);
    // The check can fail: an unknown service key is an error.
    const broken = join(ROOT, `.compose-broken-${process.pid}.yml`);
    await writeFile(broken, (await readFile(join(ROOT, 'docker-compose.yml'), 'utf8')).replace('  serve:\n', '  serve:\n    commandd: [x]\n'));
    try {
      const b = await resolved(broken);
      assert.notEqual(b.code, 0);
      assert.match(b.stderr, /commandd/);
    } finally {
      await execa('rm', ['-f', broken]);
    }
  });

  test('the services\' command lines, run natively, back up a VM and restore it identical', async () => {
    assert.ok(compose, 'the previous test parsed the file');
    // What the compose world names, and where it is here.
    const passphraseFile = join(dir.path, 'secret-passphrase');
    await writeFile(passphraseFile, 'compose test passphrase\n', { mode: 0o600 });
    const images = join(dir.path, 'images');
    await mkdir(images);
    const image = await makeImage(images, 'app.qcow2', 'qcow2', 20 * MiB, [
      { offset: 0, length: MiB, pattern: 0x11 }, { offset: 13 * MiB, length: 123_456, pattern: 0xe7 },
    ]);

    /** A service's paths, hosts and ports as they are here. */
    const rewriterFor = async (name: string): Promise<(s: string) => string> => {
      const svc = compose.services[name]!;
      const paths: Array<[string, string]> = [];
      for (const v of volumesOf(svc)) {
        // A named volume: the container's path under one temporary root, the same for every service (in
        // compose each has its own volume, but the paths the API checks and the worker uses are the same).
        const here = v.type === 'bind' ? v.source : join(dir.path, 'root', v.target);
        if (v.type !== 'bind') await mkdir(here, { recursive: true });
        paths.push([v.target, here]);
      }
      for (const sec of svc.secrets ?? []) paths.push([`/run/secrets/${typeof sec === 'string' ? sec : sec.source}`, passphraseFile]);
      paths.sort((a, b) => b[0].length - a[0].length);
      return (s: string) => {
        let out = s.replaceAll('redis://redis:6379/0', redis.url).replaceAll('http://minio:9000', s3.endpoint).replaceAll('0.0.0.0:8740', '127.0.0.1:0');
        for (const [there, here] of paths) out = out.split(there).join(here);
        return out;
      };
    };
    /** The service's command and environment, rewritten; the mounted configuration rewritten the same way. */
    const native = async (name: string): Promise<{ args: string[]; env: Record<string, string> }> => {
      const svc = compose.services[name]!;
      const rewrite = await rewriterFor(name);
      const env = Object.fromEntries(Object.entries(svc.environment ?? {}).map(([k, v]) => [k, rewrite(String(v))]));
      // The S3 test server knows one access key: the only credential rewritten.
      Object.assign(env, s3.env);
      for (const v of volumesOf(svc)) {
        if (v.type === 'bind' && v.target === '/etc/vmvault/vmvault.yaml') {
          const copy = join(dir.path, `${name}-vmvault.yaml`);
          await writeFile(copy, rewrite(await readFile(v.source, 'utf8')));
          const args = (svc.command ?? []).map((a) => (a === v.target ? copy : rewrite(a)));
          return { args, env };
        }
      }
      return { args: (svc.command ?? []).map(rewrite), env };
    };

    // minio-init's job: the bucket it names.
    const bucket = /^local\/(.+)$/.exec(compose.services['minio-init']!.entrypoint!.at(-1)!)?.[1];
    assert.equal(bucket, 'vmvault');
    const client = new S3Client({ endpoint: s3.endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' } });
    await client.send(new CreateBucketCommand({ Bucket: bucket }));
    client.destroy();

    const init = await native('vmvault-init');
    const first = await cli(init.args, { ...BASE_ENV, ...init.env });
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /created repository/);
    const again = await cli(init.args, { ...BASE_ENV, ...init.env });
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /already exists at s3:\/\/vmvault\/repository.*: nothing to do/);

    const serveCmd = await native('serve');
    const workerCmd = await native('worker');
    const serve = start(serveCmd.args, serveCmd.env);
    procs.push(serve);
    const worker = start(workerCmd.args, workerCmd.env);
    procs.push(worker);
    const diag = () => `${serve.output()}\n---\n${worker.output()}`;
    const api = await waitFor('serve\'s API', () => /API on (http:\/\/\S+) /.exec(serve.output())?.[1], 40_000, diag);
    await waitFor('the worker', () => worker.output().includes('worker started'), 40_000, diag);
    // Not a terminal (a container log): the token is in a file of the state volume, named in the output.
    const tokenFile = /admin API token; it is in (\S+) \(mode 0600\)/.exec(serve.output())?.[1];
    assert.ok(tokenFile, serve.output());
    const token = (await readFile(tokenFile, 'utf8')).trim();
    assert.ok(token && !serve.output().includes(token), serve.output());
    const call = async (method: string, path: string, body?: unknown) => {
      const r = await fetch(`${api}${path}`, {
        method, headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      });
      return { status: r.status, body: await r.json() as any };
    };
    const jobDone = (id: string) => waitFor(`job ${id}`, async () => {
      const j = await call('GET', `/v1/jobs/${encodeURIComponent(id)}`);
      return j.body?.state === 'completed' || j.body?.state === 'failed' ? j.body : undefined;
    }, 90_000, diag);

    const added = await call('POST', '/v1/vms', { name: 'app', disks: [{ path: image, format: 'qcow2' }] });
    assert.equal(added.status, 201, JSON.stringify(added.body));
    assert.equal(added.body.host, 'hv1');
    const backup = await call('POST', '/v1/vms/app/backups', {});
    assert.equal(backup.status, 202, JSON.stringify(backup.body));
    const b = await jobDone(backup.body.job.id);
    assert.equal(b.state, 'completed', b.error);
    const [made] = (await call('GET', '/v1/backups?vm=app')).body.items;
    assert.ok(made, 'the backup is listed');
    // The worker's restore root: its /var/lib/vmvault/restores, a volume here.
    const workerState = (await rewriterFor('worker'))('/var/lib/vmvault/restores');
    const target = join(workerState, 'app-1');
    const restore = await call('POST', `/v1/backups/${made.id}/restore`, { host: 'hv1', directory: target, format: 'qcow2' });
    assert.equal(restore.status, 202, JSON.stringify(restore.body));
    const r = await jobDone(restore.body.job.id);
    assert.equal(r.state, 'completed', r.error);
    const cmp = await execa('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', image, join(target, 'app.qcow2')], { reject: false });
    assert.equal(cmp.exitCode, 0, cmp.stdout + cmp.stderr);
    assert.equal(await stopProc(worker), 0, worker.output());
    assert.equal(await stopProc(serve), 0, serve.output());
  });
});

describe('Dockerfile', () => {
  test('its build stage copies everything npm run build reads, and builds with npm run build', async () => {
    const dockerfile = await readFile(join(ROOT, 'Dockerfile'), 'utf8');
    const build = dockerfile.split(/^FROM /m)[1]!; // the first stage
    const copied = new Set([...build.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) => m[1]!.trim().split(/\s+/)));
    const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
    const tsconfig = JSON.parse(await readFile(join(ROOT, 'tsconfig.json'), 'utf8')) as { include: string[] };
    // tsc's inputs, the scripts the build runs (node DIR/FILE), and the entry point.
    const scripts = [...pkg.scripts.build!.matchAll(/\bnode (\S+)\//g)].map((m) => m[1]!);
    const needed = ['package.json', 'package-lock.json', 'tsconfig.json', 'bin', ...tsconfig.include, ...scripts];
    assert.ok(scripts.length > 0, `the build script runs no node script: ${pkg.scripts.build}`);
    for (const path of needed) assert.ok(copied.has(path), `the Dockerfile's build stage does not copy ${path}; it copies ${[...copied].join(', ')}`);
    assert.match(build, /^RUN npm run build\b/m, 'the image is built the way npm run build builds');
  });
});

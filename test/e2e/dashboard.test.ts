/**
 * The web dashboard in a real Chromium (Debian's /usr/bin/chromium driven by
 * playwright-core, headless) against the real service: `vmvault serve` and a
 * `vmvault worker`, a redis-server and a directory repository, with a VM made from a
 * real qcow2 image. In the browser: sign in, see the backup this test made, start a
 * backup and watch it finish, restore it (checked with qemu-img compare), take a
 * signed link, see a failed job's error, take/revert/delete a snapshot, preview a
 * policy's retention. Screenshots go to test-artifacts/dashboard/.
 */
import assert from 'node:assert/strict';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { execa } from 'execa';
import { chromium, type Browser, type Page } from 'playwright-core';
import { compareImages } from '../../src/disk/qemu.js';
import { makeImage, tempDir, type TempDir } from '../helpers/images.js';
import { waitFor } from '../helpers/procs.js';
import { startRedis, type TestRedis } from '../helpers/redis.js';
import { startService, type TestService } from '../helpers/service.js';

const TOKENS = { viewer: 'viewer-token-0123456789', operator: 'operator-token-0123456789', admin: 'admin-token-0123456789' } as const;
const MiB = 1024 * 1024;
const SHOTS = fileURLToPath(new URL('../../../test-artifacts/dashboard/', import.meta.url));

let redis: TestRedis;
let dir: TempDir;
let service: TestService | undefined;
let browser: Browser | undefined;
let page: Page;
let source: string;
let broken: string;
let restoreRoot: string;
let firstBackup: string;
/** The job of the last notice seen. */
let lastJob: string | undefined;
/** Bytes of every response the page received, by URL path. */
const loaded = new Map<string, number>();
const output = () => service?.output() ?? '';

async function api(method: string, path: string, body?: unknown): Promise<any> {
  const r = await fetch(`${service!.api}${path}`, {
    method, headers: { authorization: `Bearer ${TOKENS.operator}`, ...(body ? { 'content-type': 'application/json' } : {}) }, ...(body ? { body: JSON.stringify(body) } : {}),
  });
  return { status: r.status, body: await r.json() };
}

const shot = (name: string) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
const text = (selector: string) => page.locator(selector).innerText();

/** The job id of the notice shown after an action ("WHAT … queued: job ID"), once it is not `previous`'s. */
async function queuedJob(what: string): Promise<string> {
  const notice = page.locator('#notice');
  await notice.filter({ hasText: new RegExp(`^${what}.* queued: job (?!${lastJob ?? '-'})`) }).waitFor({ timeout: 10_000 });
  const id = /queued: job (\S+)/.exec(await notice.innerText())?.[1];
  assert.ok(id, await notice.innerText());
  lastJob = id;
  return id;
}

/** Waits until the jobs table shows job `id` finished; returns its state and the progress texts seen on the way. */
async function jobEnd(id: string, runningShot?: string): Promise<{ state: string; progress: string[] }> {
  const progress: string[] = [];
  const state = await waitFor(`job ${id} to finish in the dashboard`, async () => {
    // State and progress are read in one step: the dashboard may re-render the row between two reads.
    const seen = await page.evaluate(`(() => {
      const tr = document.querySelector(${JSON.stringify(`#jobs tr[data-job="${id}"]`)});
      const cell = tr && tr.querySelector('.progress-cell');
      return tr ? { s: tr.getAttribute('data-state'), p: cell ? cell.innerText : '' } : null;
    })()`) as { s: string | null; p: string } | null;
    if (!seen) return undefined;
    const { s, p } = seen;
    if (p && progress.at(-1) !== `${s}: ${p}`) {
      progress.push(`${s}: ${p}`);
      if (runningShot && s === 'active' && !progress.slice(0, -1).some((x) => x.startsWith('active:'))) await shot(runningShot);
    }
    return s === 'completed' || s === 'failed' ? s : undefined;
  }, 60_000, output, 100);
  return { state, progress };
}

before(async () => {
  await rm(SHOTS, { recursive: true, force: true });
  await mkdir(SHOTS, { recursive: true });
  redis = await startRedis();
  dir = await tempDir('vmvault-dashboard-');
  restoreRoot = join(dir.path, 'restores');
  await mkdir(restoreRoot);
  // 48 MiB of random data in a 128 MiB qcow2: a backup that takes long enough to show progress.
  const raw = join(dir.path, 'random.raw');
  await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=48', 'status=none']);
  await execa('truncate', ['-s', `${128 * MiB}`, raw]);
  source = join(dir.path, 'web.qcow2');
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, source]);
  await rm(raw);
  broken = await makeImage(dir.path, 'broken.qcow2', 'qcow2', 4 * MiB, [{ offset: 0, length: MiB, pattern: 0x42 }]);
  service = await startService({
    dir: dir.path, redisUrl: redis.url, passphrase: 'dashboard test passphrase', tokens: TOKENS,
    hosts: [`hosta: { restoreRoots: [${JSON.stringify(restoreRoot)}] }`],
    vms: [
      `{ name: web, host: hosta, disks: [{ path: ${JSON.stringify(source)}, name: root, format: qcow2 }] }`,
      `{ name: broken, host: hosta, disks: [{ path: ${JSON.stringify(broken)}, name: root, format: qcow2 }] }`,
    ],
  });
  await writeFile(join(dir.path, 'policies', 'keep-last.yaml'), 'name: keep-last\nschedule: "0 3 * * *"\nselect:\n  vms: [web]\nretention:\n  keepLast: 1\n');
  // The backup the dashboard must show, made through the API.
  const r = await api('POST', '/v1/vms/web/backups', { labels: ['first'] });
  assert.equal(r.status, 202, JSON.stringify(r.body));
  const job = await waitFor('the first backup', async () => {
    const j = (await api('GET', `/v1/jobs/${r.body.job.id}`)).body;
    return j.state === 'completed' || j.state === 'failed' ? j : undefined;
  }, 60_000, output);
  assert.equal(job.state, 'completed', job.error);
  firstBackup = job.result.id;

  browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'], headless: true });
  page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on('dialog', (d) => void d.accept());
  page.on('response', (r) => {
    void r.body().then((b) => loaded.set(new URL(r.url()).pathname, (loaded.get(new URL(r.url()).pathname) ?? 0) + b.length), () => {});
  });
});

after(async () => {
  await browser?.close();
  await service?.stop();
  await redis?.stop();
  await dir?.cleanup();
});

describe('the dashboard in Chromium', { timeout: 180_000 }, () => {
  test('sign in: a wrong token is refused with the API\'s reason; the right one opens the dashboard', async () => {
    await page.goto(`${service!.api}/`);
    await page.locator('#sign-in').waitFor();
    await page.fill('#token', 'not-a-token');
    await page.click('#sign-in button[type=submit]');
    await page.locator('#sign-in-error').filter({ hasText: 'the bearer token is not known' }).waitFor();
    await shot('01-sign-in-refused');
    await page.fill('#token', TOKENS.operator);
    await page.click('#sign-in button[type=submit]');
    await page.locator('#vms tr[data-vm="web"] .result.ok').waitFor();
    assert.equal(await page.evaluate("sessionStorage.getItem('vmvault.token')"), TOKENS.operator);
  });

  test('shows the VM with the backup the test made, and that backup in its list', async () => {
    const row = page.locator('#vms tr[data-vm="web"]');
    assert.match(await row.innerText(), /web\s+hosta\s+\d+ s ago\s+ok\s+128 MiB\s+full\s+not verified/);
    const b = page.locator(`#backups tr[data-backup="${firstBackup}"]`);
    await b.waitFor();
    assert.match(await b.innerText(), new RegExp(`${firstBackup.slice(0, 12)}\\s+128 MiB\\s+[\\d.]+ MiB\\s+0%\\s+first`));
    await shot('02-overview');
    const staticBytes = [...loaded].filter(([p]) => p === '/' || p.startsWith('/ui/')).reduce((n, [, b]) => n + b, 0);
    const apiBytes = [...loaded].filter(([p]) => p.startsWith('/v1/')).reduce((n, [, b]) => n + b, 0);
    console.log(`# dashboard load: ${staticBytes} bytes of page, style and scripts (${[...loaded.keys()].filter((p) => p === '/' || p.startsWith('/ui/')).length} files), ${apiBytes} bytes of API answers`);
    assert.ok(staticBytes > 10_000 && staticBytes < 100_000, `the page weighs ${staticBytes} bytes`);
  });

  test('a backup started in the dashboard shows its progress until it is done', async () => {
    // New data in the image, so that this backup reads and uploads 64 MiB.
    const raw = join(dir.path, 'random2.raw');
    await execa('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', 'count=64', 'status=none']);
    await execa('qemu-io', ['-f', 'qcow2', '-c', `write -s ${raw} ${16 * MiB} ${64 * MiB}`, source]);
    await rm(raw);
    await page.click('#vms tr[data-vm="web"] button[data-action="backup"]');
    const id = await queuedJob('backup of web');
    const end = await jobEnd(id, '03-backup-running');
    console.log(`# progress seen: ${JSON.stringify(end.progress)}`);
    if (end.progress.some((p) => p.startsWith('active:'))) assert.match(end.progress.find((p) => p.startsWith('active:'))!, /^active: \d+% · [\d.]+ MiB of [\d.]+ MiB · [\d.]+ [KMG]?i?B\/s · ETA /);
    assert.equal(end.state, 'completed', await text(`#jobs tr[data-job="${id}"]`));
    assert.match(end.progress.at(-1)!, /^completed: 100% · [\d.]+ MiB of [\d.]+ MiB · [\d.]+ [KMG]?i?B\/s/);
    await page.locator('#backups tbody tr').nth(1).waitFor();
    assert.equal(await page.locator('#backups tbody tr').count(), 2);
    await shot('04-backup-done');
  });

  test('restore the new backup onto hosta: the restored image is identical to the source', async () => {
    const newest = page.locator('#backups tbody tr').first();
    const id = await newest.getAttribute('data-backup');
    assert.ok(id && id !== firstBackup);
    await newest.locator('button[data-action="restore"]').click();
    await page.locator('#restore-form').waitFor();
    assert.equal(await page.inputValue('#restore-form [name=host]'), 'hosta');
    const target = join(restoreRoot, 'web-restored');
    await page.fill('#restore-form [name=directory]', target);
    await page.selectOption('#restore-form [name=format]', 'qcow2');
    await shot('05-restore-form');
    await page.click('#restore-form button[type=submit]');
    const job = await queuedJob('restore of');
    const end = await jobEnd(job);
    assert.equal(end.state, 'completed', await text(`#jobs tr[data-job="${job}"]`));
    const cmp = await compareImages(source, join(target, 'root.qcow2'), 'qcow2', 'qcow2');
    assert.ok(cmp.identical, cmp.output);
  });

  test('a signed link is shown with its qemu-img command and serves the disk without a token', async () => {
    await page.locator('#backups tbody tr').first().locator('button[data-action="link"]').click();
    await page.locator('#link-output').waitFor();
    const url = await text('#link-output .url');
    assert.match(await text('#link-output .command'), /^\(umask 077; trap 'rm -f root\.link' EXIT; printf '%s' 'vmvault_link=[A-Za-z0-9_-]{43}' > root\.link && qemu-img convert -p -m 1 --object secret,id=vmvault-link,file=root\.link -O qcow2 'json:\{"driver":"raw","file":\{"driver":"http","url":"http:\/\/127\.0\.0\.1:\d+\/v1\/links\/[A-Za-z0-9_-]+","cookie-secret":"vmvault-link"\}\}' root\.qcow2\)$/);
    const head = await fetch(url, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('content-length'), String(128 * MiB));
  });

  test('a backup of a VM whose disk file was removed fails, and the dashboard shows why', async () => {
    await rm(broken);
    await page.click('#vms tr[data-vm="broken"] button[data-action="backup"]');
    const id = await queuedJob('backup of broken');
    const end = await jobEnd(id);
    assert.equal(end.state, 'failed');
    const error = await text(`#jobs tr[data-job="${id}"] td.error`);
    assert.match(error, /broken\.qcow2/);
    await page.locator('#vms tr[data-vm="broken"] .result.failed').waitFor();
    assert.equal(await page.locator('#vms tr[data-vm="broken"] .result').getAttribute('title'), error);
    await shot('06-failed-job');
  });

  test('snapshots: take one with a label and an expiry, revert to it (confirmed), delete it', async () => {
    await page.click('#vms tr[data-vm="web"] button[data-action="select"]');
    await page.fill('#snapshot-form [name=name]', 'before-upgrade');
    await page.fill('#snapshot-form [name=label]', 'pre-update');
    await page.fill('#snapshot-form [name=expireIn]', '7d');
    await page.click('#snapshot-form button[type=submit]');
    const row = page.locator('#snapshots tr[data-snapshot="before-upgrade"]');
    await row.waitFor({ timeout: 30_000 });
    assert.match(await row.innerText(), /before-upgrade\s+pre-update\s+\d+ s ago\s+in 6 d 23 h\s+root/);
    await shot('07-snapshot');
    await row.locator('button[data-action="revert"]').click();
    const revert = await queuedJob('revert of web');
    assert.equal((await jobEnd(revert)).state, 'completed');
    await row.locator('button[data-action="delete"]').click();
    await row.waitFor({ state: 'detached', timeout: 30_000 });
    assert.match(await text('#snapshots .body'), /No snapshots of web/);
  });

  test('the retention preview of a policy on the VM\'s real backups', async () => {
    await page.locator('#policies tr[data-policy="keep-last"]').waitFor();
    assert.match(await text('#policies tr[data-policy="keep-last"]'), /keep-last\s+0 3 \* \* \*\s+web\s+last 1/);
    await page.selectOption('#preview-form [name=policy]', 'keep-last');
    await page.selectOption('#preview-form [name=vm]', 'web');
    await page.click('#preview-form button[type=submit]');
    await page.locator('#preview').filter({ hasText: 'keeps 1, forgets 1' }).waitFor();
    assert.equal(await page.locator(`#preview tr[data-backup="${firstBackup}"] td.failed`).innerText(), 'forget');
    assert.equal(await page.locator('#preview tr.keep td').nth(5).innerText(), 'last');
    await shot('08-retention-preview');
  });

  test('a backup whose manifest cannot be read: a red section names it and says what to do, until a good copy is back', async () => {
    assert.equal(await page.locator('#unreadable').isHidden(), true, 'hidden while every manifest reads');
    const file = join(service!.repoUrl, 'backups', firstBackup);
    const good = await readFile(file);
    await writeFile(file, good.subarray(0, 100)); // cut short
    try {
      const row = page.locator(`#unreadable tr[data-unreadable="${firstBackup}"]`);
      await row.waitFor({ timeout: 15_000 });
      assert.equal(await page.locator('#unreadable').isVisible(), true);
      assert.match(await row.innerText(), new RegExp(`${firstBackup.slice(0, 12)}\\s+damaged\\s+.*backups/${firstBackup}.*\\s+put a good copy of backups/${firstBackup} back.*repair --remove`, 's'));
      assert.equal(await page.locator(`#backups tr[data-backup="${firstBackup}"]`).count(), 0, 'not in the VM\'s list');
      await shot('09-unreadable-backup');
    } finally {
      await writeFile(file, good);
    }
    await page.locator('#unreadable').waitFor({ state: 'hidden', timeout: 15_000 });
    await page.locator(`#backups tr[data-backup="${firstBackup}"]`).waitFor({ timeout: 15_000 });
  });

  test('hosts: from GET /v1/status when the server has it, "status not available" otherwise', async () => {
    const status = await fetch(`${service!.api}/v1/status`, { headers: { authorization: `Bearer ${TOKENS.viewer}` } });
    if (status.status === 404) {
      await page.locator('#hosts .body').filter({ hasText: 'status not available' }).waitFor();
      assert.match(await text('#vms tr[data-vm="web"] .next-run'), /status not available/);
    } else {
      assert.equal(status.status, 200);
      const s = (await status.json()) as { vms: { name: string; overdue: boolean }[] };
      await page.locator('#hosts tr[data-host="hosta"]').waitFor();
      assert.match(await text('#hosts tr[data-host="hosta"]'), /online/);
      for (const vm of s.vms) assert.equal(await page.locator(`#vms tr[data-vm="${vm.name}"].overdue`).count(), vm.overdue ? 1 : 0, vm.name);
    }
    await shot('10-hosts');
  });

  test('a backup whose answer is lost on the way is asked for again with the same Idempotency-Key: one job, not two', async () => {
    const backupsOfWeb = async () => (await api('GET', '/v1/jobs?limit=200')).body.items.filter((j: any) => j.name === 'backup' && j.data?.vm === 'web').map((j: any) => j.id);
    const before = await backupsOfWeb();
    const keys: (string | undefined)[] = [];
    const url = '**/v1/vms/web/backups';
    await page.route(url, async (route) => {
      keys.push(route.request().headers()['idempotency-key']);
      if (keys.length > 1) return route.continue();
      await route.fetch(); // the API makes the job...
      await route.abort('connectionreset'); // ...and its answer never reaches the page
    });
    try {
      await page.click('#vms tr[data-vm="web"] button[data-action="backup"]');
      const id = await queuedJob('backup of web');
      assert.equal(keys.length, 2, 'sent again once');
      assert.match(keys[0] ?? '', /^dashboard-[0-9a-f]{32}$/);
      assert.equal(keys[1], keys[0], 'with the same key');
      assert.equal((await jobEnd(id)).state, 'completed', await text(`#jobs tr[data-job="${id}"]`));
      const after = await backupsOfWeb();
      assert.deepEqual(after.filter((j: string) => !before.includes(j)), [id], 'one new backup job');
    } finally {
      await page.unroute(url);
    }
  });

  test('sign out forgets the token', async () => {
    await page.click('#sign-out');
    await page.locator('#sign-in').waitFor();
    assert.equal(await page.evaluate("sessionStorage.getItem('vmvault.token')"), null);
  });
});

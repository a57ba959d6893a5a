/**
 * The raw image of one disk of a backup, read from the repository and streamed (HEAD
 * and Range supported), with a bearer token or through a signed link (for clients such
 * as QEMU's curl driver, which cannot send a bearer header).
 */
import type { ServerResponse } from 'node:http';
import type { Context } from 'hono';
import { NotFoundError } from '../../errors.js';
import { DiskReader } from '../../pipeline/disk-reader.js';
import { PromiseLru } from '../../pipeline/lru.js';
import type { Manifest } from '../../repo/manifest.js';
import { Limiter } from '../bounded.js';
import { ApiError, errorBody } from '../errors.js';
import { getCookie } from 'hono/cookie';
import { LINK_COOKIE, linkKey, presentedToken, signLink, splitToken, verifyLink } from '../links.js';
import { parseRange } from '../range.js';
import * as S from '../schemas.js';
import { binary, body, errors, json, route, type ApiApp, type Env, type RouteContext } from './common.js';

/** Ranges up to this size are read whole before the response starts. */
const WHOLE_RESPONSE_BYTES = 16 * 1024 * 1024;

/**
 * Whole responses in memory at once, from assembly until the client has read them.
 * More would let a burst of Range requests, from one link holder, exhaust the memory
 * of the process that also runs the scheduler (150 at once took 2 GB); the rest wait.
 * QEMU's curl driver has at most 8 requests in flight.
 */
const WHOLE_RESPONSES_AT_ONCE = 8;

/**
 * How long a whole response may take to leave while other requests wait for a slot.
 * Its buffer lives until the client has read it, so the slot is held as long, and a
 * client too slow for this (16 MiB in 30 s is 0.5 MiB/s) is disconnected once someone
 * else waits: handing its slot on while it kept its buffer let paused clients hold a
 * new 128 MiB every 30 s. QEMU gives up on a request after 5 s by default anyway.
 */
const SLOT_HOLD_MAX_MS = 30_000;

/** After SLOT_HOLD_MAX_MS, how often a slow whole response looks for requests waiting for its slot. */
const SLOT_WAIT_CHECK_MS = 1000;

/** Manifests kept decoded for the disk routes (a 1 TiB disk's weighs about 30 MB in memory). */
const MANIFESTS_KEPT = 4;

/** The answers of a raw disk route (HEAD and Range supported). */
const rawDisk = { 200: binary('the whole raw disk'), 206: binary('the requested range'), 416: json(S.ErrorSchema, 'range not satisfiable') };

export const diskRoutes = {
  disk: route({
    method: 'get', path: '/v1/backups/{id}/disks/{disk}', role: 'operator', summary: 'The raw image of one disk (HEAD and Range supported)',
    request: { params: S.DiskParam },
    responses: { ...rawDisk, ...errors },
  }),
  diskLink: route({ method: 'post', path: '/v1/backups/{id}/disks/{disk}/links', role: 'operator', summary: 'A short-lived signed URL to the raw image of one disk, usable without a bearer header', request: { params: S.DiskParam, ...body(S.LinkRequest, false) }, responses: { 201: json(S.LinkSchema, 'the link'), ...errors } }),
  link: route({
    method: 'get', path: '/v1/links/{token}', role: 'none', summary: 'A disk through a signed link (HEAD and Range supported)',
    request: { params: S.LinkParam },
    responses: {
      ...rawDisk,
      403: json(S.ErrorSchema, 'expired or altered link'),
      404: json(S.ErrorSchema, 'the backup or disk is gone'),
    },
  }),
};

/** These routes' types, for the typed client (`hc<DisksLinksApp>` from hono/client). */
export type DisksLinksApp = ReturnType<typeof registerDisksLinks>;

export function registerDisksLinks(app: ApiApp, ctx: RouteContext) {
  const { catalogue, config, repo } = ctx;
  const key = linkKey(repo.keys.macKey);
  const reader = new DiskReader(repo);
  ctx.onClose(() => reader.close());
  const wholeResponses = new Limiter(WHOLE_RESPONSES_AT_ONCE);
  const manifests = new PromiseLru<Manifest>(MANIFESTS_KEPT);

  /**
   * Keeps a whole response's slot until the answer has left or the client is gone (its
   * buffer lives that long); past SLOT_HOLD_MAX_MS, a client still reading while others
   * wait is disconnected, which frees the buffer and the slot together.
   */
  let cutting = 0; // responses disconnected whose slots have not yet passed on to a waiter
  const holdUntilSent = (outgoing: ServerResponse, release: () => void): void => {
    let cut = false;
    let timer = setTimeout(function check() {
      if (wholeResponses.waiting > cutting) {
        cut = true;
        cutting++;
        outgoing.destroy();
      } else {
        timer = setTimeout(check, SLOT_WAIT_CHECK_MS).unref();
      }
    }, ctx.wholeResponseHoldMs ?? SLOT_HOLD_MAX_MS).unref();
    outgoing.once('close', () => {
      clearTimeout(timer);
      if (cut) cutting--;
      release();
    });
  };

  const serveDisk = async (c: Context<Env>, backupId: string, diskName: string): Promise<Response> => {
    // The catalogue first: a pruned backup is refused even while its manifest is still kept.
    const b = await catalogue.get(backupId);
    const manifest = await manifests.get(b.id, () => repo.loadManifest(b.id));
    const disk = manifest.disks.find((d) => d.name === diskName);
    if (!disk) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${diskName}"; its disks are: ${manifest.disks.map((d) => d.name).join(', ')}`);
    const size = disk.virtualSize;
    const file = headerSafeName(disk.name);
    const headers: Record<string, string> = {
      'Accept-Ranges': 'bytes', 'Content-Type': 'application/octet-stream', 'Cache-Control': 'no-store',
      ETag: `"${b.id.slice(0, 16)}-${file}"`, 'Content-Disposition': `attachment; filename="${file}.raw"`,
    };
    const range = parseRange(c.req.header('range'), size);
    if (range === 'unsatisfiable') {
      return c.json(errorBody(new ApiError(416, 'RANGE_NOT_SATISFIABLE', `the disk has ${size} bytes`)), 416, { 'Content-Range': `bytes */${size}` });
    }
    const [start, end, status] = range ? [range.start, range.end, 206 as const] : [0, size - 1, 200 as const];
    headers['Content-Length'] = String(size === 0 ? 0 : end - start + 1);
    if (range) headers['Content-Range'] = `bytes ${start}-${end}/${size}`;
    if (c.req.method === 'HEAD' || size === 0) return new Response(null, { status, headers });
    // Block-device clients (QEMU's curl driver) read a few MiB per request: answer those in one piece,
    // headers and body together, and stream only large ranges.
    if (end - start + 1 <= WHOLE_RESPONSE_BYTES) {
      const release = await wholeResponses.acquire();
      let data: Buffer;
      try {
        data = await reader.read(disk, manifest.chunkSize, start, end);
      } catch (err) {
        release();
        throw err;
      }
      const outgoing = (c.env as { outgoing?: ServerResponse } | undefined)?.outgoing;
      if (outgoing && !outgoing.destroyed && !outgoing.writableFinished) holdUntilSent(outgoing, release);
      else release();
      return new Response(data, { status, headers });
    }
    return new Response(reader.stream(disk, manifest.chunkSize, start, end), { status, headers });
  };

  return app
    .openapi(diskRoutes.disk, async (c) => {
      const p = c.req.valid('param');
      return serveDisk(c, p.id, p.disk) as never;
    })
    .openapi(diskRoutes.diskLink, async (c) => {
      const p = c.req.valid('param');
      // Parsed again: without a Content-Type the validator passes {} through, without the defaults.
      const req = S.LinkRequest.parse(c.req.valid('json') ?? {});
      const b = await catalogue.get(p.id);
      if (!b.disks.some((d) => d.name === p.disk)) throw new NotFoundError(`backup ${b.id.slice(0, 12)} has no disk "${p.disk}"; its disks are: ${b.disks.map((d) => d.name).join(', ')}`);
      const expires = Math.floor(ctx.now()) + req.expiresIn;
      const token = signLink(key, { backup: b.id, disk: p.disk, expires });
      // Behind a proxy the request's own origin is the inside one: api.publicUrl says what clients use.
      const origin = config.api.publicUrl ? new URL(config.api.publicUrl).origin : new URL(c.req.url).origin;
      const { payload, mac } = splitToken(token);
      const cookie = `${LINK_COOKIE}=${mac}`;
      return c.json({
        url: `${origin}/v1/links/${token}`, expiresAt: new Date(expires * 1000).toISOString(),
        cookieUrl: `${origin}/v1/links/${payload}`, cookie, command: qemuImgCommand(`${origin}/v1/links/${payload}`, cookie, p.disk),
      }, 201);
    })
    .openapi(diskRoutes.link, async (c) => {
      const claims = verifyLink(key, presentedToken(c.req.valid('param').token, getCookie(c, LINK_COOKIE)), ctx.now());
      return serveDisk(c, claims.backup, claims.disk) as never;
    });
}

/**
 * The command that restores a disk from a signed link with stock qemu-img (as the
 * README shows it). The link's MAC goes in a cookie that QEMU's curl driver reads from
 * a secret file: the shell's own `printf` (a builtin, no process of its own) writes the
 * file, readable by its owner only, and the subshell removes it when it ends: typed at
 * a prompt, the capability is on no command line in /proc while the restore runs
 * (qemu-img's holds only the payload; a shell given the text as an argument holds it all). The format is
 * pinned (`"driver":"raw"`): nothing is probed. `-m 1`: QEMU 7.2's curl driver (Debian
 * 12) hangs about one run in twenty with qemu-img convert's default parallel requests,
 * and never with one. The link's characters need no quoting (base64url, and an
 * origin); the file names are kept to safe ones.
 */
export function qemuImgCommand(cookieUrl: string, cookie: string, disk: string): string {
  // A disk name may start with "-": as ./-NAME, no command takes it for an option.
  const name = headerSafeName(disk).replace(/^-/, './-');
  const scheme = new URL(cookieUrl).protocol.slice(0, -1);
  const spec = JSON.stringify({ driver: 'raw', file: { driver: scheme, url: cookieUrl, 'cookie-secret': 'vmvault-link' } });
  return `(umask 077; trap 'rm -f ${name}.link' EXIT; printf '%s' '${cookie}' > ${name}.link && ` +
    `qemu-img convert -p -m 1 --object secret,id=vmvault-link,file=${name}.link -O qcow2 'json:${spec}' ${name}.qcow2)`;
}

/** A disk name as it may appear in a header: anything but safe characters becomes "_". */
export function headerSafeName(name: string): string {
  return name.replace(/[^A-Za-z0-9._+-]/g, '_');
}

/**
 * Signed links to one disk of one backup, for clients that cannot send a bearer
 * header (QEMU's curl driver). The token is `<payload>.<mac>` in the URL path (no
 * query string, which some HTTP clients of block drivers mangle): the payload names
 * the backup, the disk and the expiry; the MAC is HMAC-SHA256 under a key derived
 * from the repository's MAC key, so every API replica of the same repository
 * accepts the links of the others, and a link never outlives its expiry.
 *
 * The MAC may also come in a cookie (LINK_COOKIE), with only the payload in the path:
 * QEMU's curl driver sends a cookie read from a secret file (`--object secret,file=…`),
 * so the command that restores from a link keeps the capability off qemu-img's command
 * line, where any local user could read it in /proc for as long as the restore runs.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { ApiError } from './errors.js';

export interface LinkClaims { backup: string; disk: string; expires: number }

export const DEFAULT_LINK_SECONDS = 900;
export const MAX_LINK_SECONDS = 24 * 3600;

export function linkKey(macKey: Uint8Array): Buffer {
  return createHmac('sha256', macKey).update('vmvault/v1 api disk link').digest();
}

function macOf(key: Buffer, payload: string): Buffer {
  return createHmac('sha256', key).update(payload).digest();
}

/** The cookie that may carry a link's MAC: `vmvault_link=<mac>`. */
export const LINK_COOKIE = 'vmvault_link';

/** A signed token's two parts: the payload (not secret: it names the backup, disk and expiry) and the MAC (the capability). */
export function splitToken(token: string): { payload: string; mac: string } {
  const dot = token.indexOf('.');
  return { payload: token.slice(0, dot), mac: token.slice(dot + 1) };
}

/**
 * The token a request presents: the path's `<payload>.<mac>`, or the path's `<payload>`
 * with the MAC from the LINK_COOKIE cookie (surrounding white space dropped).
 */
export function presentedToken(pathToken: string, cookieMac: string | undefined): string {
  if (pathToken.includes('.') || cookieMac === undefined) return pathToken;
  return `${pathToken}.${cookieMac.trim()}`;
}

export function signLink(key: Buffer, claims: LinkClaims): string {
  const payload = Buffer.from(JSON.stringify([claims.backup, claims.disk, claims.expires])).toString('base64url');
  return `${payload}.${macOf(key, payload).toString('base64url')}`;
}

/** The claims of a valid, unexpired token; ApiError 403 otherwise (the message says which). */
export function verifyLink(key: Buffer, token: string, nowSeconds: number): LinkClaims {
  const forbidden = (why: string) => new ApiError(403, 'FORBIDDEN', why);
  const m = /^([A-Za-z0-9_-]{1,2048})\.([A-Za-z0-9_-]{43})$/.exec(token);
  if (!m) {
    if (/^[A-Za-z0-9_-]{1,2048}$/.test(token) && decodeClaims(token)) {
      throw forbidden(`this link has no signature: give it in the path (…/links/PAYLOAD.MAC) or in a ${LINK_COOKIE}=MAC cookie, as the link's answer shows`);
    }
    throw forbidden('this link is not a valid signed link: ask for a new one (POST /v1/backups/{id}/disks/{disk}/links)');
  }
  const given = Buffer.from(m[2]!, 'base64url');
  const want = macOf(key, m[1]!);
  if (given.length !== want.length || !timingSafeEqual(given, want)) {
    throw forbidden('this link\'s signature does not match: it was altered or signed for another repository; ask for a new one');
  }
  const claims = decodeClaims(m[1]!);
  if (!claims) throw forbidden('this link is not a valid signed link: ask for a new one');
  const [backup, disk, expires] = claims;
  if (nowSeconds >= expires) throw forbidden(`this link expired at ${new Date(expires * 1000).toISOString()}: ask for a new one`);
  return { backup, disk, expires };
}

/** A payload's claims, or undefined when it is not one signLink makes. */
function decodeClaims(payload: string): [string, string, number] | undefined {
  let claims: unknown;
  try {
    claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
  } catch {
    return undefined;
  }
  if (!Array.isArray(claims) || claims.length !== 3 || typeof claims[0] !== 'string' || typeof claims[1] !== 'string' || typeof claims[2] !== 'number') return undefined;
  return claims as [string, string, number];
}

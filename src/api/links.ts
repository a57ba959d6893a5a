/**
 * Signed links to one disk of one backup, for clients that cannot send a bearer
 * header (QEMU's curl driver). The token is `<payload>.<mac>` in the URL path (no
 * query string, which some HTTP clients of block drivers mangle): the payload names
 * the backup, the disk and the expiry; the MAC is HMAC-SHA256 under a key derived
 * from the repository's MAC key, so every API replica of the same repository
 * accepts the links of the others, and a link never outlives its expiry.
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

export function signLink(key: Buffer, claims: LinkClaims): string {
  const payload = Buffer.from(JSON.stringify([claims.backup, claims.disk, claims.expires])).toString('base64url');
  return `${payload}.${macOf(key, payload).toString('base64url')}`;
}

/** The claims of a valid, unexpired token; ApiError 403 otherwise (the message says which). */
export function verifyLink(key: Buffer, token: string, nowSeconds: number): LinkClaims {
  const forbidden = (why: string) => new ApiError(403, 'FORBIDDEN', why);
  const m = /^([A-Za-z0-9_-]{1,2048})\.([A-Za-z0-9_-]{43})$/.exec(token);
  if (!m) throw forbidden('this link is not a valid signed link: ask for a new one (POST /v1/backups/{id}/disks/{disk}/links)');
  const given = Buffer.from(m[2]!, 'base64url');
  const want = macOf(key, m[1]!);
  if (given.length !== want.length || !timingSafeEqual(given, want)) {
    throw forbidden('this link\'s signature does not match: it was altered or signed for another repository; ask for a new one');
  }
  let claims: unknown;
  try {
    claims = JSON.parse(Buffer.from(m[1]!, 'base64url').toString('utf8'));
  } catch {
    throw forbidden('this link is not a valid signed link: ask for a new one');
  }
  if (!Array.isArray(claims) || claims.length !== 3 || typeof claims[0] !== 'string' || typeof claims[1] !== 'string' || typeof claims[2] !== 'number') {
    throw forbidden('this link is not a valid signed link: ask for a new one');
  }
  const [backup, disk, expires] = claims as [string, string, number];
  if (nowSeconds >= expires) throw forbidden(`this link expired at ${new Date(expires * 1000).toISOString()}: ask for a new one`);
  return { backup, disk, expires };
}

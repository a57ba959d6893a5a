/**
 * Bearer tokens from the configuration, stored as SHA-256 only. A presented token is
 * hashed and compared with every configured hash in constant time (all of them, so
 * the time taken does not tell which one matched). Roles are ordered: an admin may
 * do what an operator may, an operator what a viewer may.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { ApiToken, Role } from '../config/schema.js';

export type { Role };
const RANK: Record<Role, number> = { viewer: 0, operator: 1, admin: 2 };

export interface Principal { name: string; role: Role }

export class TokenTable {
  private readonly entries: { name: string; role: Role; hash: Buffer }[];
  constructor(tokens: readonly ApiToken[]) {
    this.entries = tokens.map((t) => ({ name: t.name, role: t.role, hash: Buffer.from(t.sha256, 'hex') }));
  }

  /** The token's owner, or undefined when the header carries no known token. */
  authenticate(authorization: string | undefined): Principal | undefined {
    const m = /^Bearer[ ]+([\x21-\x7e]{1,512})[ ]*$/i.exec(authorization ?? '');
    if (!m) return undefined;
    const presented = createHash('sha256').update(m[1]!).digest();
    let found: Principal | undefined;
    for (const e of this.entries) {
      if (timingSafeEqual(presented, e.hash) && !found) found = { name: e.name, role: e.role };
    }
    return found;
  }
}

export function allows(have: Role, need: Role): boolean {
  return RANK[have] >= RANK[need];
}

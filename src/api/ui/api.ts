/**
 * The dashboard's API client: hono/client's typed clients, one per route module (the
 * types come from the modules themselves, so a change of a route's schema breaks this
 * build), with the bearer token of this tab's sessionStorage on every request.
 * GET /v1/status may not exist on this server: it is fetched untyped and optional.
 */
import { hc, type ClientResponse } from 'hono/client';
import { browser } from './browser.js';
import type { BackupsApp } from '../routes/backups.js';
import type { DisksLinksApp } from '../routes/disks-links.js';
import type { JobsApp } from '../routes/jobs.js';
import type { PoliciesApp } from '../routes/policies.js';
import type { SnapshotsApp } from '../routes/snapshots.js';
import type { VmsApp } from '../routes/vms.js';

const TOKEN_KEY = 'vmvault.token';

export const token = {
  get: (): string | null => browser.sessionStorage.getItem(TOKEN_KEY),
  set: (t: string): void => browser.sessionStorage.setItem(TOKEN_KEY, t),
  clear: (): void => browser.sessionStorage.removeItem(TOKEN_KEY),
};

const authorization = (): Record<string, string> => ({ authorization: `Bearer ${token.get() ?? ''}` });
const options = { headers: authorization };
const origin = browser.location.origin;

export const api = {
  vms: hc<VmsApp>(origin, options).v1.vms,
  snapshots: hc<SnapshotsApp>(origin, options).v1.vms,
  backups: hc<BackupsApp>(origin, options).v1.backups,
  disks: hc<DisksLinksApp>(origin, options).v1.backups,
  jobs: hc<JobsApp>(origin, options).v1.jobs,
  policies: hc<PoliciesApp>(origin, options).v1.policies,
};

/** An answer that is not a success, with the API's error code and message. */
export class ApiFailure extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
  }
}

/** Fired when the API refuses the token: the page goes back to the sign-in form. */
export const UNAUTHORIZED_EVENT = 'vmvault-unauthorized';

type Success<R> = R extends ClientResponse<infer T, infer S, 'json'> ? (S extends 200 | 201 | 202 ? T : never) : never;

/** The body of a successful answer; ApiFailure (with the API's message) otherwise. */
export async function ok<R extends ClientResponse<unknown, number, string>>(request: Promise<R>): Promise<Success<R>> {
  const r = await request;
  if (r.ok) return (await r.json()) as Success<R>;
  const body = (await r.json().catch(() => null)) as { error?: { code?: string; message?: string } } | null;
  if (r.status === 401) browser.dispatchEvent(new Event(UNAUTHORIZED_EVENT));
  throw new ApiFailure(r.status, body?.error?.code ?? 'HTTP', body?.error?.message ?? `HTTP ${r.status}`);
}

/** GET /v1/status, as served by a server that has it (null when it answers 404). */
export interface StatusView {
  generatedAt: string;
  policies: { name: string; schedule: string; nextRun: string | null }[];
  vms: { name: string; host: string; policy: string | null; nextRun: string | null; lastBackup: unknown; lastSuccessAt: string | null; lastFailure: unknown; overdue: boolean }[];
  hosts: { host: string; online: boolean; workers: { id: string; lastSeen: string }[]; queue: { waiting: number; active: number; delayed: number; failed: number } }[];
}

export async function status(): Promise<StatusView | null> {
  const r = await fetch('/v1/status', { headers: authorization() });
  if (r.status === 404) return null;
  if (r.status === 401) browser.dispatchEvent(new Event(UNAUTHORIZED_EVENT));
  if (!r.ok) throw new ApiFailure(r.status, 'HTTP', `GET /v1/status answered ${r.status}`);
  // Another part of the service answers this: a shape other than expected shows as empty, never breaks the page.
  const body = (await r.json()) as Partial<StatusView> | null;
  const list = <T>(v: T[] | undefined): T[] => (Array.isArray(v) ? v : []);
  return { generatedAt: String(body?.generatedAt ?? ''), policies: list(body?.policies), vms: list(body?.vms), hosts: list(body?.hosts).map((x) => {
    const q: Partial<StatusView['hosts'][number]['queue']> = x.queue ?? {};
    return { ...x, workers: list(x.workers), queue: { waiting: q.waiting ?? 0, active: q.active ?? 0, delayed: q.delayed ?? 0, failed: q.failed ?? 0 } };
  }) };
}

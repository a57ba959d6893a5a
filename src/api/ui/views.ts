/** The sections of the dashboard, rendered from the state (tables only: the forms stay put). */
import { browser } from './browser.js';
import { fill, h, setText, table, type Child } from './dom.js';
import { bytes, duration, percent, relative, shortId, when } from './format.js';
import type { Backup, Job, Preview, Progress, State } from './state.js';

/** What the rows' buttons do (./actions.ts). */
export interface RowActions {
  backup(vm: string): void;
  select(vm: string): void;
  restore(b: Backup): void;
  link(b: Backup, disk: string): void;
  revert(vm: string, name: string): void;
  remove(vm: string, name: string): void;
}

const backupJobs = (s: State, vm: string) => s.jobs.filter((j) => j.name === 'backup' && (j.data as { vm?: string } | null)?.vm === vm);
const pending = (j: Job) => j.state === 'active' || j.state === 'waiting' || j.state === 'delayed' || j.state === 'prioritized';

function lastResult(s: State, vm: string, last: Backup | undefined): { text: string; cls: string; title?: string } {
  const job = backupJobs(s, vm)[0];
  if (job && pending(job)) return { text: job.state === 'active' ? 'running' : 'queued', cls: 'running' };
  const failedAfter = job?.state === 'failed' && (!last || Date.parse(job.finishedAt ?? job.createdAt) > Date.parse(last.time));
  if (failedAfter) return { text: 'failed', cls: 'failed', ...(job.error ? { title: job.error } : {}) };
  return last ? { text: 'ok', cls: 'ok' } : { text: 'never backed up', cls: 'hint' };
}

const modeOf = (b: Backup) => [...new Set(b.disks.map((d) => d.mode ?? 'full'))].join(', ');
const sizeOf = (b: Backup) => b.disks.reduce((n, d) => n + d.virtualSize, 0);
const verificationOf = (b: Backup): Child => b.verification
  ? h('span', { class: b.verification.status }, `${b.verification.status} (${relative(b.verification.lastVerified)})`)
  : h('span', { class: 'hint' }, 'not verified');

/** Shown only while some backup's manifest cannot be read. */
export function renderUnreadable(s: State): void {
  const rows = s.unreadable.map((u) => h('tr', { 'data-unreadable': u.id },
    h('td', { title: u.id }, h('code', {}, shortId(u.id))), h('td', { class: 'failed' }, u.kind), h('td', {}, u.problem), h('td', {}, u.advice)));
  fill('unreadable', table(['Backup', 'Kind', 'Problem', 'What to do'], rows, ''));
  const section = browser.document.getElementById('unreadable');
  if (section) section.hidden = s.unreadable.length === 0;
}

export function renderVms(s: State, act: RowActions): void {
  const now = Date.now();
  const rows = s.vms.map((vm) => {
    const last = s.backups.find((b) => b.vm === vm.name);
    const st = s.status?.vms.find((v) => v.name === vm.name);
    const result = lastResult(s, vm.name, last);
    return h('tr', { 'data-vm': vm.name, class: [st?.overdue ? 'overdue' : '', s.selected === vm.name ? 'selected' : ''].join(' ').trim() || undefined },
      h('td', {}, vm.name), h('td', {}, vm.host),
      h('td', {}, last ? h('span', { title: when(last.time) }, relative(last.time, now)) : '–'),
      h('td', { class: `result ${result.cls}`, title: result.title }, result.text),
      h('td', {}, last ? bytes(sizeOf(last)) : ''), h('td', {}, last ? modeOf(last) : ''), h('td', {}, last ? verificationOf(last) : ''),
      h('td', { class: 'next-run' }, s.status === null ? 'status not available' : st?.nextRun ? h('span', { title: when(st.nextRun) }, relative(st.nextRun, now)) : st ? 'not scheduled' : ''),
      h('td', {}, st?.overdue ? h('span', { class: 'failed' }, 'overdue') : ''),
      h('td', {}, h('button', { onclick: () => act.backup(vm.name), 'data-action': 'backup' }, 'Back up now'), ' ',
        h('button', { onclick: () => act.select(vm.name), 'data-action': 'select' }, 'Backups & snapshots')));
  });
  fill('vms', table(['VM', 'Host', 'Last backup', 'Status', 'Size', 'Mode', 'Verification', 'Next run', '', ''], rows, 'No VMs in the inventory.'));
}

function progressCell(j: Job): Child {
  const p = j.progress as Progress | null;
  if (!p || typeof p !== 'object' || typeof p.bytesTotal !== 'number') return j.state === 'completed' ? 'done' : '';
  const frac = p.bytesTotal > 0 ? Math.min(1, p.bytesDone / p.bytesTotal) : 1;
  const running = j.state === 'active';
  const eta = running && p.bytesPerSecond > 0 ? ` · ETA ${duration((p.bytesTotal - p.bytesDone) / p.bytesPerSecond)}` : '';
  return h('span', { class: 'progress' },
    h('span', { class: 'bar' }, h('span', { style: `width:${Math.round(frac * 100)}%` })),
    `${percent(p.bytesDone, p.bytesTotal)} · ${bytes(p.bytesDone)} of ${bytes(p.bytesTotal)} · ${bytes(p.bytesPerSecond)}/s${eta}${p.disk ? ` · ${p.disk}` : ''}`);
}

function target(j: Job): string {
  const d = (j.data ?? {}) as { vm?: string; backupId?: string; kind?: string; policy?: string; op?: string; name?: string; directory?: string };
  if (d.backupId) return `backup ${shortId(d.backupId)} → ${d.directory ?? ''}`;
  if (d.vm) return [d.vm, d.op, d.name].filter(Boolean).join(' ');
  return [d.kind, d.policy].filter(Boolean).join(' ');
}

export function renderJobs(s: State): void {
  // A snapshot list is the dashboard's own question to a host, not work anyone asked for.
  const shown = s.jobs.filter((j) => (j.data as { op?: string } | null)?.op !== 'list');
  const rows = shown.map((j) => h('tr', { 'data-job': j.id, 'data-state': j.state },
    h('td', {}, h('code', {}, j.id)), h('td', {}, j.name), h('td', {}, target(j)), h('td', {}, j.queue.replace(/^vmvault-(host-)?/, '')),
    h('td', { class: `state ${j.state}` }, j.state), h('td', { class: 'progress-cell' }, progressCell(j)),
    h('td', {}, h('span', { title: when(j.createdAt) }, relative(j.createdAt))),
    h('td', { class: 'error' }, j.error ?? '')));
  fill('jobs', table(['Job', 'Kind', 'Target', 'Queue', 'State', 'Progress', 'Created', 'Error'], rows, 'No jobs.'));
}

export function renderBackups(s: State, act: RowActions): void {
  setText('backups', '.vm-name', s.selected ? `of ${s.selected}` : '');
  setText('snapshots', '.vm-name', s.selected ? `of ${s.selected}` : '');
  const mine = s.backups.filter((b) => b.vm === s.selected);
  const rows = mine.map((b) => {
    const st = b.stats;
    const chunks = st.chunksNew + st.chunksReused + (st.chunksUnchanged ?? 0);
    return h('tr', { 'data-backup': b.id },
      h('td', { title: when(b.time) }, relative(b.time)), h('td', {}, h('code', {}, shortId(b.id))),
      h('td', {}, bytes(sizeOf(b))), h('td', {}, bytes(st.bytesUploaded)),
      h('td', { title: `${st.chunksReused + (st.chunksUnchanged ?? 0)} of ${chunks} data chunks already in the repository` }, percent(st.chunksReused + (st.chunksUnchanged ?? 0), chunks)),
      h('td', {}, b.labels.join(', ')), h('td', {}, b.policy ?? ''), h('td', {}, modeOf(b)), h('td', {}, verificationOf(b)),
      h('td', {}, h('button', { onclick: () => act.restore(b), 'data-action': 'restore' }, 'Restore…'),
        ...b.disks.map((d) => h('button', { onclick: () => act.link(b, d.name), 'data-action': 'link', title: `a signed link to disk ${d.name}` }, `Link ${d.name}`))));
  });
  fill('backups', s.selected ? table(['Time', 'Id', 'Size', 'New data', 'Dedup', 'Labels', 'Policy', 'Mode', 'Verification', ''], rows, `No backups of ${s.selected}.`) : h('p', { class: 'hint' }, 'Choose a VM.'));
}

export function renderSnapshots(s: State, act: RowActions): void {
  if (!s.snapshots || s.snapshots.vm !== s.selected) return;
  const vm = s.snapshots.vm;
  const rows = s.snapshots.items.map((sn) => h('tr', { 'data-snapshot': sn.name },
    h('td', {}, sn.name), h('td', {}, sn.label ?? ''), h('td', { title: when(sn.created) }, relative(sn.created)),
    h('td', {}, sn.expiresAt ? h('span', { title: when(sn.expiresAt) }, relative(sn.expiresAt)) : 'never'),
    h('td', {}, sn.disks.join(', '), sn.missingDisks.length ? h('span', { class: 'failed' }, ` (missing on ${sn.missingDisks.join(', ')})`) : ''),
    h('td', {}, h('button', { onclick: () => act.revert(vm, sn.name), 'data-action': 'revert' }, 'Revert…'), ' ',
      h('button', { onclick: () => act.remove(vm, sn.name), 'data-action': 'delete' }, 'Delete'))));
  fill('snapshots', table(['Name', 'Label', 'Created', 'Expires', 'Disks', ''], rows, `No snapshots of ${vm}.`));
}

const retentionText = (r: unknown) => Object.entries((r ?? {}) as Record<string, unknown>)
  .filter(([k]) => k !== 'byLabel').map(([k, v]) => `${k.replace(/^keep/, '').toLowerCase()} ${String(v)}`).join(', ');

export function renderPolicies(s: State): void {
  const now = Date.now();
  const rows = s.policies.map(({ policy }) => {
    const p = policy as { name: string; schedule: string; select?: { vms?: string[]; tags?: string[] }; retention?: unknown };
    const next = s.status?.policies.find((x) => x.name === p.name)?.nextRun;
    return h('tr', { 'data-policy': p.name }, h('td', {}, p.name), h('td', {}, h('code', {}, p.schedule)),
      h('td', {}, [...(p.select?.vms ?? []), ...(p.select?.tags ?? []).map((t) => `tag:${t}`)].join(', ')),
      h('td', {}, retentionText(p.retention)),
      h('td', {}, s.status === null ? 'status not available' : next ? h('span', { title: when(next) }, relative(next, now)) : ''));
  });
  fill('policies', table(['Policy', 'Schedule', 'Selects', 'Keeps', 'Next run'], rows, 'No policies.'),
    ...s.problems.map((p) => h('p', { class: 'error' }, `${p.file}:${p.line}:${p.col}: ${p.path}: ${p.message}`)));
}

export function renderPreview(p: Preview): void {
  const rows = p.items.map((i) => h('tr', { 'data-backup': i.id, class: i.keep ? 'keep' : 'forget' },
    h('td', { title: when(i.time) }, relative(i.time)), h('td', {}, h('code', {}, shortId(i.id))), h('td', {}, i.vm), h('td', {}, i.labels.join(', ')),
    h('td', { class: i.keep ? 'ok' : 'failed' }, i.keep ? 'keep' : 'forget'), h('td', {}, i.reasons.join(', '))));
  const kept = p.items.filter((i) => i.keep).length;
  browser.document.getElementById('preview')?.replaceChildren(
    h('p', {}, `Policy ${p.policy} at ${when(p.at)}: keeps ${kept}, forgets ${p.items.length - kept}.`),
    table(['Time', 'Backup', 'VM', 'Labels', 'Verdict', 'Kept by'], rows, 'The policy governs none of these backups.'));
}

export function renderHosts(s: State): void {
  if (s.status === null) return fill('hosts', h('p', { class: 'hint' }, 'status not available (this server has no GET /v1/status)'));
  if (!s.status) return fill('hosts', h('p', { class: 'hint' }, 'loading…'));
  const rows = s.status.hosts.map((x) => h('tr', { 'data-host': x.host },
    h('td', {}, x.host), h('td', { class: x.online ? 'ok' : 'failed' }, x.online ? 'online' : 'offline'),
    h('td', {}, x.workers.map((w) => `${w.id} (seen ${relative(w.lastSeen)})`).join(', ') || 'none'),
    h('td', {}, `${x.queue.waiting} waiting, ${x.queue.active} active, ${x.queue.delayed} delayed, ${x.queue.failed} failed`)));
  fill('hosts', table(['Host', 'State', 'Workers', 'Queue'], rows, 'No hosts.'));
}

/** The datalist of the restore form: every host a VM is on or the status knows. */
export function renderHostList(s: State): void {
  const hosts = [...new Set([...s.vms.map((v) => v.host), ...(s.status?.hosts.map((x) => x.host) ?? [])])].sort();
  browser.document.getElementById('host-list')?.replaceChildren(...hosts.map((x) => h('option', { value: x })));
}

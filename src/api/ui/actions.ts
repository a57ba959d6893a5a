/** What the dashboard's buttons and forms do: API calls, then a notice and a refresh. */
import { api, ApiFailure, ok } from './api.js';
import { browser } from './browser.js';
import { byId, field } from './dom.js';
import { shortId, when } from './format.js';
import { state, type Backup } from './state.js';
import { renderBackups, renderPreview, renderSnapshots, renderVms, type RowActions } from './views.js';

/** Shows `text` above the sections (an error in red). */
export function notice(text: string, error = false): void {
  const n = byId('notice');
  n.textContent = text;
  n.className = error ? 'error' : '';
}

const failure = (what: string, err: unknown) => notice(`${what}: ${err instanceof ApiFailure ? err.message : String(err)}`, true);

/** Waits between tries of a request whose answer was lost: 1 s, then 2 s. */
const RETRY_WAITS_MS = [1000, 2000];

/**
 * A request that makes a job, sent with one Idempotency-Key per action of the user, and
 * sent again with the same key when no answer came back (the network failed, not the
 * API: an ApiFailure is the API's answer and is not retried). The API answers a repeat
 * with the job the first one made, so an answer lost on the way costs no second backup,
 * restore or revert.
 */
export async function once<R>(send: (header: { 'idempotency-key': string }) => Promise<R>): Promise<R> {
  const bytes = browser.crypto.getRandomValues(new Uint8Array(16));
  const header = { 'idempotency-key': `dashboard-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}` };
  for (let attempt = 0; ; attempt++) {
    try {
      return await send(header);
    } catch (err) {
      if (err instanceof ApiFailure || attempt >= RETRY_WAITS_MS.length) throw err;
      await new Promise((r) => setTimeout(r, RETRY_WAITS_MS[attempt]));
    }
  }
}

/** Runs `fn`, reports its failure as a notice, and refreshes. */
function acting(what: string, fn: () => Promise<void>, refresh: () => void): void {
  fn().then(refresh, (err: unknown) => failure(what, err));
}

export function rowActions(refresh: () => void): RowActions {
  const actions: RowActions = {
    backup: (vm) => acting(`backup of ${vm}`, async () => {
      const r = await once((header) => ok(api.vms[':vm'].backups.$post({ param: { vm }, header, json: { labels: [] } })));
      notice(`backup of ${vm} queued: job ${r.job.id}`);
    }, refresh),
    select: (vm) => {
      state.selected = vm;
      renderVms(state, actions);
      renderBackups(state, actions);
      loadSnapshots();
    },
    restore: (b: Backup) => {
      const form = byId('restore-form');
      field(form, 'backup').value = b.id;
      byId('restore-backup').textContent = `${shortId(b.id)} of ${b.vm} (${when(b.time)})`;
      if (!field(form, 'host').value) field(form, 'host').value = b.host;
      form.hidden = false;
      field(form, 'directory').focus();
    },
    link: (b, disk) => acting(`link to ${disk}`, async () => {
      const r = await ok(api.disks[':id'].disks[':disk'].links.$post({ param: { id: b.id, disk }, json: { expiresIn: 900 } }));
      const out = byId('link-output');
      out.querySelector('.expires')!.textContent = when(r.expiresAt);
      out.querySelector('.url')!.textContent = r.url;
      out.querySelector('.command')!.textContent = r.command;
      out.hidden = false;
    }, () => {}),
    revert: (vm, name) => {
      if (!browser.confirm(`Revert ${vm} to snapshot ${name}? Everything written since the snapshot is lost.`)) return;
      acting(`revert of ${vm}`, async () => {
        const r = await once((header) => ok(api.snapshots[':vm'].snapshots[':name'].revert.$post({ param: { vm, name }, header })));
        notice(`revert of ${vm} to ${name} queued: job ${r.job.id}`);
        await settled(r.job.id);
        loadSnapshots();
      }, refresh);
    },
    remove: (vm, name) => {
      if (!browser.confirm(`Delete snapshot ${name} of ${vm}?`)) return;
      acting(`deletion of ${name}`, async () => {
        const r = await once((header) => ok(api.snapshots[':vm'].snapshots[':name'].$delete({ param: { vm, name }, header })));
        notice(`deletion of snapshot ${name} queued: job ${r.job.id}`);
        await settled(r.job.id);
        loadSnapshots();
      }, refresh);
    },
  };

  /** The host's list of the VM's snapshots (a job on its queue, answered within seconds when its worker runs). */
  const loadSnapshots = () => {
    const vm = state.selected;
    if (!vm) return;
    acting(`snapshots of ${vm}`, async () => {
      const r = await ok(api.snapshots[':vm'].snapshots.$get({ param: { vm } }));
      state.snapshots = { vm, items: r.items };
      renderSnapshots(state, actions);
    }, () => {});
  };

  wireForms(refresh, loadSnapshots);
  return actions;
}

/** A job's end, polled (for the snapshot list to follow a change). */
async function settled(id: string): Promise<void> {
  for (let i = 0; i < 120; i++) {
    const j = await ok(api.jobs[':id'].$get({ param: { id } }));
    if (j.state === 'completed' || j.state === 'failed') return;
    await new Promise((r) => setTimeout(r, 500));
  }
}

function wireForms(refresh: () => void, loadSnapshots: () => void): void {
  const restore = byId('restore-form');
  restore.addEventListener('submit', (e) => {
    e.preventDefault();
    const id = field(restore, 'backup').value;
    acting('restore', async () => {
      const json = { host: field(restore, 'host').value, directory: field(restore, 'directory').value, format: field(restore, 'format').value, overwrite: field(restore, 'overwrite').checked };
      const r = await once((header) => ok(api.backups[':id'].restore.$post({ param: { id }, header, json })));
      restore.hidden = true;
      notice(`restore of ${shortId(id)} queued: job ${r.job.id}`);
    }, refresh);
  });
  byId('restore-cancel').addEventListener('click', () => { restore.hidden = true; });

  const snap = byId('snapshot-form');
  snap.addEventListener('submit', (e) => {
    e.preventDefault();
    const vm = state.selected;
    if (!vm) return notice('choose a VM first', true);
    const optional = (name: string) => field(snap, name).value.trim() || undefined;
    const label = optional('label');
    const expireIn = optional('expireIn');
    acting(`snapshot of ${vm}`, async () => {
      const json = { name: field(snap, 'name').value, ...(label ? { label } : {}), ...(expireIn ? { expireIn } : {}) };
      const r = await once((header) => ok(api.snapshots[':vm'].snapshots.$post({ param: { vm }, header, json })));
      notice(`snapshot of ${vm} queued: job ${r.job.id}`);
      field(snap, 'name').value = '';
      await settled(r.job.id);
      loadSnapshots();
    }, refresh);
  });
  byId('snapshots-load').addEventListener('click', loadSnapshots);

  const preview = byId('preview-form');
  preview.addEventListener('submit', (e) => {
    e.preventDefault();
    const name = field(preview, 'policy').value;
    const vm = field(preview, 'vm').value;
    acting(`retention preview of ${name}`, async () => {
      renderPreview(await ok(api.policies[':name'].preview.$get({ param: { name }, query: vm ? { vm } : {} })));
    }, () => {});
  });
}

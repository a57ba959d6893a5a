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

/** Runs `fn`, reports its failure as a notice, and refreshes. */
function acting(what: string, fn: () => Promise<void>, refresh: () => void): void {
  fn().then(refresh, (err: unknown) => failure(what, err));
}

export function rowActions(refresh: () => void): RowActions {
  const actions: RowActions = {
    backup: (vm) => acting(`backup of ${vm}`, async () => {
      const r = await ok(api.vms[':vm'].backups.$post({ param: { vm }, header: {}, json: { labels: [] } }));
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
        const r = await ok(api.snapshots[':vm'].snapshots[':name'].revert.$post({ param: { vm, name }, header: {} }));
        notice(`revert of ${vm} to ${name} queued: job ${r.job.id}`);
        await settled(r.job.id);
        loadSnapshots();
      }, refresh);
    },
    remove: (vm, name) => {
      if (!browser.confirm(`Delete snapshot ${name} of ${vm}?`)) return;
      acting(`deletion of ${name}`, async () => {
        const r = await ok(api.snapshots[':vm'].snapshots[':name'].$delete({ param: { vm, name }, header: {} }));
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
      const r = await ok(api.backups[':id'].restore.$post({
        param: { id },
        header: {},
        json: { host: field(restore, 'host').value, directory: field(restore, 'directory').value, format: field(restore, 'format').value, overwrite: field(restore, 'overwrite').checked },
      }));
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
      const r = await ok(api.snapshots[':vm'].snapshots.$post({ param: { vm }, header: {}, json: { name: field(snap, 'name').value, ...(label ? { label } : {}), ...(expireIn ? { expireIn } : {}) } }));
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

/**
 * The dashboard's entry point: the sign-in form (the token is kept in this tab's
 * sessionStorage and sent as a bearer header), then a refresh loop over the API:
 * every second while a job runs, every 3 s otherwise.
 */
import { api, ApiFailure, ok, status, token, UNAUTHORIZED_EVENT } from './api.js';
import { rowActions, notice } from './actions.js';
import { browser } from './browser.js';
import { byId, field, h } from './dom.js';
import { state } from './state.js';
import { renderBackups, renderHostList, renderHosts, renderJobs, renderPolicies, renderSnapshots, renderUnreadable, renderVms, type RowActions } from './views.js';

const FAST_MS = 1000;
const SLOW_MS = 3000;

let timer: ReturnType<typeof setTimeout> | undefined;
let actions: RowActions | undefined;
let generation = 0;

function showSignIn(message = ''): void {
  token.clear();
  generation++;
  clearTimeout(timer);
  byId('app').hidden = true;
  byId('sign-out').hidden = true;
  byId('sign-in').hidden = false;
  byId('sign-in-error').textContent = message;
  field(byId('sign-in'), 'token').focus();
}

function showApp(): void {
  byId('sign-in').hidden = true;
  byId('app').hidden = false;
  byId('sign-out').hidden = false;
  actions ??= rowActions(() => void refresh());
  void refresh();
}

/** Fills the preview form's choices, keeping what is chosen. */
function previewChoices(): void {
  const form = byId('preview-form');
  const set = (name: string, values: string[], blank?: string) => {
    const sel = field(form, name);
    const was = sel.value;
    sel.replaceChildren(...(blank !== undefined ? [h('option', { value: '' }, blank)] : []), ...values.map((v) => h('option', { value: v }, v)));
    if (values.includes(was)) sel.value = was;
  };
  set('policy', state.policies.map((p) => String((p.policy as { name?: unknown }).name)));
  set('vm', state.vms.map((v) => v.name), 'all VMs');
}

async function refresh(): Promise<void> {
  clearTimeout(timer);
  const mine = ++generation;
  const [vms, backups, jobs, policies, st] = await Promise.allSettled([
    ok(api.vms.$get({ query: { limit: '1000' } })),
    ok(api.backups.$get({ query: { limit: '1000' } })),
    ok(api.jobs.$get({ query: { limit: '30' } })),
    ok(api.policies.$get()),
    status(),
  ]);
  if (mine !== generation || !actions) return; // signed out, or a newer refresh started
  const failed = [vms, backups, jobs, policies].find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (vms.status === 'fulfilled') state.vms = vms.value.items;
  if (backups.status === 'fulfilled') { state.backups = backups.value.items; state.unreadable = backups.value.unreadable; }
  if (jobs.status === 'fulfilled') state.jobs = jobs.value.items;
  if (policies.status === 'fulfilled') { state.policies = policies.value.items; state.problems = policies.value.problems; }
  state.status = st.status === 'fulfilled' ? st.value : undefined;
  state.selected ??= state.vms[0]?.name;
  renderUnreadable(state);
  renderVms(state, actions);
  renderJobs(state);
  renderBackups(state, actions);
  renderSnapshots(state, actions);
  renderPolicies(state);
  renderHosts(state);
  renderHostList(state);
  previewChoices();
  const err = failed?.reason as unknown;
  byId('refreshed').textContent = err ? `refresh failed: ${err instanceof ApiFailure ? err.message : String(err)}` : `updated ${new Date().toLocaleTimeString()}`;
  const busy = state.jobs.some((j) => j.state === 'active' || j.state === 'waiting');
  timer = setTimeout(() => void refresh(), busy ? FAST_MS : SLOW_MS);
}

function start(): void {
  const form = byId('sign-in');
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const t = field(form, 'token').value.trim();
    token.set(t);
    // One call decides: a token the API does not know goes back to the form with its message.
    ok(api.vms.$get({ query: { limit: '1' } })).then(() => { field(form, 'token').value = ''; showApp(); }, (err: unknown) => {
      showSignIn(err instanceof ApiFailure ? err.message : `the API did not answer: ${String(err)}`);
    });
  });
  byId('sign-out').addEventListener('click', () => { notice(''); showSignIn(); });
  browser.addEventListener(UNAUTHORIZED_EVENT, () => showSignIn('the API no longer accepts this token: sign in again'));
  if (token.get()) showApp();
  else showSignIn();
}

start();

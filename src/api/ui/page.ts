/**
 * The dashboard's page and stylesheet (server side). The page is a skeleton: every
 * section is filled by the script (./main.ts) once signed in; forms stay in place
 * while the tables around them refresh. Its only inline script is the import map.
 */

export function dashboardHtml(importMap: string): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vmvault</title>
<link rel="stylesheet" href="/ui/dashboard.css">
<script type="importmap">${importMap}</script>
<script type="module" src="/ui/main.js"></script>
</head>
<body>
<header><h1>vmvault</h1><span id="refreshed"></span><button id="sign-out" hidden>Sign out</button></header>
<form id="sign-in" hidden>
  <h2>Sign in</h2>
  <label>API token <input id="token" name="token" type="password" autocomplete="off" required></label>
  <button type="submit">Sign in</button>
  <p id="sign-in-error" class="error" role="alert"></p>
  <p class="hint">A bearer token from <code>api.tokens</code>; it stays in this tab only (session storage).</p>
</form>
<main id="app" hidden>
  <p id="notice" role="status"></p>
  <section id="unreadable" class="alarm" role="alert" hidden><h2>Backups that cannot be read</h2>
    <p class="hint">Their manifests are damaged, or not files vmvault wrote: they are in no list below, and gc deletes no chunk until each is put back or removed.</p><div class="body"></div></section>
  <section id="vms"><h2>Virtual machines</h2><div class="body"></div></section>
  <section id="jobs"><h2>Jobs</h2><div class="body"></div></section>
  <section id="backups"><h2>Backups <span class="vm-name"></span></h2><div class="body"></div>
    <form id="restore-form" hidden>
      <h3>Restore backup <span id="restore-backup"></span></h3>
      <input type="hidden" name="backup">
      <label>Host <input name="host" list="host-list" required></label>
      <label>Directory <input name="directory" required placeholder="/var/lib/vmvault/restore/web"></label>
      <label>Format <select name="format"><option>qcow2</option><option>raw</option><option>vmdk</option><option>vdi</option></select></label>
      <label><input type="checkbox" name="overwrite"> overwrite</label>
      <button type="submit">Restore</button> <button type="button" id="restore-cancel">Cancel</button>
    </form>
    <datalist id="host-list"></datalist>
    <div id="link-output" hidden><h3>Signed link</h3><p>Valid until <span class="expires"></span>, usable without a token:</p><pre class="url"></pre><pre class="command"></pre></div>
  </section>
  <section id="snapshots"><h2>Snapshots <span class="vm-name"></span></h2>
    <form id="snapshot-form">
      <label>Name <input name="name" required pattern="[A-Za-z0-9][A-Za-z0-9._-]*" placeholder="before-upgrade"></label>
      <label>Label <input name="label" placeholder="pre-update"></label>
      <label>Expires in <input name="expireIn" placeholder="7d"></label>
      <button type="submit">Take snapshot</button> <button type="button" id="snapshots-load">Refresh list</button>
    </form>
    <div class="body"><p class="hint">Lists come from the VM's host: press Refresh list.</p></div>
  </section>
  <section id="policies"><h2>Policies</h2><div class="body"></div>
    <form id="preview-form"><label>Retention preview of <select name="policy"></select></label> <label>for VM <select name="vm"></select></label> <button type="submit">Preview</button></form>
    <div id="preview"></div>
  </section>
  <section id="hosts"><h2>Hosts</h2><div class="body"></div></section>
</main>
</body>
</html>
`;
}

export const DASHBOARD_CSS = `
:root { font-family: system-ui, sans-serif; font-size: 14px; color: #1d2329; background: #f4f6f8; }
body { margin: 0; }
header { display: flex; align-items: center; gap: 1em; padding: .5em 1.5em; background: #22313f; color: #fff; }
header h1 { font-size: 1.3em; margin: 0; }
#refreshed { flex: 1; font-size: .85em; opacity: .8; }
main, #sign-in { padding: 1em 1.5em; }
#sign-in { max-width: 28em; }
section { background: #fff; border: 1px solid #d5dbe1; border-radius: 6px; padding: .5em 1em 1em; margin-bottom: 1em; }
h2 { font-size: 1.1em; } h3 { font-size: 1em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid #e5e9ed; vertical-align: top; }
th { font-weight: 600; color: #4a5560; font-size: .9em; }
tr.overdue td { background: #fde2c8; }
tr.overdue td:first-child { border-left: 4px solid #d9822b; }
tr.selected td { background: #e6f0fa; }
.error, .failed, .damaged { color: #b3261e; }
.ok, .completed { color: #2e7d32; }
.active, .running { color: #1565c0; }
.hint { color: #68737d; font-size: .9em; }
.bar { display: inline-block; margin-right: .5em; width: 8em; height: .7em; background: #e5e9ed; border-radius: 3px; overflow: hidden; vertical-align: middle; }
.bar > span { display: block; height: 100%; background: #1565c0; }
tr[data-state=completed] .bar > span { background: #2e7d32; }
form label { margin-right: 1em; }
input, select, button { font: inherit; }
button { cursor: pointer; }
pre { background: #f4f6f8; padding: .5em; white-space: pre-wrap; word-break: break-all; }
#notice:empty { display: none; }
section.alarm { border-color: #b3261e; border-left: 4px solid #b3261e; }
#unreadable td { overflow-wrap: anywhere; }
#notice { background: #e6f0fa; padding: .4em .8em; border-radius: 4px; }
#notice.error { background: #fbe3e1; }
`;

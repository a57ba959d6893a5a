/**
 * Changed-block tracking of a running VM (the qemu driver): the persistent dirty
 * bitmaps of src/vm/change-tracking.ts, kept by the running QEMU and reached over QMP.
 *
 * - The new bitmap `vmvault-<backup id>` is added to each qcow2 disk's base node in
 *   the same `transaction` as the overlays: it starts at the very instant of the
 *   backup. Writes after it go to the overlay and reach the base through block-commit,
 *   which marks it (and the previous bitmap, which is still counting).
 * - The previous backup's bitmap is read through an NBD export of the base node by
 *   QEMU's own NBD server, on a unix socket in a private directory, with our NBD
 *   client negotiating `qemu:dirty-bitmap:NAME`. A server someone else started is not
 *   used (anyone who can reach it could read the disk): that disk is read in full.
 * - After the overlays are merged back (the base is writable again), one vmvault
 *   bitmap is kept per disk: the new one once its backup is saved, the previous one
 *   otherwise. Any other is a killed run's and is removed then too.
 * - A run killed while it exported leaves the export, and the server it started, in
 *   QEMU: `recoverExports` removes them. The server is known as ours by a marker
 *   object (`vmvault-qemu-nbd-<token>`, an authz-simple whose identity is the socket's
 *   path) added before it is started and removed after it is stopped, and by that
 *   socket, in a directory named after the same token, still answering.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { NbdClient } from '../disk/nbd.js';
import { errorMessage, VmvaultError } from '../errors.js';
import type { ChangedBlocks, FrozenDisk, NamedDisk } from '../pipeline/backup.js';
import { bitmapName, chainStamps, decideRunning, ownBitmap, tracked, withAudit, type AuditPolicy, type NodeBitmap } from './change-tracking.js';
import type { Warn } from './guest-agent.js';
import type { TransactionAction } from './overlays.js';
import type { AttachedDisk } from './qemu-blocks.js';
import type { QmpClient } from './qmp.js';

const MARKER_PREFIX = 'vmvault-qemu-nbd-';
const EXPORT_PREFIX = 'vmvault-export-';
const EXPORT_DELETE_TIMEOUT_MS = 30_000;

/** Every node's dirty bitmaps, by node name. */
export async function nodeBitmaps(qmp: QmpClient): Promise<Map<string, NodeBitmap[]>> {
  const nodes = await qmp.execute<{ 'node-name': string; 'dirty-bitmaps'?: NodeBitmap[] }[]>('query-named-block-nodes', { flat: true });
  return new Map(nodes.map((n) => [n['node-name'], n['dirty-bitmaps'] ?? []]));
}

/** Where a server of run `token` listens: a private directory, with a path short enough for a unix socket. */
function socketDir(token: string): string {
  const tmp = os.tmpdir().length <= 60 ? os.tmpdir() : '/tmp';
  return path.join(tmp, `${MARKER_PREFIX}${token}`);
}

function listening(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(socket);
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

/** Deletes an export and waits until QEMU has let go of it (its bitmap is busy until then). */
async function deleteExport(qmp: QmpClient, id: string): Promise<void> {
  const mark = qmp.eventMark();
  await qmp.execute('block-export-del', { id, mode: 'hard' });
  await qmp.waitEvent('BLOCK_EXPORT_DELETED', (d) => d?.id === id, EXPORT_DELETE_TIMEOUT_MS, { after: mark });
}

/**
 * Removes what a killed run left in this QEMU: its bitmap exports, and the NBD server
 * it started. Returns how many things it removed.
 */
export async function recoverExports(qmp: QmpClient, warn: Warn): Promise<number> {
  let n = 0;
  const exports = await qmp.execute<{ id: string }[]>('query-block-exports');
  for (const e of exports.filter((x) => x.id.startsWith(EXPORT_PREFIX))) {
    warn(`removing NBD export ${e.id} left in QEMU by an earlier run`);
    await deleteExport(qmp, e.id);
    n++;
  }
  const objects = await qmp.execute<{ name: string }[]>('qom-list', { path: '/objects' });
  for (const o of objects.filter((x) => x.name.startsWith(MARKER_PREFIX))) {
    const socket = await qmp.execute<string>('qom-get', { path: `/objects/${o.name}`, property: 'identity' });
    const dir = path.dirname(socket);
    // Our marker and our socket answering: this QEMU serves there, on a server a killed run started.
    if (path.basename(dir) === o.name && await listening(socket)) {
      warn(`stopping the NBD server an earlier run started in QEMU (on ${socket})`);
      await qmp.execute('nbd-server-stop');
      n++;
    }
    await qmp.execute('object-del', { id: o.name });
    if (path.basename(dir) === o.name) await fs.rm(dir, { recursive: true, force: true });
  }
  return n;
}

interface QueryNode { 'node-name': string; image?: { 'format-specific'?: { data?: { compat?: string } } } }

interface Tracked { disk: AttachedDisk; index: number; previous?: string | undefined; previousKnown: boolean }

/**
 * The tracking of one backup of a running VM: `actions()` go into the overlays'
 * transaction; `freeze` decides each disk and opens the previous bitmaps; `release`
 * (before the overlays are merged) closes the exports; `rotate` (after) keeps one
 * bitmap per disk. `release` and `rotate` never throw: what they cannot remove, the
 * next run removes.
 */
export class LiveTracking {
  private readonly newBitmap: string;
  private readonly tracked: Tracked[];
  private added = false;
  private token: string | undefined;
  private socket: string | undefined;
  private markerAdded = false;
  private serverStarted = false;
  private serverFailure: string | undefined;
  private readonly exportIds: string[] = [];
  private readonly clients: NbdClient[] = [];

  private constructor(private readonly qmp: QmpClient, private readonly repoId: string, backupId: string, private readonly warn: Warn, tracked: Tracked[], private readonly untrackable: Map<number, string>) {
    this.newBitmap = bitmapName(repoId, backupId);
    this.tracked = tracked;
  }

  /**
   * The tracking of `disks` (the VM's, attached): a bitmap goes on every qcow2 base
   * node but those of qcow2 version 2 images, which cannot store one.
   */
  static async open(qmp: QmpClient, disks: AttachedDisk[], repoId: string, backupId: string, warn: Warn): Promise<LiveTracking> {
    const nodes = await qmp.execute<QueryNode[]>('query-named-block-nodes', { flat: true });
    const tracked: Tracked[] = [];
    const untrackable = new Map<number, string>();
    for (const [index, disk] of disks.entries()) {
      if (disk.format !== 'qcow2') continue;
      const compat = nodes.find((x) => x['node-name'] === disk.topNode)?.image?.['format-specific']?.data?.compat;
      if (compat === '0.10') untrackable.set(index, 'qcow2 version 2 images cannot hold a dirty bitmap: upgrade it (qemu-img amend -o compat=1.1, with the VM stopped) for incremental backups');
      else tracked.push({ disk, index, previousKnown: false });
    }
    return new LiveTracking(qmp, repoId, backupId, warn, tracked, untrackable);
  }

  /** The new bitmap on each qcow2 base node, persistent: QEMU stores it in the image at a clean exit. */
  actions(): TransactionAction[] {
    return this.tracked.map((t) => ({ type: 'block-dirty-bitmap-add', data: { node: t.disk.topNode, name: this.newBitmap, persistent: true } }));
  }

  /** Whether the transaction took the new bitmaps. */
  taken(yes: boolean): void {
    this.added = yes && this.tracked.length > 0;
  }

  /** Decides how each inspected disk (in the order of the attached disks) is read, and opens the bitmaps it reads. */
  async freeze(disks: NamedDisk[], fullRead: boolean, audit: AuditPolicy = {}): Promise<FrozenDisk[]> {
    const onNodes = await nodeBitmaps(this.qmp);
    const out: FrozenDisk[] = [];
    for (const [i, d] of disks.entries()) {
      const t = this.tracked.find((x) => x.index === i);
      if (t) Object.assign(t, { previous: d.previous?.entry.bitmap, previousKnown: true });
      const untrackable = this.untrackable.get(i);
      const stamps = await chainStamps(d);
      let decision = withAudit(d, decideRunning(d, t ? onNodes.get(t.disk.topNode) ?? [] : [], { fullRead, chainStamps: stamps, ...(untrackable ? { untrackable } : {}) }), audit);
      let changes: ChangedBlocks | undefined;
      if (t && decision.since) {
        try {
          const client = await this.openBitmap(t, decision.since, d.virtualSize);
          changes = { previous: d.previous!.entry.chunks, dirty: (o, l) => client.dirtyExtents(o, l) };
        } catch (err) {
          decision = { mode: 'full', reason: `bitmap ${decision.since} could not be read through QEMU's NBD server: ${errorMessage(err)}` };
        }
      }
      out.push(tracked(d, decision, changes, { chainStamps: stamps, ...(t && this.added ? { bitmap: this.newBitmap } : {}) }));
    }
    return out;
  }

  /** Closes the bitmap exports and stops the NBD server if this run started it. */
  async release(): Promise<void> {
    for (const c of this.clients.splice(0)) await c.close().catch(() => {});
    for (const id of this.exportIds.splice(0)) {
      await deleteExport(this.qmp, id).catch((err: unknown) => this.warn(`could not remove NBD export ${id} from QEMU (${errorMessage(err)}): the next backup removes it`));
    }
    if (this.token === undefined) return;
    try {
      if (this.serverStarted) await this.qmp.execute('nbd-server-stop');
      this.serverStarted = false;
      if (this.markerAdded) await this.qmp.execute('object-del', { id: `${MARKER_PREFIX}${this.token}` });
      this.markerAdded = false;
      if (this.socket) await fs.rm(path.dirname(this.socket), { recursive: true, force: true });
    } catch (err) {
      this.warn(`could not stop the NBD server this backup started in QEMU (${errorMessage(err)}): the next backup stops it`);
    }
  }

  /**
   * Keeps one vmvault bitmap per disk: the new one when the backup was saved, else the
   * previous backup's (when the disks were inspected; otherwise only the new one goes).
   * Run once the overlays are merged back: a base under an overlay is read-only.
   */
  async rotate(qmp: QmpClient, committed: boolean): Promise<void> {
    if (this.tracked.length === 0) return;
    let onNodes: Map<string, NodeBitmap[]>;
    try {
      onNodes = await nodeBitmaps(qmp);
    } catch (err) {
      this.warn(`could not list the VM's dirty bitmaps (${errorMessage(err)}): the next backup removes those it no longer needs`);
      return;
    }
    for (const t of this.tracked) {
      const keep = committed ? (this.added ? this.newBitmap : undefined) : t.previous;
      const ours = (onNodes.get(t.disk.topNode) ?? []).map((b) => b.name).filter((n) => ownBitmap(this.repoId, n));
      const drop = committed || t.previousKnown ? ours.filter((n) => n !== keep) : ours.filter((n) => n === this.newBitmap);
      for (const name of drop) {
        await qmp.execute('block-dirty-bitmap-remove', { node: t.disk.topNode, name }).catch((err: unknown) =>
          this.warn(`could not remove dirty bitmap ${name} from ${t.disk.path} (${errorMessage(err)}): the next backup removes it`));
      }
    }
  }

  /** An export of the base node with bitmap `name`, on a server of our own, and a client negotiating its context. */
  private async openBitmap(t: Tracked, name: string, size: number): Promise<NbdClient> {
    const socket = await this.server();
    const id = `${EXPORT_PREFIX}${this.token}-${t.index}`;
    const exportName = randomBytes(16).toString('hex');
    await this.qmp.execute('block-export-add', { type: 'nbd', id, 'node-name': t.disk.topNode, name: exportName, writable: false, bitmaps: [name] });
    this.exportIds.push(id);
    const client = await NbdClient.connect(socket, { exportName, metaContext: `qemu:dirty-bitmap:${name}` });
    this.clients.push(client);
    // Throws now, not half-way through the backup, when the server did not offer the context.
    await client.dirtyExtents(0, Math.min(size, 65536));
    return client;
  }

  /** QEMU's NBD server, started by this run on a private socket; refused when someone else's already runs. */
  private async server(): Promise<string> {
    if (this.token === undefined) {
      this.token = randomBytes(8).toString('hex');
      const dir = socketDir(this.token);
      try {
        await fs.mkdir(dir, { mode: 0o700 });
        // The marker goes first and leaves last: a server running while it exists is ours.
        const socket = this.socket = path.join(dir, 'nbd.sock');
        await this.qmp.execute('object-add', { 'qom-type': 'authz-simple', id: `${MARKER_PREFIX}${this.token}`, identity: socket });
        this.markerAdded = true;
        await this.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
        this.serverStarted = true;
      } catch (err) {
        this.serverFailure = `vmvault reads bitmaps only through an NBD server of its own, and QEMU could not start one (${errorMessage(err)})`;
      }
    }
    if (!this.serverStarted || !this.socket) throw new VmvaultError('QEMU', this.serverFailure ?? 'no NBD server');
    return this.socket;
  }
}

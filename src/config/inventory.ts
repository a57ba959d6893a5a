/**
 * The live VM inventory of a service: the configuration's VMs followed by those of
 * the state directory's VM file (./vm-file.ts). `config.vms` is kept equal to that
 * list, in place, so every part holding the configuration (scheduler, API, snapshot
 * sweep) sees VMs added or removed while it runs.
 *
 * The file is reloaded when it changes, as the policies directory is: a file that
 * becomes invalid is logged with every problem and the previous list stays in use.
 * At start an invalid file is an error (the service does not start on it).
 * add() and remove() (the API) write the file atomically, one at a time.
 */
import { watch, type FSWatcher } from 'node:fs';
import type { Logger } from 'pino';
import { NotFoundError, VmvaultError } from '../errors.js';
import { ConfigFileError } from './load.js';
import type { Config, VmConfig } from './schema.js';
import { parseVmFile, problemLines, readVmFileText, VM_FILE_NAME, vmEntriesOf, vmFilePath, writeVmFile, type InventoryBase, type VmEntry } from './vm-file.js';

const RELOAD_DELAY_MS = 200;

export class VmInventory {
  readonly file: string;
  private readonly configured: VmConfig[];
  private readonly base: InventoryBase;
  private watcher: FSWatcher | undefined;
  private reloadTimer: NodeJS.Timeout | undefined;
  private writing: Promise<unknown> = Promise.resolve();

  constructor(private readonly config: Config, private readonly log?: Logger) {
    this.file = vmFilePath(config.stateDir);
    this.configured = [...config.vms];
    this.base = { host: config.host, hosts: config.hosts, configured: this.configured.map((v) => v.name) };
  }

  /** Loads the file (throws ConfigFileError when it is invalid) and watches the state directory. */
  async start(): Promise<void> {
    await this.load();
    this.watch();
  }

  /** Loads the file once, without watching it (a command that runs and exits); throws ConfigFileError when it is invalid. */
  async load(): Promise<void> {
    const text = await readVmFileText(this.file);
    this.apply(text === undefined ? [] : parseVmFile(text, this.file, this.base));
  }

  stop(): void {
    this.watcher?.close();
    this.watcher = undefined;
    clearTimeout(this.reloadTimer);
  }

  /** The VMs of the file (not those of the configuration). */
  fromFile(): VmConfig[] {
    return this.config.vms.slice(this.configured.length);
  }

  isConfigured(name: string): boolean {
    return this.base.configured.includes(name);
  }

  /** Reads the file again; an invalid file is logged and the previous list kept. */
  async reload(): Promise<void> {
    try {
      const text = await readVmFileText(this.file);
      const before = this.fromFile().map((v) => v.name).join(',');
      this.apply(text === undefined ? [] : parseVmFile(text, this.file, this.base));
      const after = this.fromFile().map((v) => v.name);
      if (after.join(',') !== before) this.log?.info({ file: this.file, vms: after }, 'VM file reloaded');
    } catch (err) {
      if (err instanceof ConfigFileError) this.log?.error({ file: this.file, problems: problemLines(err) }, 'VM file is invalid: keeping the previous VMs until it is fixed');
      else this.log?.error({ file: this.file, err: (err as Error).message }, 'VM file could not be read: keeping the previous VMs');
    }
  }

  /** Adds a VM to the file (ConfigFileError when it is invalid or its name is taken). */
  add(entry: VmEntry): Promise<VmConfig> {
    return this.serially(async () => {
      const entries = vmEntriesOf(await readVmFileText(this.file));
      const vms = await writeVmFile(this.file, [...entries, entry], this.base);
      this.apply(vms);
      this.watch();
      return vms[vms.length - 1]!;
    });
  }

  /** Removes a VM from the file; one of the configuration file cannot be removed here. */
  remove(name: string): Promise<void> {
    return this.serially(async () => {
      if (this.isConfigured(name)) throw new VmvaultError('BAD_INPUT', `VM "${name}" is defined in the configuration file, not in ${this.file}: remove it there`);
      const entries = vmEntriesOf(await readVmFileText(this.file));
      const kept = entries.filter((e) => (e as { name?: unknown }).name !== name);
      if (kept.length === entries.length) throw new NotFoundError(`VM "${name}" is not in ${this.file}`);
      this.apply(await writeVmFile(this.file, kept, this.base));
    });
  }

  private serially<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.writing.then(fn, fn);
    this.writing = run.catch(() => {});
    return run;
  }

  private apply(fromFile: VmConfig[]): void {
    this.config.vms.splice(0, this.config.vms.length, ...this.configured, ...fromFile);
  }

  /** Watches the state directory (the file is replaced by a rename, so its own inode changes). */
  private watch(): void {
    if (this.watcher) return;
    try {
      this.watcher = watch(this.config.stateDir, (_event, name) => {
        if (name !== null && name !== VM_FILE_NAME) return;
        clearTimeout(this.reloadTimer);
        this.reloadTimer = setTimeout(() => void this.reload(), RELOAD_DELAY_MS);
      });
      this.watcher.on('error', () => this.stop());
    } catch {
      // No state directory yet: it is created by the first add(), which watches then.
    }
  }
}

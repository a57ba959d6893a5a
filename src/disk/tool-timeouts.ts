/**
 * How long vmvault waits for each external tool (qemu-img, virsh) before stopping it.
 *
 * Every run has a bound: a tool blocked on storage that stopped answering (a network
 * mount), on a file an image names (a FIFO), on a crafted image or on a libvirtd that
 * went away would otherwise hold its backup for ever, and a service worker with it (the
 * job stays active, its VM lock refreshed, the host's next jobs waiting behind it).
 * The bounds are far above what the work needs on healthy storage: stopping a writer
 * mid-write costs more than waiting a little longer. (A process stuck in the kernel on
 * a hung hard mount cannot be killed at all, and is still waited for.)
 */
import { VmvaultError } from '../errors.js';

const MINUTE = 60_000;

const DEFAULTS = {
  /** qemu-img info and the raw-writer probe (a convert of zero bytes): headers and locks only. */
  inspect: MINUTE,
  /** qemu-img map: the allocation of one range of a raw file, or of one overlay's tables; no guest data is read. */
  map: 3 * MINUTE,
  /** qemu-img check (read-only): walks every table of the image, which a crafted one can make long. */
  check: 5 * MINUTE,
  /**
   * qemu-img snapshot -c/-d/-a, bitmap --add/--remove, create: metadata writers. A snapshot
   * updates the refcount of every allocated cluster, which for a multi-terabyte image on
   * slow storage takes minutes; stopping a writer may damage the image, so this is long.
   */
  metadata: 10 * MINUTE,
  /**
   * qemu-img compare, the fixed part: it reads both images' data, so the bound grows with
   * their size (COMPARE_BYTES_PER_SECOND) on top of this.
   */
  compare: 5 * MINUTE,
  /**
   * virsh queries (dumpxml, domstate, domblklist, domjobinfo, domblkinfo, checkpoint-list…):
   * libvirtd answers at once, or after at most 30 s when another job holds the domain
   * (its own "cannot acquire state change lock" then says why).
   */
  'virsh-query': MINUTE,
  /**
   * virsh commands that wait on QEMU or the guest (backup-begin, domjobabort,
   * checkpoint-delete, domfsfreeze/thaw): a freeze flushes the guest's caches first.
   */
  'virsh-job': 10 * MINUTE,
  /** virsh blockcommit --wait: copies everything the overlay holds back into its base. */
  'virsh-commit': 60 * MINUTE,
  /**
   * qemu-system-x86_64 -daemonize of an instant restore: it returns once the machine is
   * set up, its disks opened through vmvault's exports; no guest code has run yet.
   */
  'vm-start': 2 * MINUTE,
} satisfies Record<string, number>;

export type ToolBound = keyof typeof DEFAULTS;

/** The slowest a data-sized operation is assumed to read (both images, for compare): a busy network mount. */
export const COMPARE_BYTES_PER_SECOND = 10 * 1024 * 1024;

/**
 * The bound for `kind`, in milliseconds. VMVAULT_TOOL_TIMEOUTS overrides any of them,
 * as `kind=ms,kind=ms` (`metadata=2000,virsh-query=500`): for tests, and for a site
 * whose storage is known to be slower. Read at every call, so a change applies to the
 * next tool run.
 */
export function toolTimeoutMs(kind: ToolBound): number {
  const set = process.env.VMVAULT_TOOL_TIMEOUTS;
  if (!set) return DEFAULTS[kind];
  for (const item of set.split(',')) {
    const m = /^\s*([a-z-]+)\s*=\s*(\d+)\s*$/.exec(item);
    if (!m || !(m[1]! in DEFAULTS) || Number(m[2]) <= 0) {
      throw new VmvaultError('BAD_INPUT', `VMVAULT_TOOL_TIMEOUTS has "${item}": give kind=milliseconds pairs separated by commas, ` +
        `kinds among ${Object.keys(DEFAULTS).join(', ')}`);
    }
    if (m[1] === kind) return Number(m[2]);
  }
  return DEFAULTS[kind];
}

/** Seconds or minutes, as an operator reads a bound. */
export function boundText(ms: number): string {
  return ms >= 2 * MINUTE && ms % MINUTE === 0 ? `${ms / MINUTE} minutes` : `${Math.round(ms / 100) / 10} s`;
}

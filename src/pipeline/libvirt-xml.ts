/**
 * libvirt domain XML: which disk images a domain uses, and the same XML with those
 * disks moved to where a restore put them. Pure functions over a string.
 *
 * The XML goes through a real parser (@xmldom/xmldom, which resolves no external
 * entities) and is serialised back, so comments, elements and attributes we do not
 * touch stay as they were; only quoting and entity spelling may change, which libvirt
 * does not care about. A restored disk is a plain image with no backing file, so the
 * rewritten disk loses any `<backingStore>` that described the old chain, and a
 * `type='block'` disk becomes `type='file'`.
 */
import type { Document, Element } from '@xmldom/xmldom';
import { lazy } from '../lazy-require.js';
import { VmvaultError } from '../errors.js';
import { diskNameFromPath } from './names.js';

const xmldom = lazy<typeof import('@xmldom/xmldom')>('@xmldom/xmldom');

/** Where a disk went: its new path, and its new format when the restore changed it. */
export type DiskTarget = string | { path: string; format?: string };

export interface LibvirtDisk {
  /** `file` or `block` (other types, e.g. network, are not images we back up). */
  type: string;
  /** `disk`, `cdrom`, `floppy`, `lun`. */
  device: string;
  /** The image path (`source file=` or `source dev=`). */
  path: string;
  /** Guest device name (`target dev=`), e.g. `vda`. */
  target?: string;
  /** Guest bus (`target bus=`): virtio, sata, ide, scsi, usb. */
  bus?: string;
  /** Image format from `driver type=`. */
  format?: string;
  /** The files of its `<backingStore>` chain, top down (a running domain's XML lists the chain libvirt found). */
  backing: string[];
}

function parse(xml: string): Document {
  let problem: string | undefined;
  let doc: Document;
  try {
    doc = new (xmldom().DOMParser)({
      onError: (level, msg) => {
        if (level !== 'warning') problem ??= msg;
      },
    }).parseFromString(xml, 'text/xml');
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `the libvirt domain XML cannot be parsed: ${(err as Error).message}`, { cause: err });
  }
  const root = doc.documentElement;
  if (problem !== undefined || !root) throw new VmvaultError('BAD_INPUT', `the libvirt domain XML cannot be parsed: ${problem ?? 'no root element'}`);
  if (root.tagName !== 'domain') throw new VmvaultError('BAD_INPUT', `expected a libvirt domain XML (root <domain>), found <${root.tagName}>`);
  return doc;
}

function children(el: Element, tag: string): Element[] {
  const out: Element[] = [];
  for (let n = el.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === 1 && (n as Element).tagName === tag) out.push(n as Element);
  }
  return out;
}

/** The `<disk>` elements of `<domain><devices>` whose source is a file or block device. */
function diskElements(doc: Document): { el: Element; source: Element; attr: 'file' | 'dev' }[] {
  const out: { el: Element; source: Element; attr: 'file' | 'dev' }[] = [];
  for (const devices of children(doc.documentElement!, 'devices')) {
    for (const el of children(devices, 'disk')) {
      const source = children(el, 'source')[0];
      const type = el.getAttribute('type') ?? 'file';
      const attr = type === 'block' ? 'dev' : type === 'file' ? 'file' : undefined;
      if (source && attr && source.getAttribute(attr)) out.push({ el, source, attr });
    }
  }
  return out;
}

/** The file and block disks a domain XML names, in document order. */
export function libvirtDisks(xml: string): LibvirtDisk[] {
  return diskElements(parse(xml)).map(({ el, source, attr }) => {
    const target = children(el, 'target')[0]?.getAttribute('dev') ?? undefined;
    const bus = children(el, 'target')[0]?.getAttribute('bus') ?? undefined;
    const format = children(el, 'driver')[0]?.getAttribute('type') ?? undefined;
    const backing: string[] = [];
    for (let b = children(el, 'backingStore')[0]; b; b = children(b, 'backingStore')[0]) {
      const src = children(b, 'source')[0];
      const file = src?.getAttribute('file') || src?.getAttribute('dev');
      if (file) backing.push(file);
    }
    return {
      backing,
      type: el.getAttribute('type') ?? 'file', device: el.getAttribute('device') ?? 'disk', path: source.getAttribute(attr)!,
      ...(target ? { target } : {}), ...(bus ? { bus } : {}), ...(format ? { format } : {}),
    };
  });
}

/**
 * The domain XML with each disk whose old path, or whose disk name in the backup
 * (the file name without extension, see diskNameFromPath), is a key of `map` pointed
 * at the new path (and format). Disks not in `map` are left alone; keys that match
 * no disk are ignored. BAD_INPUT when the XML is not a libvirt domain.
 */
export function rewriteLibvirtDiskPaths(xml: string, map: Record<string, DiskTarget> | Map<string, DiskTarget>): string {
  const lookup = map instanceof Map ? map : new Map(Object.entries(map));
  const doc = parse(xml);
  for (const { el, source, attr } of diskElements(doc)) {
    const old = source.getAttribute(attr)!;
    const to = lookup.get(old) ?? lookup.get(diskNameFromPath(old));
    if (to === undefined) continue;
    const target = typeof to === 'string' ? { path: to } : to;
    if (attr === 'dev') {
      el.setAttribute('type', 'file');
      source.removeAttribute('dev');
    }
    source.setAttribute('file', target.path);
    if (target.format) children(el, 'driver')[0]?.setAttribute('type', target.format);
    for (const b of children(el, 'backingStore')) el.removeChild(b);
  }
  return new (xmldom().XMLSerializer)().serializeToString(doc);
}

/** A VM name libvirt and vmvault both take as it is: letters, digits, `.`, `_`, `+`, `-`. */
export const VM_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$/;

/** What makes a domain another VM: its name, its UUID, and its NICs' MAC addresses. */
export interface DomainIdentity { name: string; uuid: string; macs: string[] }

/**
 * The domain XML as a clone that can run beside the original: `<name>` and `<uuid>`
 * replaced by `id.name` and `id.uuid` (a `<uuid>` is added when there was none), and each
 * `<interface><mac address=…>` given the next of `id.macs` (a clone on the same bridge
 * with the original's MAC would fight it for its address). BAD_INPUT when the XML is
 * not a libvirt domain or `id.name` is not a plain VM name.
 */
export function renameLibvirtDomain(xml: string, id: DomainIdentity): string {
  if (!VM_NAME_RE.test(id.name)) throw new VmvaultError('BAD_INPUT', `"${id.name}" is not a VM name: use letters, digits, ".", "_", "+" or "-" (at most 64, starting with a letter or digit)`);
  const doc = parse(xml);
  const root = doc.documentElement!;
  const text = (tag: string, value: string) => {
    let el = children(root, tag)[0];
    if (!el) {
      el = doc.createElement(tag);
      root.insertBefore(el, root.firstChild);
    }
    while (el.firstChild) el.removeChild(el.firstChild);
    el.appendChild(doc.createTextNode(value));
  };
  text('uuid', id.uuid);
  text('name', id.name); // Inserted before <uuid> when both were missing: libvirt's own order.
  let next = 0;
  for (const devices of children(root, 'devices')) {
    for (const nic of children(devices, 'interface')) {
      for (const mac of children(nic, 'mac')) {
        const fresh = id.macs[next++];
        if (fresh) mac.setAttribute('address', fresh);
      }
    }
  }
  return new (xmldom().XMLSerializer)().serializeToString(doc);
}

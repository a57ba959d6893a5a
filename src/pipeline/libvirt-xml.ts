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
import { DOMParser, XMLSerializer, type Document, type Element } from '@xmldom/xmldom';
import { VmvaultError } from '../errors.js';
import { diskNameFromPath } from './names.js';

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
  /** Image format from `driver type=`. */
  format?: string;
}

function parse(xml: string): Document {
  let problem: string | undefined;
  let doc: Document;
  try {
    doc = new DOMParser({
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
    const format = children(el, 'driver')[0]?.getAttribute('type') ?? undefined;
    return {
      type: el.getAttribute('type') ?? 'file', device: el.getAttribute('device') ?? 'disk', path: source.getAttribute(attr)!,
      ...(target ? { target } : {}), ...(format ? { format } : {}),
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
  return new XMLSerializer().serializeToString(doc);
}

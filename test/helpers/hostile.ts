/**
 * Disks a hostile guest could write: a raw disk whose first bytes are a qcow2 header
 * or vmdk descriptor naming a file of the host. qemu, left to probe such a disk,
 * would read the host's file instead of the guest's data.
 */
import { execa } from 'execa';
import { open, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, type PatternWrite } from './images.js';

const MiB = 1024 * 1024;

/** A file of the host no backup may contain: a marker repeated over 1 MiB. */
export async function hostSecret(dir: string): Promise<{ path: string; marker: string }> {
  const marker = `HOST-SECRET-${Math.random().toString(36).slice(2)}-`;
  const path = join(dir, 'host-secret');
  await writeFile(path, Buffer.alloc(MiB, marker));
  return { path, marker };
}

export type Trap = 'qcow2 backing file' | 'qcow2 data file' | 'vmdk extent' | 'protocol filename';
export const TRAPS: readonly Trap[] = ['qcow2 backing file', 'qcow2 data file', 'vmdk extent', 'protocol filename'];

/** The guest's own data, away from the header it wrote at offset 0. */
export const GUEST_WRITES: PatternWrite[] = [{ offset: 8 * MiB, length: MiB, pattern: 0x6b }, { offset: 30 * MiB, length: 512 * 1024, pattern: 0x2c }];

/** The header bytes a guest would write to make its raw disk name `secret`. */
async function trapHeader(dir: string, trap: Trap, secret: string): Promise<Buffer> {
  const hdr = join(dir, `hdr-${trap.replaceAll(' ', '-')}-${Math.random().toString(36).slice(2)}`);
  try {
    switch (trap) {
      case 'qcow2 backing file':
      case 'protocol filename': {
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', hdr, `${32 * MiB}`]);
        const name = trap === 'qcow2 backing file' ? secret : `json:{"driver":"raw","file":{"driver":"file","filename":"${secret}"}}`;
        // An unsafe rebase writes the name without opening it.
        await execa('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-F', 'raw', '-b', name, hdr]);
        return await readFile(hdr);
      }
      case 'qcow2 data file': {
        // qemu-img create makes (truncates) the data file it names: name a scratch file, then patch the name in.
        const scratch = join(dir, 'x'.repeat(secret.length));
        await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${scratch},data_file_raw=on`, hdr, `${32 * MiB}`]);
        await rm(scratch, { force: true });
        const bytes = await readFile(hdr);
        const at = bytes.indexOf(scratch);
        if (at < 0) throw new Error('data file name not found in the crafted header');
        bytes.write(secret, at, 'latin1');
        return bytes.subarray(0, 64 * 1024 * 4); // header, extensions, tables: the first clusters
      }
      case 'vmdk extent':
        return Buffer.from(`# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 2048 FLAT "${secret}" 0\n`, 'latin1');
    }
  } finally {
    await rm(hdr, { force: true });
  }
}

/** A 32 MiB raw disk holding GUEST_WRITES, whose guest wrote `trap` naming `secret` at offset 0. */
export async function trappedRawDisk(dir: string, name: string, trap: Trap, secret: string): Promise<string> {
  const header = await trapHeader(dir, trap, secret);
  const file = await makeImage(dir, name, 'raw', 32 * MiB, GUEST_WRITES);
  const fh = await open(file, 'r+');
  try {
    await fh.write(header, 0, header.length, 0);
  } finally {
    await fh.close();
  }
  return file;
}

/** What qemu would make of the disk if it probed it: the trap works (the test is meaningful). */
export async function qemuWouldFollow(file: string): Promise<string> {
  const r = await execa('qemu-img', ['info', '--output=json', file], { reject: false });
  return r.stdout + r.stderr;
}

/** A text vmdk descriptor (qemu's monolithicFlat header lines) followed by `body`: its extent lines, and anything else. */
export function vmdkDescriptor(body: string): Buffer {
  return Buffer.from(`# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n${body}\n`, 'latin1');
}

/**
 * A 64 KiB sparse vmdk written byte by byte: a KDMV header of capacity 0 whose
 * descriptor (at sector 1, 20 sectors) is `descriptor`. qemu's vmdk_open_vmdk4 opens
 * such a descriptor as a descriptor file and follows its extent lines.
 */
export function sparseVmdkOfCapacity0(descriptor: Buffer): Buffer {
  const img = Buffer.alloc(64 * 1024);
  img.write('KDMV', 0, 'latin1');
  img.writeUInt32LE(1, 4); // version
  img.writeUInt32LE(3, 8); // flags: newline detection, redundant grain table
  img.writeBigUInt64LE(0n, 12); // capacity, in sectors
  img.writeBigUInt64LE(128n, 20); // granularity
  img.writeBigUInt64LE(1n, 28); // descriptor offset, in sectors
  img.writeBigUInt64LE(20n, 36); // descriptor size, in sectors
  img.writeUInt32LE(512, 44); // grain table entries per grain table
  img.write('\n \r\n', 73, 'latin1'); // the newline check bytes
  if (descriptor.length > 20 * 512) throw new Error('descriptor longer than 20 sectors');
  descriptor.copy(img, 512);
  return img;
}

/** The files a `qemu-img info -f vmdk` of `file` opened or names (extents, parent), `file` itself aside. */
export async function qemuVmdkNames(file: string): Promise<string[]> {
  const r = await execa('qemu-img', ['info', '--output=json', '-f', 'vmdk', file], { reject: false, timeout: 30_000 });
  const names = [...r.stderr.matchAll(/Could not open '([^']+)'/g)].map((m) => m[1]!);
  if (r.exitCode === 0) {
    const j = JSON.parse(r.stdout) as { 'backing-filename'?: string; 'format-specific'?: { data?: { extents?: { filename: string }[] } } };
    names.push(...(j['format-specific']?.data?.extents ?? []).map((e) => e.filename));
    if (j['backing-filename'] !== undefined) names.push(j['backing-filename']);
  }
  return [...new Set(names)].filter((n) => n !== file);
}

/**
 * A tiny bootable disk for restore drills: a 512-byte boot sector, assembled by hand,
 * that writes a marker to COM1 (port 0x3f8) and halts. No guest OS, no toolchain.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export const BOOT_MARKER = 'VMVAULT-BOOT-OK';

/**
 * 16-bit real mode, loaded at 0x7c00:
 *   cli; xor ax,ax; mov ds,ax; cld; mov dx,0x3f8; mov si,msg
 *   next: lodsb; test al,al; jz stop; out dx,al; jmp next
 *   stop: hlt; jmp stop
 *   msg: db MARKER, 13, 10, 0
 */
export function bootSector(marker = BOOT_MARKER): Buffer {
  const code = Buffer.from('fa31c08ed8fcbaf803be177cac84c07403eeebf8f4ebfd', 'hex');
  if (code.length !== 23) throw new Error('boot code must be 23 bytes: msg is at 0x7c17');
  const sector = Buffer.alloc(512);
  code.copy(sector, 0);
  Buffer.from(`${marker}\r\n\0`, 'latin1').copy(sector, 23);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

/** `dir/name`: a raw image of `size` bytes with the boot sector at offset 0; `bootable: false` zeroes its 0x55AA signature. */
export async function makeBootImage(dir: string, name: string, opts: { bootable?: boolean; size?: number } = {}): Promise<string> {
  const image = Buffer.alloc(opts.size ?? 4 * 1024 * 1024);
  bootSector().copy(image, 0);
  if (opts.bootable === false) image.writeUInt16LE(0, 510);
  // Some data beyond the boot sector, so the backup holds more than one non-zero chunk's worth of layout.
  image.fill(0x5a, 2 * 1024 * 1024, 2 * 1024 * 1024 + 4096);
  const file = join(dir, name);
  await writeFile(file, image);
  return file;
}

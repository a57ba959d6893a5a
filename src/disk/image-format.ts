/** The disk image formats vmvault reads and writes. */
import { VmvaultError } from '../errors.js';

export type ImageFormat = 'qcow2' | 'raw' | 'vmdk' | 'vdi';
export const IMAGE_FORMATS: readonly ImageFormat[] = Object.freeze(['qcow2', 'raw', 'vmdk', 'vdi'] as const);

export function isImageFormat(format: string): format is ImageFormat {
  return (IMAGE_FORMATS as readonly string[]).includes(format);
}

/** VmvaultError('UNSUPPORTED') unless `format` is one of IMAGE_FORMATS. */
export function checkFormat(format: string, image: string): asserts format is ImageFormat {
  if (!isImageFormat(format)) {
    throw new VmvaultError('UNSUPPORTED', `disk image ${image} has format "${format}", which vmvault does not support (supported: ${IMAGE_FORMATS.join(', ')})`);
  }
}

/**
 * A one-line progress bar on stderr: bytes, rate, ETA. Only on a terminal, and
 * never with --json (the caller decides).
 */
import type { Progress } from '../pipeline/progress.js';
import { formatBytes, formatDuration } from './format.js';

export function progressBar(enabled: boolean): { update(p: Progress): void; done(): void } {
  if (!enabled || !process.stderr.isTTY) return { update() {}, done() {} };
  let shown = false;
  return {
    update(p) {
      const frac = p.bytesTotal > 0 ? Math.min(1, p.bytesDone / p.bytesTotal) : 1;
      const width = 30;
      const filled = Math.round(frac * width);
      const eta = p.bytesPerSecond > 0 ? (p.bytesTotal - p.bytesDone) / p.bytesPerSecond : 0;
      const line = `${p.phase}${p.disk ? ` ${p.disk}` : ''} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ` +
        `${(frac * 100).toFixed(0).padStart(3)}% ${formatBytes(p.bytesDone)}/${formatBytes(p.bytesTotal)} ` +
        `${formatBytes(p.bytesPerSecond)}/s ETA ${formatDuration(eta)}`;
      process.stderr.write(`\r\x1b[2K${line}`);
      shown = true;
    },
    done() {
      if (shown) process.stderr.write('\n');
    },
  };
}

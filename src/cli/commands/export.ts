/** `vmvault export`: serve one disk of a backup over NBD until SIGINT or SIGTERM. */
import type { Command } from 'commander';
import { exportBackupDisk, parseListen } from '../../pipeline/nbd-export.js';
import { openRepository, warn, type GlobalOptions } from '../context.js';
import { formatBytes } from '../format.js';
import { print } from '../output.js';

export function registerExportCommand(program: Command, globals: () => GlobalOptions): void {
  program
    .command('export <id>')
    .description('serve a disk of a backup read-only over NBD (qemu-img, qemu, nbdinfo can read it) until SIGINT or SIGTERM')
    .requiredOption('--disk <name>', 'the disk to serve')
    .requiredOption('--listen <address>', 'unix:/PATH or HOST:PORT (e.g. 127.0.0.1:10809; port 0 picks a free one)')
    .option('--json', 'print where to connect as JSON')
    .action(async (id: string, o: { disk: string; listen: string; json?: boolean }) => {
      const address = parseListen(o.listen);
      if ('host' in address && !/^(127\.|::1$|localhost$)/.test(address.host)) {
        warn(`serving on ${address.host}: NBD has neither authentication nor encryption, so anyone who reaches that address can read the disk`);
      }
      const repo = await openRepository(globals());
      const backupId = await repo.resolveBackupId(id);
      const exp = await exportBackupDisk({ repo, backupId, disk: o.disk, listen: o.listen });
      print(o.json, { backup: backupId, disk: o.disk, uri: exp.uri, size: exp.size }, () =>
        `serving disk ${o.disk} of backup ${backupId.slice(0, 12)} (${formatBytes(exp.size)}, read-only) at ${exp.uri}\nstop with Ctrl-C`);
      await new Promise<void>((resolve) => {
        const stop = (): void => {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          resolve();
        };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
      });
      await exp.close();
    });
}

/** `vmvault init` and `vmvault key …`. */
import { readFile } from 'node:fs/promises';
import { Option, type Command } from 'commander';
import { VmvaultError } from '../../errors.js';
import { KDF_PRESETS, type ChunkIdHash, type KdfPreset } from '../../crypto/keys.js';
import { Repository } from '../../repo/repository.js';
import { keyCacheFor, openRepository, passphrase, passphraseAndSource, storageFor, warn, type GlobalOptions } from '../context.js';
import { parseSize, table } from '../format.js';
import { print } from '../output.js';

const kdfOption = () =>
  new Option('--kdf <preset>', 'Argon2id cost of the passphrase key').choices(Object.keys(KDF_PRESETS)).default('moderate').hideHelp();

export function registerKeyCommands(program: Command, globals: () => GlobalOptions): void {
  program
    .command('init')
    .description('create a repository and its first key')
    .option('--chunk-size <size>', 'chunk size, a power of two (e.g. 4M)', '4M')
    .addOption(new Option('--compression <codec>', 'chunk compression').choices(['zstd', 'none']).default('zstd'))
    .addOption(kdfOption())
    .addOption(new Option('--chunk-id <hash>', 'how chunk ids are computed: blake3 (format 3, the default where this host has its native code), hmac-sha256 (format 2, which vmvault before format 3 also reads), or blake2b (format 1, read by every vmvault)').choices(['blake3', 'hmac-sha256', 'blake2b']))
    .option('--if-missing', 'do nothing (exit 0) when the repository already exists: for a container or unit that runs at every start')
    .option('--json', 'print JSON')
    .action(async (o: { chunkSize: string; compression: 'zstd' | 'none'; kdf: KdfPreset; chunkId?: ChunkIdHash; json?: boolean; ifMissing?: boolean }) => {
      const g = globals();
      const storage = storageFor(g);
      if (o.ifMissing && await storage.stat('config')) {
        print(o.json, { existed: true, location: storage.location }, () => `a repository already exists at ${storage.location}: nothing to do`);
        return;
      }
      const pass = await passphraseAndSource(g.passwordFile, 'VMVAULT_PASSWORD', 'new repository passphrase: ');
      const keyCache = keyCacheFor(pass.source);
      let chunkSize: number;
      try {
        chunkSize = parseSize(o.chunkSize);
      } catch (err) {
        throw new VmvaultError('BAD_INPUT', (err as Error).message);
      }
      const repo = await Repository.init(storage, pass.text, {
        chunkSize, compression: o.compression, kdf: o.kdf, ...(o.chunkId ? { chunkIdHash: o.chunkId } : {}), onWarning: warn, ...(keyCache ? { keyCache } : {}),
      });
      print(o.json, { id: repo.id, location: storage.location, format: repo.config.version, chunkSize: repo.chunkSize, compression: repo.config.compression, chunkId: repo.keys.idHash }, () =>
        `created repository ${repo.id} at ${storage.location}\n` +
        'Keep the passphrase safe: without it (or a paper key from "vmvault key export --paper") no backup can be restored.');
    });

  const key = program.command('key').description('manage the passphrases that open the repository');
  key
    .command('add')
    .description('add a passphrase (from VMVAULT_NEW_PASSWORD or --new-password-file)')
    .option('--new-password-file <file>', 'file holding the new passphrase')
    .option('--label <text>', 'a note stored with the key')
    .addOption(kdfOption())
    .action(async (o: { newPasswordFile?: string; label?: string; kdf: KdfPreset }) => {
      const repo = await openRepository(globals());
      const pass = await passphrase(o.newPasswordFile, 'VMVAULT_NEW_PASSWORD', 'new passphrase: ');
      const id = await repo.addKey(pass, o.kdf, o.label);
      console.log(`added key ${id}`);
    });
  key
    .command('list')
    .description('list the keys')
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      const keys = await (await openRepository(globals())).listKeys();
      print(o.json, keys, () => table([['ID', 'CREATED', 'LABEL', ''], ...keys.map((k) => [k.id, k.created || '-', k.label ?? '', k.current ? '(current)' : k.damaged ? `(damaged: ${k.damaged})` : ''])]));
    });
  key
    .command('remove <id>')
    .description('remove a key (never the last one, nor the one in use)')
    .action(async (id: string) => {
      const removed = await (await openRepository(globals())).removeKey(id);
      console.log(`removed key ${removed}`);
    });
  key
    .command('export')
    .description('print the master key for safekeeping')
    .requiredOption('--paper', 'printable, typo-checked form')
    .action(async () => {
      process.stdout.write((await openRepository(globals())).paperKey());
    });
  key
    .command('import')
    .description('add a passphrase (VMVAULT_PASSWORD or --password-file) from a paper key, read from FILE or stdin')
    .argument('[file]', 'the paper key; "-" or nothing for stdin')
    .addOption(kdfOption())
    .action(async (file: string | undefined, o: { kdf: KdfPreset }) => {
      const g = globals();
      const paper = file && file !== '-' ? await readFile(file, 'utf8') : await readStdin();
      const pass = await passphrase(g.passwordFile, 'VMVAULT_PASSWORD', 'new passphrase: ');
      const repo = await Repository.importPaper(storageFor(g), paper, pass, o.kdf);
      console.log(`imported the paper key as key ${repo.keyId}`);
    });
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write('type or paste the paper key, then Ctrl-D:\n');
  const parts: Buffer[] = [];
  for await (const c of process.stdin) parts.push(c as Buffer);
  return Buffer.concat(parts).toString('utf8');
}

/**
 * `vmvault token create`: a new API token, printed once. An admin token replaces the
 * state directory's (only its SHA-256 is stored, STATE_DIR/admin-token.sha256, mode
 * 0600; the service reads it at start). A viewer or operator token is printed with
 * the line that adds its hash to api.tokens in vmvault.yaml.
 */
import { createHash, randomBytes } from 'node:crypto';
import { Option, type Command } from 'commander';
import { configPathFrom, loadConfig } from '../../config/load.js';
import { DEFAULT_STATE_DIR } from '../../config/schema.js';
import { NAME_RE } from '../../policy/schema.js';
import { VmvaultError } from '../../errors.js';
import { adminTokenPath, createAdminToken } from '../../service/admin-token.js';

interface TokenFlags { role: 'viewer' | 'operator' | 'admin'; name?: string; stateDir?: string; config?: string }

export function registerTokenCommands(program: Command): void {
  const token = program.command('token').description('API tokens');
  token
    .command('create')
    .description('make a new API token and print it once; an admin token replaces the state directory\'s (restart the service to use it)')
    .addOption(new Option('--role <role>', 'the token\'s role').choices(['viewer', 'operator', 'admin']).default('admin'))
    .option('--name <name>', 'name of a viewer or operator token in api.tokens (default: ROLE-token)')
    .option('--state-dir <dir>', `state directory of the admin token (env VMVAULT_STATE_DIR; default: the configuration's stateDir, ${DEFAULT_STATE_DIR})`)
    .option('-c, --config <file>', 'configuration file whose stateDir to use (env VMVAULT_CONFIG)')
    .action(async (flags: TokenFlags) => {
      if (flags.role === 'admin') {
        const file = configPathFrom(flags.config);
        const stateDir = flags.stateDir ?? (process.env.VMVAULT_STATE_DIR || undefined) ?? (file ? (await loadConfig(file)).stateDir : DEFAULT_STATE_DIR);
        const t = await createAdminToken(stateDir);
        process.stdout.write(`${t}\n`);
        process.stderr.write(`vmvault: new admin token above, shown this once; its SHA-256 replaced ${adminTokenPath(stateDir)}: restart vmvault up/serve to use it (the previous one stops working then)\n`);
        return;
      }
      const name = flags.name ?? `${flags.role}-token`;
      if (!NAME_RE.test(name)) throw new VmvaultError('BAD_INPUT', `--name "${name}": use letters, digits, ".", "_" or "-"`);
      const t = `vv_${randomBytes(24).toString('base64url')}`;
      process.stdout.write(`${t}\n`);
      process.stderr.write(`vmvault: new ${flags.role} token above, shown this once; add its hash to api.tokens in vmvault.yaml and restart the service:\n`);
      process.stderr.write(`    - { name: ${name}, role: ${flags.role}, sha256: ${createHash('sha256').update(t).digest('hex')} }\n`);
    });
}

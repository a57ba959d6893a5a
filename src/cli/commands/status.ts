/**
 * `vmvault status`: the service's state as `GET /v1/status` reports it (src/ops/status.ts),
 * read straight from Redis and the repository named by the configuration, so it works
 * with the API down. Readable tables, or the same JSON as the API with --json.
 */
import type { Command } from 'commander';
import { configPathFrom, loadConfig } from '../../config/load.js';
import { VmvaultError } from '../../errors.js';
import type { Status, VmStatus } from '../../ops/status.js';
import { formatBytes, table } from '../format.js';

interface StatusFlags { config?: string; json?: boolean }

export function registerStatusCommand(program: Command): void {
  program
    .command('status')
    .description('next run of each policy, last result per VM, workers online and queue depths per host (reads Redis and the repository of the configuration)')
    .option('-c, --config <file>', 'configuration file (env VMVAULT_CONFIG)')
    .option('--json', 'print the report as JSON (the shape of GET /v1/status)')
    .action(async (flags: StatusFlags) => {
      const file = configPathFrom(flags.config);
      if (!file) throw new VmvaultError('BAD_INPUT', 'no configuration: pass --config FILE or set VMVAULT_CONFIG (status reads its Redis and repository)');
      const config = await loadConfig(file);
      const { repositoryFrom } = await import('../../service/service.js');
      if (!config.redis.url) throw new VmvaultError('BAD_INPUT', 'the configuration names no Redis (redis: { url }): status reads the queues and worker heartbeats there');
      const { openStatusSources } = await import('../../ops/sources.js');
      const { collectStatus } = await import('../../ops/status.js');
      const opened = await openStatusSources(config, { redisUrl: config.redis.url, repository: await repositoryFrom(config) });
      try {
        const status = await collectStatus(opened.sources);
        process.stdout.write(flags.json ? `${JSON.stringify(status, null, 2)}\n` : formatStatus(status));
      } finally {
        await opened.close();
      }
    });
}

const when = (iso: string | null, now: number): string => {
  if (!iso) return '-';
  const s = Math.round((Date.parse(iso) - now) / 1000);
  const a = Math.abs(s);
  const span = a < 120 ? `${a}s` : a < 7200 ? `${Math.round(a / 60)}m` : a < 172_800 ? `${Math.round(a / 3600)}h` : `${Math.round(a / 86400)}d`;
  return s >= 0 ? `in ${span}` : `${span} ago`;
};

function vmState(v: VmStatus): string {
  const parts = [v.overdue ? 'OVERDUE' : 'ok'];
  if (v.lastBackup?.verification?.status === 'damaged') parts.push('DAMAGED');
  if (v.lastFailure && (!v.lastSuccessAt || v.lastFailure.at > v.lastSuccessAt)) parts.push(`failed ${v.lastFailure.code}`);
  return parts.join(', ');
}

export function formatStatus(s: Status): string {
  const now = Date.parse(s.generatedAt);
  const out: string[] = [];
  out.push('Policies');
  out.push(s.policies.length ? table([['  NAME', 'SCHEDULE', 'NEXT RUN'], ...s.policies.map((p) => [`  ${p.name}`, p.schedule, when(p.nextRun, now)])]) : '  (none enabled)');
  out.push('', 'VMs');
  out.push(s.vms.length ? table([['  NAME', 'HOST', 'POLICY', 'LAST BACKUP', 'SIZE', 'UPLOADED', 'MODE', 'VERIFIED', 'NEXT RUN', 'STATE'], ...s.vms.map((v) => [
    `  ${v.name}`, v.host, v.policy ?? '-', when(v.lastSuccessAt, now),
    v.lastBackup ? formatBytes(v.lastBackup.sizeBytes) : '-', v.lastBackup ? formatBytes(v.lastBackup.uploadedBytes) : '-', v.lastBackup?.mode ?? '-',
    v.lastBackup?.verification ? `${v.lastBackup.verification.status} ${when(v.lastBackup.verification.lastVerified, now)}` : '-',
    when(v.nextRun, now), vmState(v),
  ])]) : '  (none in the inventory)');
  const failures = s.vms.filter((v) => v.lastFailure);
  for (const v of failures) out.push(`  ${v.name}: last failure ${when(v.lastFailure!.at, now)} (${v.lastFailure!.code}): ${v.lastFailure!.message}`);
  out.push('', 'Hosts');
  out.push(table([['  HOST', 'WORKERS', 'WAITING', 'ACTIVE', 'DELAYED', 'FAILED'], ...s.hosts.map((h) => [
    `  ${h.host}`, h.online ? h.workers.map((w) => `pid ${w.pid} (${w.version})`).join(', ') : 'OFFLINE',
    String(h.queue.waiting), String(h.queue.active), String(h.queue.delayed), String(h.queue.failed),
  ])]));
  if (s.unreadableBackups.length) {
    out.push('', `Backups that cannot be read (${s.unreadableBackups.length}): in no VM's figures above, and gc deletes no chunk while one is there`);
    for (const u of s.unreadableBackups) out.push(`  ${u.id.slice(0, 12)} ${u.kind.toUpperCase()}: ${u.problem}`, `    what to do: ${u.advice}`);
  }
  return `${out.join('\n')}\n`;
}

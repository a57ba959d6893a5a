/**
 * DESIGN.md's layering, checked by `npm test` (npm run lint:layers):
 *   cli/api/workers/scheduler/service → queue → vm → pipeline → repo/disk → storage/crypto
 * config, policy and errors are leaves everyone may use. Nothing below imports from above.
 */
const layer = (name) => `^src/${name}/`;
const ABOVE_QUEUE = ['^src/cli/', '^src/api/', '^workers/', '^src/scheduler/', '^src/service/', '^src/ops/'];
const ABOVE_VM = [...ABOVE_QUEUE, layer('queue')];
const ABOVE_PIPELINE = [...ABOVE_VM, layer('vm')];
const ABOVE_REPO_DISK = [...ABOVE_PIPELINE, layer('pipeline')];
const ABOVE_STORAGE = [...ABOVE_REPO_DISK, layer('repo'), layer('disk')];

const ALLOWED_TO_LEAVES = '^src/(disk/image-format|storage/open|pipeline/names)\\.ts$';
const forbid = (name, from, to, comment, pathNot) => ({ name, comment, severity: 'error', from: { path: from }, to: { path: to, ...(pathNot ? { pathNot } : {}) } });

module.exports = {
  forbidden: [
    forbid('queue-imports-above', layer('queue'), ABOVE_QUEUE, 'queue is used by cli/api/workers/scheduler/service, never the reverse'),
    forbid('vm-imports-above', layer('vm'), ABOVE_VM, 'point-in-time drivers know nothing of queues or front ends'),
    forbid('pipeline-imports-vm', layer('pipeline'), ABOVE_PIPELINE, 'the pipeline only reads, chunks and commits: it never imports src/vm/'),
    forbid('repo-disk-import-above', '^src/(repo|disk)/', ABOVE_REPO_DISK, 'repo and disk sit below the pipeline'),
    forbid('storage-crypto-import-above', '^src/(storage|crypto)/', ABOVE_STORAGE, 'storage and crypto are the bottom layer'),
    // Leaves import no layer, except three pure, I/O-free helpers that validation needs:
    // the image formats, the repository URL parser and disk names.
    forbid('leaves-import-layers', '^src/(config|policy|errors\\.ts)', [...ABOVE_STORAGE, layer('storage'), layer('crypto')],
      'config, policy and errors are leaves', ALLOWED_TO_LEAVES),
    { name: 'no-circular', severity: 'error', comment: 'import cycles hide layering mistakes', from: { path: '^(src|workers)/' }, to: { circular: true } },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    tsConfig: { fileName: 'tsconfig.json' },
    tsPreCompilationDeps: true,
    exclude: { path: '^(dist|test|bench)/' },
  },
};

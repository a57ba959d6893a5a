#!/usr/bin/env bash
# Scheduled backups through a running host worker against restic per backup (bench/worker.ts),
# on bench/run.sh's 4 GiB image (run bench/run.sh once first: it builds the image).
#   npm run build && bash bench/worker.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH_DIR=${BENCH_DIR:-/var/tmp/vmvault-bench}
[ -f "$BENCH_DIR/image-v1.qcow2" ] || { echo "bench: no $BENCH_DIR/image-v1.qcow2: run bench/run.sh once first" >&2; exit 1; }
[ -f "$ROOT/dist/bench/worker.js" ] || { echo "bench: vmvault is not built: run npm run build" >&2; exit 1; }
for t in restic qemu-io qemu-img redis-server; do command -v "$t" >/dev/null || { echo "bench: $t is missing" >&2; exit 1; }; done
exec node "$ROOT/dist/bench/worker.js" "$BENCH_DIR/image-v1.qcow2" "$BENCH_DIR/worker-run" "${BENCH_REPS:-3}"

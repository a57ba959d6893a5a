#!/usr/bin/env bash
# Scale benchmark (see bench/scale.ts): one small VM's backup into a repository of
# 1,000,000 chunks, with this tree's build and, with BEFORE=<commit>, an older commit's
# on the same data. Releases before repository format 2 cannot open the format-2
# repository setup makes now, so BEFORE is off by default (f4e3728, the last commit
# that listed chunks/, needs a format-1 repository: made by that commit's setup).
#   bash bench/scale.sh            # SCALE_DIR=/var/tmp/vmvault-scale CHUNKS=1000000 RUNS=3
# Writes bench/results/scale.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${SCALE_DIR:-/var/tmp/vmvault-scale}
CHUNKS=${CHUNKS:-1000000}
RUNS=${RUNS:-3}
BEFORE=${BEFORE:-none}
OUT=bench/results/scale.json

npm run --silent build
if [ ! -f "$DIR/repo/config" ] || [ "$(cat "$DIR/chunks" 2>/dev/null)" != "$CHUNKS" ]; then
  node dist/bench/scale.js setup "$DIR" "$CHUNKS" | tee "$DIR.setup.json"
  echo "$CHUNKS" > "$DIR/chunks"
fi

# The older build: its own tree and compiled code, with this measuring script beside it.
if [ "$BEFORE" != none ]; then
  OLD=$(mktemp -d /tmp/vmvault-before-XXXXXX)
  git worktree add -q --detach "$OLD" "$BEFORE"
  trap 'git worktree remove --force "$OLD"' EXIT
  ln -s "$PWD/node_modules" "$OLD/node_modules"
  (cd "$OLD" && npx tsc -p tsconfig.json >/dev/null) || true
  mkdir -p "$OLD/dist/bench" && cp dist/bench/scale.js "$OLD/dist/bench/"
fi

cache=$(mktemp -d /tmp/vmvault-scale-cache-XXXXXX)
{
  echo '{'
  echo "  \"chunks\": $CHUNKS, \"date\": \"$(date -u +%FT%TZ)\", \"before\": \"$BEFORE\", \"after\": \"$(git rev-parse --short HEAD)\","
  echo '  "runs": ['
  sep=''
  for i in $(seq "$RUNS"); do
    b=null
    [ "$BEFORE" = none ] || b=$(node "$OLD/dist/bench/scale.js" measure "$DIR")
    a=$(node dist/bench/scale.js measure "$DIR")
    w=$(SCALE_CACHE_DIR="$cache" node dist/bench/scale.js measure "$DIR")   # first run fills the cache
    echo "$sep    {\"before\": $b, \"after\": $a, \"afterWarmCache\": $w}"
    sep=','
  done
  echo '  ]'
  echo '}'
} > "$OUT"
rm -rf "$cache"
node -e '
const r = require(process.argv[1]);
const f = (k, m) => r.runs.map((x) => x[k] && m(x[k])).join(" / ");
for (const k of ["before", "after", "afterWarmCache"]) {
  console.log(k.padEnd(15), "first upload s:", f(k, (x) => x.firstUploadSeconds), " peak RSS MiB:", f(k, (x) => x.peakRssMiB), " requests before first upload:", f(k, (x) => x.requestsBeforeFirstUploadTotal));
}' "$PWD/$OUT"

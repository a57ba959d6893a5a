#!/usr/bin/env bash
# vmvault copy vs restic copy: an off-site copy between two directory repositories of the
# perf image (2 GiB virtual, 400 MiB random, 300 MiB text; built by perf-image.sh), each
# tool copying its own repository. The first copy moves everything; after 2% of the disk
# changed and each tool backed up again, the second copy moves what changed (vmvault
# reads only the chunks its earlier copy does not map; restic copies the new blobs of
# the new snapshot). BENCH_REPS rounds (median); the copy's newest backup is restored
# from the destination and compared with the disk. Run by hand after `npm run build`:
# `bash bench/copy.sh` (see bench/README.md).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH_DIR=${BENCH_DIR:-/var/tmp/vmvault-bench}
IMAGE=$BENCH_DIR/perf-v1.qcow2
W=$BENCH_DIR/copy-run
RESULTS=$HERE/results/copy.json
REPS=${BENCH_REPS:-3}
MiB=$((1024 * 1024))

for t in restic qemu-img qemu-io node; do command -v "$t" >/dev/null || { echo "bench: $t is missing" >&2; exit 1; }; done
[ -x /usr/bin/time ] || { echo "bench: GNU time is missing: apt-get install -y time" >&2; exit 1; }
[ -f "$ROOT/dist/src/cli/main.js" ] || { echo "bench: vmvault is not built: run npm run build" >&2; exit 1; }
[ -f "$IMAGE" ] || { echo "bench: $IMAGE is missing: run bench/perf-image.sh once (it builds it)" >&2; exit 1; }
unset GOMAXPROCS RESTIC_REPOSITORY RESTIC_REPOSITORY_FILE RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND RESTIC_CACHE_DIR RESTIC_COMPRESSION VMVAULT_REPOSITORY
export VMVAULT_PASSWORD=bench-passphrase RESTIC_PASSWORD=bench-passphrase VMVAULT_FROM_PASSWORD=bench-passphrase RESTIC_FROM_PASSWORD=bench-passphrase

if [ "${BENCH_KEEP:-}" != 1 ]; then trap 'rm -rf "$W"' EXIT; fi
rm -rf "$W" && mkdir -p "$W/app" "$W/out"
cp -a "$ROOT/bin" "$ROOT/dist" "$ROOT/package.json" "$W/app/" && ln -s "$ROOT/node_modules" "$W/app/node_modules"
VMVAULT=$W/app/bin/vmvault.js
load=$(cut -d' ' -f1 /proc/loadavg)
# change: the 2% change of bench/perf-lib.sh, on both copies of the disk.
source "$HERE/perf-lib.sh"
change() { change_disk "$W/disk.qcow2" "$W/disk.raw"; }
# Both source repositories are read once before each copy (in the page cache, as a nightly
# copy right after the backups finds them), and earlier writes are flushed.
timed() {
  local name=$1; shift
  sync
  find "$W/v-src" "$W/r-src" -type f -print0 | xargs -0 -r cat >/dev/null
  /usr/bin/time -f "$name %e %M %U %S" -a -o "$W/times.tsv" "$@" >"$W/out/$name.out" 2>"$W/out/$name.err" || { cat "$W/out/$name.err" >&2; exit 1; }
  tail -1 "$W/times.tsv"
}
backups() {
  env VMVAULT_REPOSITORY="$W/v-src" "$VMVAULT" backup --vm perf --disk "root=$W/disk.qcow2" --format qcow2 --json >"$W/out/backup.json"
  restic -r "$W/r-src" --cache-dir "$W/r-cache" backup --json "$W/disk.raw" >/dev/null
}
for rep in $(seq 1 "$REPS"); do
  rm -rf "$W/v-src" "$W/v-dst" "$W/r-src" "$W/r-dst" "$W/r-cache" "$W/v-out"
  cat "$IMAGE" >"$W/disk.qcow2"
  qemu-img convert -f qcow2 -O raw "$IMAGE" "$W/disk.raw"
  env VMVAULT_REPOSITORY="$W/v-src" "$VMVAULT" init >/dev/null
  env VMVAULT_REPOSITORY="$W/v-dst" "$VMVAULT" init >/dev/null
  restic -r "$W/r-src" --cache-dir "$W/r-cache" init >/dev/null
  # restic deduplicates across repositories only with the source's chunker parameters.
  restic -r "$W/r-dst" --cache-dir "$W/r-cache" init --from-repo "$W/r-src" --copy-chunker-params >/dev/null
  backups
  v_copy() { timed "$1.vmvault.$rep" env VMVAULT_REPOSITORY="$W/v-dst" "$VMVAULT" copy --from-repo "$W/v-src" --json; }
  r_copy() { timed "$1.restic.$rep" restic -r "$W/r-dst" --cache-dir "$W/r-cache" copy --from-repo "$W/r-src"; }
  # vmvault first in odd rounds, restic first in even ones.
  if [ $((rep % 2)) -eq 1 ]; then v_copy full; r_copy full; else r_copy full; v_copy full; fi
  change
  backups
  if [ $((rep % 2)) -eq 1 ]; then v_copy incr; r_copy incr; else r_copy incr; v_copy incr; fi
  id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).id)' "$W/out/backup.json")
  env VMVAULT_REPOSITORY="$W/v-dst" "$VMVAULT" restore "$id" --to "$W/v-out" --format raw --no-sync --json >/dev/null
  qemu-img compare -f qcow2 -F raw "$W/disk.qcow2" "$W/v-out/root.raw" >/dev/null
  node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); const c = j.copied[0];
    console.log(`read.${process.argv[2]} ${c.chunksRead} ${c.chunksUploaded} ${c.chunksKnown}`)' "$W/out/incr.vmvault.$rep.out" "$rep" >>"$W/counts.txt"
done

mkdir -p "$(dirname "$RESULTS")"
W=$W RESULTS=$RESULTS LOAD=$load REPS=$REPS COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  RESTIC_VERSION="$(restic version)" node - <<'EOF'
const fs = require('fs');
const env = process.env;
const rows = fs.readFileSync(`${env.W}/times.tsv`, 'utf8').trim().split('\n').map((l) => l.split(' '));
const counts = fs.readFileSync(`${env.W}/counts.txt`, 'utf8').trim().split('\n').map((l) => l.split(' ').slice(1).map(Number));
const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pick = (step, tool, i) => rows.filter((r) => r[0].startsWith(`${step}.${tool}.`)).map((r) => +r[i]);
const out = { date: new Date().toISOString(), vmvaultCommit: env.COMMIT, restic: env.RESTIC_VERSION, loadAverageBefore: +env.LOAD, repetitions: +env.REPS,
  image: 'the perf image (2 GiB virtual: 400 MiB random, 300 MiB text); directory repositories on one disk; restic copies the snapshot of its raw copy',
  steps: {} };
for (const step of ['full', 'incr']) {
  const v = med(pick(step, 'vmvault', 1)), r = med(pick(step, 'restic', 1));
  const paired = pick(step, 'vmvault', 1).map((x, i) => +(x / pick(step, 'restic', 1)[i]).toFixed(3));
  out.steps[step] = { vmvaultSeconds: v, resticSeconds: r, vmvaultOverRestic: +(v / r).toFixed(3), roundRatios: paired,
    vmvaultPeakRssMiB: Math.max(...pick(step, 'vmvault', 2)) >> 10, resticPeakRssMiB: Math.max(...pick(step, 'restic', 2)) >> 10,
    vmvaultRuns: pick(step, 'vmvault', 1), resticRuns: pick(step, 'restic', 1) };
}
out.steps.incr.change = '1 MiB written in each of 10 chunk-sized regions, then a backup by each tool';
out.steps.incr.vmvaultChunks = { read: counts[0][0], uploaded: counts[0][1], knownFromEarlierCopy: counts[0][2] };
out.restoredFromCopyEqualsSource = true; // qemu-img compare above, or the script stopped
fs.writeFileSync(env.RESULTS, JSON.stringify(out, null, 2) + '\n');
for (const [k, s] of Object.entries(out.steps)) {
  console.log(`${k.padEnd(5)} copy: vmvault ${s.vmvaultSeconds.toFixed(2)} s (${s.vmvaultPeakRssMiB} MiB)  restic ${s.resticSeconds.toFixed(2)} s (${s.resticPeakRssMiB} MiB)  vmvault/restic ${s.vmvaultOverRestic} (by round ${s.roundRatios.join(' / ')})`);
}
const c = out.steps.incr.vmvaultChunks;
console.log(`second copy: vmvault read ${c.read} chunk(s), uploaded ${c.uploaded}, took ${c.knownFromEarlierCopy} on its earlier copy's word`);
console.log(`results written to ${env.RESULTS}`);
EOF

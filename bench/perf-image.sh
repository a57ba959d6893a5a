#!/usr/bin/env bash
# vmvault vs restic on a second image, shaped like a small real VM disk: 2 GiB virtual,
# 400 MiB of random data, 300 MiB of log-like text, the rest never written. Full backup,
# restore (to raw), then an incremental after 2% of the disk changed, each tool in turn,
# BENCH_REPS rounds (median), restores compared with qemu-img. Run by hand after
# `npm run build`: `bash bench/perf-image.sh` (see bench/README.md).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH_DIR=${BENCH_DIR:-/var/tmp/vmvault-bench}
IMAGE=$BENCH_DIR/perf-v1.qcow2   # kept between runs
W=$BENCH_DIR/perf-run
RESULTS=$HERE/results/perf-image.json
REPS=${BENCH_REPS:-3}
MiB=$((1024 * 1024))

for t in restic qemu-img qemu-io node; do command -v "$t" >/dev/null || { echo "bench: $t is missing" >&2; exit 1; }; done
[ -x /usr/bin/time ] || { echo "bench: GNU time is missing: apt-get install -y time" >&2; exit 1; }
[ -f "$ROOT/dist/src/cli/main.js" ] || { echo "bench: vmvault is not built: run npm run build" >&2; exit 1; }
unset GOMAXPROCS RESTIC_REPOSITORY RESTIC_REPOSITORY_FILE RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND RESTIC_CACHE_DIR RESTIC_COMPRESSION VMVAULT_REPOSITORY
export VMVAULT_PASSWORD=bench-passphrase RESTIC_PASSWORD=bench-passphrase

if [ ! -f "$IMAGE" ]; then
  echo "building $IMAGE (2 GiB virtual: 400 MiB random at 0, 300 MiB text at 1 GiB)..."
  mkdir -p "$BENCH_DIR"
  raw=$BENCH_DIR/perf-build.raw
  rm -f "$raw" && truncate -s 2G "$raw"
  dd if=/dev/urandom of="$raw" bs=1M count=400 conv=notrunc iflag=fullblock status=none
  node "$HERE/gen-text.mjs" 300 99 | dd of="$raw" bs=1M seek=1024 count=300 conv=notrunc iflag=fullblock status=none
  qemu-img convert -f raw -O qcow2 "$raw" "$IMAGE.tmp" && rm -f "$raw" && mv "$IMAGE.tmp" "$IMAGE"
fi

if [ "${BENCH_KEEP:-}" != 1 ]; then trap 'rm -rf "$W"' EXIT; fi
rm -rf "$W" && mkdir -p "$W/app" "$W/out"
cp -a "$ROOT/bin" "$ROOT/dist" "$ROOT/package.json" "$W/app/" && ln -s "$ROOT/node_modules" "$W/app/node_modules"
VMVAULT=$W/app/bin/vmvault.js
load=$(cut -d' ' -f1 /proc/loadavg)
# fresh_disks: each round starts from the image as built (the last round's incremental changed
# the copies, and its bitmaps stay in the qcow2 copy).
fresh_disks() {
  cat "$IMAGE" >"$W/disk.qcow2"
  qemu-img convert -f qcow2 -O raw "$IMAGE" "$W/disk.raw"
}
# change: the 2% change of bench/perf-lib.sh, on both copies of the disk.
source "$HERE/perf-lib.sh"
change() { change_disk "$W/disk.qcow2" "$W/disk.raw"; }

# warm_repo DIR: a restore's input is its repository, read once before it as a backup's file is.
# vmvault writes its chunks around the page cache (O_DIRECT), restic through it: unread, vmvault's
# restore would read from the device while restic's read memory.
warm_repo() { sync; find "$1" -type f -print0 | xargs -0 -r cat >/dev/null; }
# timed NAME CMD...: one line of NAME seconds rss-KiB user sys into times.tsv
# Before each: earlier steps' writes are flushed (their writeback would land on the next
# tool) and both inputs are read once, so they are in the page cache.
timed() {
  local name=$1; shift
  sync
  cat "$W/disk.qcow2" "$W/disk.raw" >/dev/null
  /usr/bin/time -f "$name %e %M %U %S" -a -o "$W/times.tsv" "$@" >"$W/out/$name.out" 2>"$W/out/$name.err" || { cat "$W/out/$name.err" >&2; exit 1; }
  tail -1 "$W/times.tsv"
}
for rep in $(seq 1 "$REPS"); do
  rm -rf "$W/v-repo" "$W/r-repo" "$W/v-out" "$W/v-out-ns" "$W/v-out-incr" "$W/r-out" "$W/r-cache"
  fresh_disks
  env VMVAULT_REPOSITORY="$W/v-repo" "$VMVAULT" init >/dev/null
  restic -r "$W/r-repo" --cache-dir "$W/r-cache" init >/dev/null
  v_full() { timed "full.vmvault.$rep" env VMVAULT_REPOSITORY="$W/v-repo" "$VMVAULT" backup --vm perf --disk "root=$W/disk.qcow2" --format qcow2 --json; }
  r_full() { timed "full.restic.$rep" restic -r "$W/r-repo" --cache-dir "$W/r-cache" backup --json "$W/disk.raw"; }
  v_restore() {
    local id
    id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).id)' "$W/out/full.vmvault.$rep.out")
    warm_repo "$W/v-repo"
    timed "restore.vmvault.$rep" env VMVAULT_REPOSITORY="$W/v-repo" "$VMVAULT" restore "$id" --to "$W/v-out" --format raw --json
  }
  # The same restore with --no-sync: like restic's, it ends with its last write (the like-for-like
  # comparison with restic's restore; the durable one is restic's plus its sync, above).
  v_restore_nosync() {
    local id
    id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).id)' "$W/out/full.vmvault.$rep.out")
    warm_repo "$W/v-repo"
    timed "restore-nosync.vmvault.$rep" env VMVAULT_REPOSITORY="$W/v-repo" "$VMVAULT" restore "$id" --to "$W/v-out-ns" --format raw --no-sync --json
  }
  # restic's restore ends with its last write: its data is still in the page cache. vmvault's
  # ends with an fdatasync of the restored file. `sync --data` right after restic's restore
  # times what making its file durable costs, for the durable comparison (restore-sync rows).
  r_restore() {
    warm_repo "$W/r-repo"
    timed "restore.restic.$rep" restic -r "$W/r-repo" --cache-dir "$W/r-cache" restore latest --target "$W/r-out"
    /usr/bin/time -f "restore-sync.restic.$rep %e %M %U %S" -a -o "$W/times.tsv" sync --data "$W/r-out$W/disk.raw"
  }
  # A durable restore by dd, as a reference for this machine (not a proven floor: dd writes one
  # request at a time): dd writes the restored image's data (sparse, O_DIRECT, 4 MiB writes)
  # into a new file and fdatasyncs it, and a bare `node -e 0` is what any Node.js command pays
  # to start. Neither decrypts nor decompresses.
  floor() {
    cat "$W/v-out/root.raw" >/dev/null
    timed "floor.dd.$rep" dd if="$W/v-out/root.raw" of="$W/floor.raw" bs=4M oflag=direct conv=sparse,fdatasync status=none
    rm -f "$W/floor.raw"
    timed "floor.node.$rep" node -e 0
  }
  # vmvault first in odd rounds, restic first in even ones: a drift in the machine's state does not always hit the same tool.
  # (The second of vmvault's two restores finds the repository in the page cache: they alternate too.)
  if [ $((rep % 2)) -eq 1 ]; then v_full; r_full; r_restore; v_restore; v_restore_nosync; else r_full; v_full; v_restore_nosync; v_restore; r_restore; fi
  floor
  qemu-img compare -f qcow2 -F raw "$W/disk.qcow2" "$W/v-out/root.raw" >/dev/null
  qemu-img compare -f qcow2 -F raw "$W/disk.qcow2" "$W/v-out-ns/root.raw" >/dev/null
  qemu-img compare -f qcow2 -F raw "$W/disk.qcow2" "$W/r-out$W/disk.raw" >/dev/null
  du -s --block-size=1 "$W/v-out/root.raw" "$W/r-out$W/disk.raw" | awk -v rep="$rep" '{ print "allocated." (NR == 1 ? "vmvault" : "restic") "." rep, $1 }' >>"$W/alloc.txt"
  # The incremental: vmvault reads what the dirty bitmap says changed; restic reads the whole raw
  # file again and uploads the new chunks. vmvault's is restored and compared.
  change
  v_incr() { timed "incr.vmvault.$rep" env VMVAULT_REPOSITORY="$W/v-repo" "$VMVAULT" backup --vm perf --disk "root=$W/disk.qcow2" --format qcow2 --json; }
  r_incr() { timed "incr.restic.$rep" restic -r "$W/r-repo" --cache-dir "$W/r-cache" backup --json "$W/disk.raw"; }
  if [ $((rep % 2)) -eq 1 ]; then v_incr; r_incr; else r_incr; v_incr; fi
  node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); const d = j.disks[0];
    if (d.mode !== "incremental") { console.error(`bench: the incremental read ${d.mode} (${d.reason})`); process.exit(1); }
    console.log(j.id)' "$W/out/incr.vmvault.$rep.out" >"$W/incr-id"
  env VMVAULT_REPOSITORY="$W/v-repo" "$VMVAULT" restore "$(cat "$W/incr-id")" --to "$W/v-out-incr" --format raw --no-sync --json >/dev/null
  qemu-img compare -f qcow2 -F raw "$W/disk.qcow2" "$W/v-out-incr/root.raw" >/dev/null
  node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); console.log(`read.vmvault.${process.argv[2]} ${j.stats.bytesRead}`)' "$W/out/incr.vmvault.$rep.out" "$rep" >>"$W/alloc.txt"
done

mkdir -p "$(dirname "$RESULTS")"
W=$W RESULTS=$RESULTS LOAD=$load REPS=$REPS COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  RESTIC_VERSION="$(restic version)" node - <<'EOF'
const fs = require('fs');
const env = process.env;
const rows = fs.readFileSync(`${env.W}/times.tsv`, 'utf8').trim().split('\n').map((l) => l.split(' '));
const alloc = Object.fromEntries(fs.readFileSync(`${env.W}/alloc.txt`, 'utf8').trim().split('\n').map((l) => l.split(' ')));
const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pick = (step, tool, i) => rows.filter((r) => r[0].startsWith(`${step}.${tool}.`)).map((r) => +r[i]);
const out = { date: new Date().toISOString(), vmvaultCommit: env.COMMIT, restic: env.RESTIC_VERSION, loadAverageBefore: +env.LOAD, repetitions: +env.REPS,
  image: '2 GiB virtual qcow2: 400 MiB random at 0, 300 MiB log-like text at 1 GiB, the rest never written; restic backs up its raw copy; restores to raw',
  steps: {} };
const goals = { full: 0.4, restore: 0.5, incr: null };
for (const step of ['full', 'restore', 'incr']) {
  const v = med(pick(step, 'vmvault', 1)), r = med(pick(step, 'restic', 1));
  out.steps[step] = { vmvaultSeconds: v, resticSeconds: r, vmvaultOverRestic: +(v / r).toFixed(3),
    goal: goals[step], goalMet: goals[step] === null ? null : v / r <= goals[step],
    vmvaultPeakRssMiB: Math.max(...pick(step, 'vmvault', 2)) >> 10, resticPeakRssMiB: Math.max(...pick(step, 'restic', 2)) >> 10,
    vmvaultRuns: pick(step, 'vmvault', 1), resticRuns: pick(step, 'restic', 1) };
  // Each round runs both tools back to back: the ratio within a round is the least touched
  // by this machine's drift between rounds (its speed moves by 10-20% over minutes).
  const paired = pick(step, 'vmvault', 1).map((x, i) => +(x / pick(step, 'restic', 1)[i]).toFixed(3));
  Object.assign(out.steps[step], { roundRatios: paired, medianRoundRatio: med(paired) });
}
// Durable restore: restic's restore plus the fdatasync of its file, against vmvault's restore (which syncs).
{
  const durable = pick('restore', 'restic', 1).map((x, i) => +(x + pick('restore-sync', 'restic', 1)[i]).toFixed(2));
  const v = med(pick('restore', 'vmvault', 1)), r = med(durable);
  out.steps.restore.durable = { resticRestorePlusSyncRuns: durable, resticSyncRuns: pick('restore-sync', 'restic', 1), resticSeconds: r, vmvaultOverRestic: +(v / r).toFixed(3),
    roundRatios: pick('restore', 'vmvault', 1).map((x, i) => +(x / durable[i]).toFixed(3)) };
}
// Neither durable: vmvault's restore with --no-sync against restic's restore (which does not sync).
{
  const ns = pick('restore-nosync', 'vmvault', 1);
  const v = med(ns), r = out.steps.restore.resticSeconds;
  out.steps.restore.noSync = { vmvaultRuns: ns, vmvaultSeconds: v, resticSeconds: r, vmvaultOverRestic: +(v / r).toFixed(3), goalMet: v / r <= 0.5,
    vmvaultPeakRssMiB: Math.max(...pick('restore-nosync', 'vmvault', 2)) >> 10,
    roundRatios: ns.map((x, i) => +(x / pick('restore', 'restic', 1)[i]).toFixed(3)) };
}
// A durable sparse restore of this image by dd, started as cheaply as Node.js starts: a reference for the machine.
{
  const dd = pick('floor', 'dd', 1), node = pick('floor', 'node', 1);
  const floors = dd.map((x, i) => +(x + node[i]).toFixed(2));
  const r = out.steps.restore;
  out.steps.restore.floor = { ddSparseDirectFdatasyncRuns: dd, nodeStartRuns: node, floorRuns: floors, floorSeconds: med(floors),
    halfOfResticSeconds: +(r.resticSeconds / 2).toFixed(2), vmvaultAboveFloorSeconds: +(r.vmvaultSeconds - med(floors)).toFixed(2) };
}
out.steps.incr.change = '1 MiB written in each of 10 chunk-sized regions (5 in the random data, 5 in the text): 2% of the disk in chunks';
out.steps.incr.vmvaultReadMiB = Math.round(+alloc['read.vmvault.1'] / 1048576);
out.restoredAllocatedMiB = { vmvault: Math.round(alloc['allocated.vmvault.1'] / 1048576), restic: Math.round(alloc['allocated.restic.1'] / 1048576) };
out.restoredImagesEqualSource = true; // qemu-img compare above, or the script stopped
fs.writeFileSync(env.RESULTS, JSON.stringify(out, null, 2) + '\n');
for (const [k, s] of Object.entries(out.steps)) {
  const goal = s.goal === null ? 'no goal' : `goal <= ${s.goal}: ${s.goalMet ? 'yes' : 'NO'}`;
  console.log(`${k.padEnd(8)} vmvault ${s.vmvaultSeconds.toFixed(2)} s (${s.vmvaultPeakRssMiB} MiB)  restic ${s.resticSeconds.toFixed(2)} s (${s.resticPeakRssMiB} MiB)  vmvault/restic ${s.vmvaultOverRestic} (${goal}; by round ${s.roundRatios.join(' / ')})`);
}
console.log(`incremental: vmvault read ${out.steps.incr.vmvaultReadMiB} MiB (its dirty bitmap); restic read the whole raw file again`);
{ const d = out.steps.restore.durable; console.log(`restore, both durable: vmvault ${out.steps.restore.vmvaultSeconds.toFixed(2)} s  restic + sync --data ${d.resticSeconds.toFixed(2)} s (sync ${d.resticSyncRuns.join(' / ')} s)  vmvault/restic ${d.vmvaultOverRestic} (by round ${d.roundRatios.join(' / ')})`); }
{ const n = out.steps.restore.noSync; console.log(`restore, neither durable: vmvault --no-sync ${n.vmvaultSeconds.toFixed(2)} s (${n.vmvaultPeakRssMiB} MiB)  restic ${n.resticSeconds.toFixed(2)} s  vmvault/restic ${n.vmvaultOverRestic} (goal <= 0.5: ${n.goalMet ? 'yes' : 'NO'}; by round ${n.roundRatios.join(' / ')})`); }
{ const f = out.steps.restore.floor; console.log(`durable restore by dd (the restored data, sparse + O_DIRECT + fdatasync, plus node's start): ${f.floorSeconds.toFixed(2)} s (by round ${f.floorRuns.join(' / ')}); half of restic's restore: ${f.halfOfResticSeconds.toFixed(2)} s; vmvault above it: ${f.vmvaultAboveFloorSeconds.toFixed(2)} s`); }
console.log(`restored file allocation: vmvault ${out.restoredAllocatedMiB.vmvault} MiB, restic ${out.restoredAllocatedMiB.restic} MiB (2048 MiB virtual)`);
console.log(`results written to ${env.RESULTS}`);
EOF

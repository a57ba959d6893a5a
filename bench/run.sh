#!/usr/bin/env bash
# vmvault vs restic on one VM disk: full backup, incremental backup, restore.
# Run by hand: `bash bench/run.sh` (after `npm run build`). See bench/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH_DIR=${BENCH_DIR:-/var/tmp/vmvault-bench}
IMAGE=$BENCH_DIR/image-v1.qcow2   # kept between runs (never modified: each run works on a copy)
W=$BENCH_DIR/run                  # everything else; removed at the end unless BENCH_KEEP=1
RESULTS=$HERE/results/latest.json
VMVAULT=$W/app/bin/vmvault.js     # a copy of bin/ and dist/: others may rebuild dist/ while this runs
MiB=$((1024 * 1024))
SLOT=64                           # MiB; the 4 GiB image is 64 slots, the even ones hold data

need() { command -v "$1" >/dev/null || { echo "bench: $1 is missing: apt-get install -y $2" >&2; exit 1; }; }
need restic restic; need qemu-img qemu-utils; need qemu-io qemu-utils; need qemu-nbd qemu-utils; need node nodejs
[ -x /usr/bin/time ] || { echo "bench: GNU time is missing: apt-get install -y time" >&2; exit 1; }
[ -f "$ROOT/dist/src/cli/main.js" ] || { echo "bench: vmvault is not built: run npm run build" >&2; exit 1; }

# Both tools get the same passphrase, their own fresh repository and default settings.
unset GOMAXPROCS RESTIC_REPOSITORY RESTIC_REPOSITORY_FILE RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND \
  RESTIC_CACHE_DIR RESTIC_COMPRESSION RESTIC_PACK_SIZE VMVAULT_REPOSITORY
export VMVAULT_PASSWORD=bench-passphrase RESTIC_PASSWORD=bench-passphrase
V_REPO=$W/repo-vmvault V_RAW_REPO=$W/repo-vmvault-raw R_REPO=$W/repo-restic R_CACHE=$W/restic-cache

# Data slot k (0..31) is slot 2k; kind k%3: 0 random, 1 log-like text, 2 zeros written as data.
# Odd slots are never written, so the image holds 2 GiB of data and 2 GiB unallocated.
zero_writes=()
for k in $(seq 0 31); do
  if [ $((k % 3)) -eq 2 ]; then zero_writes+=(-c "write -P 0 $((2 * k * SLOT * MiB)) $((SLOT * MiB))"); fi
done

build_image() {
  echo "building $IMAGE (4 GiB virtual, 2 GiB data)..."
  mkdir -p "$BENCH_DIR"
  local raw=$BENCH_DIR/build.raw tmp=$BENCH_DIR/build.qcow2 pids=() k
  rm -f "$raw" "$tmp"
  truncate -s 4G "$raw"
  for k in $(seq 0 31); do
    local seek=$((2 * k * SLOT))
    case $((k % 3)) in
      0) dd if=/dev/urandom of="$raw" bs=1M seek=$seek count=$SLOT conv=notrunc iflag=fullblock status=none & ;;
      1) node "$HERE/gen-text.mjs" $SLOT $k | dd of="$raw" bs=1M seek=$seek count=$SLOT conv=notrunc iflag=fullblock status=none & ;;
      2) continue ;;
    esac
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then for p in "${pids[@]}"; do wait "$p"; done; pids=(); fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
  # convert leaves holes unallocated; the zero slots are holes in the raw file at this point
  # (convert would detect zeros and skip them anyway), so write them afterwards as real data.
  qemu-img convert -f raw -O qcow2 "$raw" "$tmp"
  qemu-io -f qcow2 "${zero_writes[@]}" "$tmp" >/dev/null
  rm -f "$raw"
  mv "$tmp" "$IMAGE"
}

# timed STEP TOOL SIZE_PATH CMD...: runs CMD under GNU time and appends a line to measurements.tsv;
# SIZE_PATH (a repository, or a restored file) is measured with du afterwards.
timed() {
  local step=$1 tool=$2 sized=$3 secs rss user sys bytes; shift 3
  local tag=$W/$step.$tool
  if ! /usr/bin/time -f '%e %M %U %S' -o "$tag.time" "$@" >"$tag.out" 2>"$tag.err"; then
    echo "bench: $tool $step FAILED:" >&2; cat "$tag.err" >&2; exit 1
  fi
  read -r secs rss user sys <"$tag.time"
  if [ "$step" = restore ]; then bytes=$(du -s --block-size=1 "$sized" | cut -f1)   # allocated
  else bytes=$(du -sb "$sized" | cut -f1); fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$step" "$tool" "$secs" "$rss" "$bytes" "$user" "$sys" >>"$W/measurements.tsv"
  printf '  %-9s %-8s %6.2f s  %4d MiB RSS  CPU %5.2f s user %5.2f s sys\n' "$step" "$tool" "$secs" $(((rss + 512) / 1024)) "$user" "$sys"
}
warm() { cat "$W/disk.qcow2" "$W/disk.raw" >/dev/null; "$VMVAULT" --help >/dev/null; restic version >/dev/null; }
vmvault_in() { local repo=$1; shift; env VMVAULT_REPOSITORY="$repo" "$VMVAULT" "$@"; }
restic_() { restic -r "$R_REPO" --cache-dir "$R_CACHE" "$@"; }

[ -f "$IMAGE" ] || build_image
if [ "${BENCH_KEEP:-}" != 1 ]; then trap 'rm -rf "$W"' EXIT; fi
rm -rf "$W" && mkdir -p "$W/app"
cp -r "$ROOT/bin" "$ROOT/dist" "$ROOT/package.json" "$W/app/" && ln -s "$ROOT/node_modules" "$W/app/node_modules"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($load > 1) }"; then echo "bench: WARNING: load average is $load: other work on this machine will skew the numbers" >&2; fi

echo "preparing $W (copies of the image, repositories)..."
cat "$IMAGE" >"$W/disk.qcow2"   # not cp: coreutils 9 punches holes for the zero clusters
# The raw copy restic backs up: same content, zero slots allocated as in the qcow2, rest sparse.
qemu-img convert -f qcow2 -O raw "$W/disk.qcow2" "$W/disk.raw"
qemu-io -f raw "${zero_writes[@]}" "$W/disk.raw" >/dev/null
vmvault_in "$V_REPO" init >/dev/null
vmvault_in "$V_RAW_REPO" init >/dev/null
restic_ init >/dev/null

echo "full backup..."
warm
timed full vmvault "$V_REPO" env VMVAULT_REPOSITORY="$V_REPO" "$VMVAULT" backup --vm bench --disk "$W/disk.qcow2" --json
warm
timed full restic "$R_REPO" restic -r "$R_REPO" --cache-dir "$R_CACHE" backup --json "$W/disk.raw"
warm
timed full-raw vmvault "$V_RAW_REPO" env VMVAULT_REPOSITORY="$V_RAW_REPO" "$VMVAULT" backup --vm bench --disk "$W/disk.raw" --json

echo "changing 20 of the 1024 4-MiB regions (1 MiB each, same writes on both copies)..."
RANDOM=7   # the same regions every run
changes=()
declare -A seen=()
while [ ${#changes[@]} -lt 40 ]; do   # 20 × (-c "write ...")
  region=$(( (RANDOM % 32) * 2 * (SLOT / 4) + RANDOM % (SLOT / 4) ))   # a 4 MiB region in a data slot
  if [ -n "${seen[$region]:-}" ]; then continue; fi
  seen[$region]=1
  changes+=(-c "write -P $((0x40 + ${#changes[@]} / 2)) $((region * 4 * MiB)) 1M")
done
qemu-io -f qcow2 "${changes[@]}" "$W/disk.qcow2" >/dev/null
qemu-io -f raw "${changes[@]}" "$W/disk.raw" >/dev/null

echo "incremental backup..."
warm
timed incr vmvault "$V_REPO" env VMVAULT_REPOSITORY="$V_REPO" "$VMVAULT" backup --vm bench --disk "$W/disk.qcow2" --json
warm
timed incr restic "$R_REPO" restic -r "$R_REPO" --cache-dir "$R_CACHE" backup --json "$W/disk.raw"

echo "restore of the incremental backup..."
id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).id)' "$W/incr.vmvault.out")
v_out=$W/restore-vmvault/disk.raw r_out=$W/restore-restic$W/disk.raw
timed restore vmvault "$v_out" env VMVAULT_REPOSITORY="$V_REPO" "$VMVAULT" restore "$id" --to "$W/restore-vmvault" --format raw --json
timed restore restic "$r_out" restic -r "$R_REPO" --cache-dir "$R_CACHE" restore latest --target "$W/restore-restic"

echo "verifying the restored images (qemu-img compare, not timed)..."
verified=ok
for f in "$v_out" "$r_out"; do
  if ! qemu-img compare -f qcow2 -F raw "$W/disk.qcow2" "$f" >"$W/compare.out" 2>&1; then
    verified=FAILED
    printf '\n!!!!!!!!\n!!! RESTORED IMAGE DIFFERS FROM THE SOURCE: %s\n!!! %s\n!!!!!!!!\n\n' "$f" "$(cat "$W/compare.out")" >&2
  fi
done

mkdir -p "$(dirname "$RESULTS")"
W=$W RESULTS=$RESULTS VERIFIED=$verified IMAGE=$IMAGE LOAD_BEFORE=$load LOAD_AFTER="$(cut -d' ' -f1 /proc/loadavg)" \
  COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo -dirty)" \
  RESTIC_VERSION="$(restic version)" QEMU_VERSION="$(qemu-img --version | head -1)" \
  node - <<'EOF'
const fs = require('fs');
const os = require('os');
const env = process.env;
const W = env.W;
const DATA_MIB = 2048;
const runs = {};
for (const line of fs.readFileSync(`${W}/measurements.tsv`, 'utf8').trim().split('\n')) {
  const [step, tool, seconds, rssKiB, bytes, user, sys] = line.split('\t');
  const out = fs.readFileSync(`${W}/${step}.${tool}.out`, 'utf8');
  let stats;
  if (tool === 'vmvault') stats = JSON.parse(out).stats;
  else if (step !== 'restore') stats = out.split('\n').filter((l) => l.includes('"summary"')).map((l) => JSON.parse(l))[0];
  runs[`${step}.${tool}`] = {
    step, tool, seconds: +seconds, cpuUserSeconds: +user, cpuSysSeconds: +sys, peakRssMiB: Math.round(+rssKiB / 1024),
    [step === 'restore' ? 'restoredFileAllocatedBytes' : 'repositoryBytes']: +bytes, ...(stats ? { stats } : {}),
  };
}
const ops = [
  ['full backup', 'full', 'full'],
  ['full backup, vmvault of the raw copy', 'full-raw', null],
  ['incremental (2% changed)', 'incr', 'incr'],
  ['restore (raw)', 'restore', 'restore'],
];
const mib = (b) => b / 1024 / 1024;
const rows = ops.map(([op, v, r]) => {
  const a = runs[`${v}.vmvault`], b = r ? runs[`${r}.restic`] : undefined;
  const size = (x) => x && (x.repositoryBytes ?? x.restoredFileAllocatedBytes);
  return {
    operation: op,
    vmvaultSeconds: a.seconds, resticSeconds: b?.seconds ?? null,
    ratio: b ? +(b.seconds / a.seconds).toFixed(2) : null,
    vmvaultMiBps: Math.round(DATA_MIB / a.seconds), resticMiBps: b ? Math.round(DATA_MIB / b.seconds) : null,
    vmvaultPeakRssMiB: a.peakRssMiB, resticPeakRssMiB: b?.peakRssMiB ?? null,
    vmvaultBytesMiB: Math.round(mib(size(a))), resticBytesMiB: b ? Math.round(mib(size(b))) : null,
  };
});
const fmt = (x, d = 0) => (x === null ? '-' : typeof x === 'number' ? x.toFixed(d) : x);
const head = ['operation', 'vmvault s', 'restic s', 'restic/vmvault', 'vmvault MiB/s', 'restic MiB/s', 'vmvault RSS MiB', 'restic RSS MiB', 'vmvault MiB*', 'restic MiB*'];
const body = rows.map((r) => [r.operation, fmt(r.vmvaultSeconds, 2), fmt(r.resticSeconds, 2), fmt(r.ratio, 2),
  fmt(r.vmvaultMiBps), fmt(r.resticMiBps), fmt(r.vmvaultPeakRssMiB), fmt(r.resticPeakRssMiB), fmt(r.vmvaultBytesMiB), fmt(r.resticBytesMiB)]);
const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
const line = (cells) => '| ' + cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ') + ' |';
console.log('\n' + [line(head), '|' + widths.map((w, i) => (i ? '-'.repeat(w + 1) + ':' : '-'.repeat(w + 2))).join('|') + '|', ...body.map(line)].join('\n'));
console.log('* repository size (du -sb) after the step; for restore, disk space the restored file takes (it is sparse or not).');
console.log(`MiB/s = ${DATA_MIB} MiB of data / seconds. Peak RSS: GNU time %M (vmvault: the node process with its worker threads).`);

const full = rows[0], rest = rows[3];
const maxRss = Math.max(...Object.values(runs).filter((x) => x.tool === 'vmvault').map((x) => x.peakRssMiB));
const goals = {
  fullBackupAtLeast2xRestic: full.ratio >= 2,
  restoreAtLeast2xRestic: rest.ratio >= 2,
  peakRssUnder300MiB: maxRss < 300,
};
console.log(`\ngoals: full backup >= 2x restic: ${goals.fullBackupAtLeast2xRestic ? 'yes' : 'NO'} (${full.ratio}x); ` +
  `restore >= 2x restic: ${goals.restoreAtLeast2xRestic ? 'yes' : 'NO'} (${rest.ratio}x); ` +
  `vmvault peak RSS < 300 MiB: ${goals.peakRssUnder300MiB ? 'yes' : 'NO'} (${maxRss} MiB)`);
console.log(`restored images equal the source: ${env.VERIFIED}`);

const result = {
  date: new Date().toISOString(), vmvaultCommit: env.COMMIT,
  machine: { loadAverageBefore: +env.LOAD_BEFORE, loadAverageAfter: +env.LOAD_AFTER, cpus: os.availableParallelism(), memoryGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version, restic: env.RESTIC_VERSION, qemu: env.QEMU_VERSION },
  image: { path: env.IMAGE, virtualGiB: 4, dataMiB: DATA_MIB, layout: '64 MiB slots; even slots data (cycling random, log-like text, zeros written as data), odd slots unallocated' },
  incremental: '20 of 1024 4-MiB regions get 1 MiB of a byte pattern each',
  rows, runs, goals, restoredImagesEqualSource: env.VERIFIED === 'ok',
};
fs.writeFileSync(env.RESULTS, JSON.stringify(result, null, 2) + '\n');
console.log(`results written to ${env.RESULTS}`);
EOF
[ "$verified" = ok ] || { echo "bench: a restored image differs from the source" >&2; exit 1; }

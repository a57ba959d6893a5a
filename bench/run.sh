#!/usr/bin/env bash
# vmvault vs restic on one VM disk: full backups, re-backups of the unchanged disk, incrementals
# after a 2% change (vmvault with its dirty bitmaps and with --full-read), restore.
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
V_REPO=$W/repo-vmvault V_RAW_REPO=$W/repo-vmvault-raw V_FR_REPO=$W/repo-vmvault-fullread
R_REPO=$W/repo-restic R_Q_REPO=$W/repo-restic-qcow2 R_CACHE=$W/restic-cache
REPS=${BENCH_REPS:-3}             # rounds of each repeated measurement; medians are reported

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

# timed STEP REP TOOL SIZE_PATH CMD...: runs CMD under GNU time and appends a line to measurements.tsv;
# SIZE_PATH (a repository, or a restored file) is measured with du afterwards.
timed() {
  local step=$1 rep=$2 tool=$3 sized=$4 secs rss user sys bytes; shift 4
  local tag=$W/out/$step.$rep.$tool
  if ! /usr/bin/time -f '%e %M %U %S' -o "$tag.time" "$@" >"$tag.out" 2>"$tag.err"; then
    echo "bench: $tool $step (run $rep) FAILED:" >&2; cat "$tag.err" >&2; exit 1
  fi
  read -r secs rss user sys <"$tag.time"
  case $step in
    restore*) bytes=$(du -s --block-size=1 "$sized" | cut -f1) ;;   # allocated
    *) bytes=$(du -sb "$sized" | cut -f1) ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$step" "$rep" "$tool" "$secs" "$rss" "$bytes" "$user" "$sys" >>"$W/measurements.tsv"
  printf '  %-13s %-7s #%s %6.2f s  %4d MiB RSS  CPU %5.2f s user %5.2f s sys\n' "$step" "$tool" "$rep" "$secs" $(((rss + 512) / 1024)) "$user" "$sys"
}
# Before every timed step, of either tool: what earlier steps (and the preparation's copies)
# wrote is flushed, so its writeback does not land on whichever tool comes next; the file that
# step reads is read once, so it is in the page cache; each program is started once
# (repositories were just written: cached).
warm() { sync; cat "$@" >/dev/null; "$VMVAULT" --help >/dev/null; restic version >/dev/null; }
vmvault_in() { local repo=$1; shift; env VMVAULT_REPOSITORY="$repo" "$VMVAULT" "$@"; }
restic_in() { local repo=$1; shift; restic -r "$repo" --cache-dir "$R_CACHE" "$@"; }

# The steps, one function per tool and input, so rounds can run them in either order.
# vmvault QCOW2: disk.qcow2, tracked by the dirty bitmaps; vmvault FULLREAD: disk-fr.qcow2 with
# --full-read; vmvault RAW: disk.raw; restic QCOW2: disk-restic.qcow2 (the image file itself, as
# one backs up a qcow2 VM with restic); restic RAW: disk.raw.
v_qcow2() { warm "$W/disk.qcow2"; timed "$1" "$2" vmvault "$V_REPO" env VMVAULT_REPOSITORY="$V_REPO" "$VMVAULT" backup --vm bench --disk "root=$W/disk.qcow2" --format qcow2 --json; }
v_fullread() { warm "$W/disk-fr.qcow2"; timed "$1" "$2" vmvault "$V_FR_REPO" env VMVAULT_REPOSITORY="$V_FR_REPO" "$VMVAULT" backup --vm bench --disk "root=$W/disk-fr.qcow2" --format qcow2 --full-read --json; }
v_raw() { warm "$W/disk.raw"; timed "$1" "$2" vmvault "$V_RAW_REPO" env VMVAULT_REPOSITORY="$V_RAW_REPO" "$VMVAULT" backup --vm bench --disk "root=$W/disk.raw" --format raw --json; }
r_qcow2() { warm "$W/disk-restic.qcow2"; timed "$1" "$2" restic "$R_Q_REPO" restic -r "$R_Q_REPO" --cache-dir "$R_CACHE" backup --json "$W/disk-restic.qcow2"; }
r_raw() { warm "$W/disk.raw"; timed "$1" "$2" restic "$R_REPO" restic -r "$R_REPO" --cache-dir "$R_CACHE" backup --json "$W/disk.raw"; }
# in_order ROUND CMD...: the commands in this order in odd rounds, reversed in even ones, so a
# drift in the machine's load does not always hit the same tool.
in_order() {
  local round=$1 i; shift
  if [ $((round % 2)) -eq 1 ]; then for ((i = 1; i <= $#; i++)); do eval "${!i}"; done
  else for ((i = $#; i >= 1; i--)); do eval "${!i}"; done; fi
}

# change ROUND: 20 of the 1024 4-MiB regions (about 2%, in data slots, chosen afresh each round
# from a fixed seed) get 1 MiB of a byte pattern not used before: the same writes, through
# qemu-io, on every copy of the disk (qcow2 copies as qcow2, so their bitmaps record them).
change() {
  local round=$1 region f changes=()
  declare -A seen=()
  RANDOM=$((7 + round))
  while [ ${#changes[@]} -lt 40 ]; do   # 20 × (-c "write ...")
    region=$(( (RANDOM % 32) * 2 * (SLOT / 4) + RANDOM % (SLOT / 4) ))   # a 4 MiB region in a data slot
    if [ -n "${seen[$region]:-}" ]; then continue; fi
    seen[$region]=1
    changes+=(-c "write -P $((0x40 + (round - 1) * 20 + ${#changes[@]} / 2)) $((region * 4 * MiB)) 1M")
  done
  for f in disk.qcow2 disk-fr.qcow2 disk-restic.qcow2; do qemu-io -f qcow2 "${changes[@]}" "$W/$f" >/dev/null; done
  qemu-io -f raw "${changes[@]}" "$W/disk.raw" >/dev/null
}

[ -f "$IMAGE" ] || build_image
if [ "${BENCH_KEEP:-}" != 1 ]; then trap 'rm -rf "$W"' EXIT; fi
rm -rf "$W" && mkdir -p "$W/app" "$W/out"
cp -a "$ROOT/bin" "$ROOT/dist" "$ROOT/package.json" "$W/app/" && ln -s "$ROOT/node_modules" "$W/app/node_modules"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($load > 1) }"; then echo "bench: WARNING: load average is $load: other work on this machine will skew the numbers" >&2; fi
started=$(date +%s)

echo "preparing $W (copies of the image, repositories)..."
for f in disk.qcow2 disk-fr.qcow2 disk-restic.qcow2; do
  cat "$IMAGE" >"$W/$f"   # not cp: coreutils 9 punches holes for the zero clusters
done
# The raw copy: same content, zero slots allocated as in the qcow2, rest sparse.
qemu-img convert -f qcow2 -O raw "$W/disk.qcow2" "$W/disk.raw"
qemu-io -f raw "${zero_writes[@]}" "$W/disk.raw" >/dev/null
for r in "$V_REPO" "$V_RAW_REPO" "$V_FR_REPO"; do vmvault_in "$r" init >/dev/null; done
for r in "$R_REPO" "$R_Q_REPO"; do restic_in "$r" init >/dev/null; done

echo "full backups (round 1 of $REPS; the others at the end, into scratch repositories)..."
v_qcow2 full 1
r_raw full 1
v_raw full-raw 1
r_qcow2 full-qcow2 1
# the --full-read copy's first backup (not timed: the same work as the first row)
vmvault_in "$V_FR_REPO" backup --vm bench --disk "root=$W/disk-fr.qcow2" --format qcow2 --json >"$W/out/full-fr.json"

echo "re-backups of the unchanged disks ($REPS rounds)..."
for round in $(seq 1 "$REPS"); do
  in_order "$round" "v_qcow2 same-qcow2 $round" "r_qcow2 same-qcow2 $round" "v_raw same-raw $round" "r_raw same-raw $round"
done

echo "incrementals after changing 20 of the 1024 4-MiB regions ($REPS rounds, new changes each round)..."
for round in $(seq 1 "$REPS"); do
  change "$round"
  in_order "$round" "v_qcow2 incr $round" "r_qcow2 incr-qcow2 $round" "v_fullread incr-fullread $round" "r_raw incr $round"
done

echo "restore of the last incremental backup..."
id=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).id)' "$W/out/incr.$REPS.vmvault.out")
v_out=$W/restore-vmvault/root.raw r_out=$W/restore-restic$W/disk.raw
# A restore's input is its repository: read once before it, as a backup's file is. vmvault writes
# its chunks around the page cache (O_DIRECT), restic through it: unread, vmvault's restore would
# read from the device while restic's read memory.
warm_repo() { sync; find "$1" -type f -print0 | xargs -0 -r cat >/dev/null; }
warm_repo "$V_REPO"
timed restore 1 vmvault "$W/restore-vmvault" env VMVAULT_REPOSITORY="$V_REPO" "$VMVAULT" restore "$id" --to "$W/restore-vmvault" --format raw --json
warm_repo "$R_REPO"
timed restore 1 restic "$r_out" restic -r "$R_REPO" --cache-dir "$R_CACHE" restore latest --target "$W/restore-restic"
# restic's restore ends with its data in the page cache, vmvault's with an fdatasync of the
# restored file: the durable comparison adds what making restic's file durable takes.
timed restore-sync 1 restic "$r_out" sync --data "$r_out"

# full_round ROUND: the four full backups again, each into a fresh scratch repository, in
# alternating order. At the end, because vmvault leaves a dirty bitmap of each repository in
# disk.qcow2: the incrementals above saw only the first repository's.
full_round() {
  local round=$1 S=$W/scratch
  local V_REPO=$S/v V_RAW_REPO=$S/v-raw R_REPO=$S/r R_Q_REPO=$S/r-q
  rm -rf "$S" && mkdir -p "$S"
  for r in "$V_REPO" "$V_RAW_REPO"; do vmvault_in "$r" init >/dev/null; done
  for r in "$R_REPO" "$R_Q_REPO"; do restic_in "$r" init >/dev/null; done
  in_order "$round" "v_qcow2 full $round" "r_raw full $round" "v_raw full-raw $round" "r_qcow2 full-qcow2 $round"
  rm -rf "$S"
}
if [ "$REPS" -gt 1 ]; then
  echo "full backups, rounds 2 to $REPS (fresh scratch repositories)..."
  for round in $(seq 2 "$REPS"); do full_round "$round"; done
fi

echo "verifying the restored images and the copies (qemu-img compare, not timed)..."
verified=ok
for f in "$v_out:raw" "$r_out:raw" "$W/disk-fr.qcow2:qcow2" "$W/disk-restic.qcow2:qcow2"; do
  if ! qemu-img compare -f qcow2 -F "${f##*:}" "$W/disk.qcow2" "${f%:*}" >"$W/compare.out" 2>&1; then
    verified=FAILED
    printf '\n!!!!!!!!\n!!! DIFFERS FROM THE SOURCE: %s\n!!! %s\n!!!!!!!!\n\n' "${f%:*}" "$(cat "$W/compare.out")" >&2
  fi
done

mkdir -p "$(dirname "$RESULTS")"
W=$W RESULTS=$RESULTS VERIFIED=$verified IMAGE=$IMAGE REPS=$REPS LOAD_BEFORE=$load LOAD_AFTER="$(cut -d' ' -f1 /proc/loadavg)" \
  WALL_SECONDS=$(($(date +%s) - started)) \
  COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo -dirty)" \
  RESTIC_VERSION="$(restic version)" QEMU_VERSION="$(qemu-img --version | head -1)" \
  node - <<'EOF'
const fs = require('fs');
const os = require('os');
const env = process.env;
const W = env.W;
const DATA_MIB = 2048;
const MiB = 1024 * 1024;
const problems = [];
// runs['step.tool'] = [run 1, run 2, ...]
const runs = {};
for (const line of fs.readFileSync(`${W}/measurements.tsv`, 'utf8').trim().split('\n')) {
  const [step, rep, tool, seconds, rssKiB, bytes, user, sys] = line.split('\t');
  const out = fs.readFileSync(`${W}/out/${step}.${rep}.${tool}.out`, 'utf8');
  const run = { run: +rep, seconds: +seconds, cpuUserSeconds: +user, cpuSysSeconds: +sys, peakRssMiB: Math.round(+rssKiB / 1024),
    [step.startsWith('restore') ? 'restoredFileAllocatedBytes' : 'repositoryBytes']: +bytes };
  if (tool === 'vmvault' && step !== 'restore') {
    const r = JSON.parse(out);
    Object.assign(run, { mode: r.disks[0].mode, reason: r.disks[0].reason, bytesRead: r.stats.bytesRead, stats: r.stats });
  } else if (tool === 'restic' && !step.startsWith('restore')) {
    const sum = out.split('\n').filter((l) => l.includes('"summary"')).map((l) => JSON.parse(l))[0];
    Object.assign(run, { filesUnmodified: sum.files_unmodified, stats: sum });
  }
  (runs[`${step}.${tool}`] ??= []).push(run);
}
// What each step must have done, or it measured something else.
const expect = { 'same-qcow2.vmvault': 'incremental', 'same-raw.vmvault': 'incremental', 'incr.vmvault': 'incremental', 'incr-fullread.vmvault': 'full', 'full.vmvault': 'full' };
for (const [k, mode] of Object.entries(expect)) for (const r of runs[k]) if (r.mode !== mode) problems.push(`${k} run ${r.run}: mode ${r.mode}, expected ${mode} (${r.reason})`);
for (const k of ['same-qcow2.restic', 'same-raw.restic']) for (const r of runs[k]) if (r.filesUnmodified !== 1) problems.push(`${k} run ${r.run}: restic re-read the file`);

const median = (xs) => { const s = [...xs].sort((a, b) => a - b), m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const med = (k, f = (r) => r.seconds) => median(runs[k].map(f));
const fmt = (x, d = 0) => (x === null || x === undefined ? '-' : typeof x === 'number' ? x.toFixed(d) : x);
function table(head, body) {
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells) => '| ' + cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ') + ' |';
  return [line(head), '|' + widths.map((w, i) => (i ? '-'.repeat(w + 1) + ':' : '-'.repeat(w + 2))).join('|') + '|', ...body.map(line)].join('\n');
}

// 1. Full backups (median of REPS rounds), restore (one run) and the 2% incremental (median), as speed-ups.
const ops = [
  ['full backup', 'full.vmvault', 'full.restic'],
  ['full backup, restic of the qcow2 file', 'full.vmvault', 'full-qcow2.restic'],
  ['full backup, vmvault of the raw copy', 'full-raw.vmvault', null],
  ['incremental (2% changed, median)', 'incr.vmvault', 'incr.restic'],
  ['restore (raw)', 'restore.vmvault', 'restore.restic'],
];
const size = (x) => x.repositoryBytes ?? x.restoredFileAllocatedBytes;
const rows = ops.map(([operation, v, r]) => {
  const a = { seconds: med(v), peakRssMiB: Math.max(...runs[v].map((x) => x.peakRssMiB)), bytes: size(runs[v].at(-1)) };
  const b = r ? { seconds: med(r), peakRssMiB: Math.max(...runs[r].map((x) => x.peakRssMiB)), bytes: size(runs[r].at(-1)) } : undefined;
  return {
    operation, vmvaultSeconds: a.seconds, resticSeconds: b?.seconds ?? null,
    ratio: b ? +(b.seconds / a.seconds).toFixed(2) : null,
    vmvaultMiBps: Math.round(DATA_MIB / a.seconds), resticMiBps: b ? Math.round(DATA_MIB / b.seconds) : null,
    vmvaultPeakRssMiB: a.peakRssMiB, resticPeakRssMiB: b?.peakRssMiB ?? null,
    vmvaultBytesMiB: Math.round(a.bytes / MiB), resticBytesMiB: b ? Math.round(b.bytes / MiB) : null,
  };
});
console.log('\n' + table(
  ['operation', 'vmvault s', 'restic s', 'restic/vmvault', 'vmvault MiB/s', 'restic MiB/s', 'vmvault RSS MiB', 'restic RSS MiB', 'vmvault MiB*', 'restic MiB*'],
  rows.map((r) => [r.operation, fmt(r.vmvaultSeconds, 2), fmt(r.resticSeconds, 2), fmt(r.ratio, 2),
    fmt(r.vmvaultMiBps), fmt(r.resticMiBps), fmt(r.vmvaultPeakRssMiB), fmt(r.resticPeakRssMiB), fmt(r.vmvaultBytesMiB), fmt(r.resticBytesMiB)])));
console.log('* repository size (du -sb) after the step; for restore, disk space the restored file takes (it is sparse or not).');
console.log(`MiB/s = ${DATA_MIB} MiB of data / seconds. Peak RSS: GNU time %M (vmvault: the node process with its worker threads).`);
console.log('restic backs up the raw copy in these rows (but the second).');

// 2. Change tracking: vmvault's time as a fraction of restic's for the same change (medians).
const cbtCases = [
  ['2% changed: bitmap incremental vs restic (qcow2 file)', 'incr.vmvault', 'incr-qcow2.restic', 0.1],
  ['2% changed: bitmap incremental vs restic (raw file)', 'incr.vmvault', 'incr.restic', null],
  ['2% changed: --full-read vs restic (qcow2 file)', 'incr-fullread.vmvault', 'incr-qcow2.restic', null],
  ['unchanged qcow2 re-backup', 'same-qcow2.vmvault', 'same-qcow2.restic', 0.5],
  ['unchanged raw re-backup', 'same-raw.vmvault', 'same-raw.restic', 0.5],
];
const changeTracking = cbtCases.map(([operation, v, r, goal]) => {
  const vs = med(v), rs = med(r), ratio = +(vs / rs).toFixed(3);
  return {
    operation, vmvault: v, restic: r, vmvaultSeconds: vs, resticSeconds: rs, vmvaultOverRestic: ratio, goal, goalMet: goal === null ? null : ratio <= goal,
    vmvaultBytesReadMiB: +(med(v, (x) => x.bytesRead) / MiB).toFixed(1), resticBytesReadMiB: Math.round(med(r, (x) => (x.filesUnmodified === 1 ? 0 : x.stats.total_bytes_processed)) / MiB),
    vmvaultRuns: runs[v].map((x) => x.seconds), resticRuns: runs[r].map((x) => x.seconds),
    vmvaultPeakRssMiB: Math.max(...runs[v].map((x) => x.peakRssMiB)), resticPeakRssMiB: Math.max(...runs[r].map((x) => x.peakRssMiB)),
  };
});
const bitmapGain = +(med('incr-fullread.vmvault') / med('incr.vmvault')).toFixed(2);
console.log(`\nchange tracking (${env.REPS} runs each, medians; vmvault/restic is the fraction of restic's time vmvault takes):\n` + table(
  ['case', 'vmvault s', 'restic s', 'vmvault/restic', 'goal', 'vmvault read MiB', 'restic read MiB', 'vmvault runs s', 'restic runs s'],
  changeTracking.map((c) => [c.operation, fmt(c.vmvaultSeconds, 2), fmt(c.resticSeconds, 2), fmt(c.vmvaultOverRestic, 3),
    c.goal === null ? '-' : `<= ${c.goal} ${c.goalMet ? 'yes' : 'NO'}`, fmt(c.vmvaultBytesReadMiB, 1), fmt(c.resticBytesReadMiB),
    c.vmvaultRuns.map((x) => x.toFixed(2)).join(' '), c.resticRuns.map((x) => x.toFixed(2)).join(' ')])));
console.log(`bitmap gain: --full-read takes ${bitmapGain}x the time of the bitmap incremental for the same change.`);
console.log('read MiB: vmvault stats.bytesRead; restic total_bytes_processed, or 0 when it skipped the file as unmodified (same size, mtime, ctime, inode).');

const full = rows[0], rest = rows[4];
const maxRss = Math.max(...Object.entries(runs).filter(([k]) => k.endsWith('.vmvault')).flatMap(([, xs]) => xs.map((x) => x.peakRssMiB)));
// The targets of the scale issue (full backup and restore as fractions of restic's time, peak RSS) and
// of the incrementals issue (change tracking): vmvault/restic = 1 / ratio.
const over = (r) => +(1 / r.ratio).toFixed(3);
const goals = {
  fullBackupAtMost0_4xRestic: over(full) <= 0.4,
  restoreAtMost0_5xRestic: over(rest) <= 0.5,
  restoreSparse: rest.vmvaultBytesMiB < DATA_MIB,
  peakRssAtMost256MiB: maxRss <= 256,
  incrementalAtMost0_1xRestic: changeTracking[0].goalMet,
  unchangedQcow2AtMost0_5xRestic: changeTracking[3].goalMet,
  unchangedRawAtMost0_5xRestic: changeTracking[4].goalMet,
};
const yn = (b) => (b ? 'yes' : 'NO');
console.log(`\ngoals: full backup <= 0.4x restic: ${yn(goals.fullBackupAtMost0_4xRestic)} (${over(full)}x); ` +
  `restore <= 0.5x restic: ${yn(goals.restoreAtMost0_5xRestic)} (${over(rest)}x), sparse: ${yn(goals.restoreSparse)} (${rest.vmvaultBytesMiB} MiB allocated); ` +
  `vmvault peak RSS <= 256 MiB: ${yn(goals.peakRssAtMost256MiB)} (${maxRss} MiB);\n` +
  `  2% incremental <= 0.1x restic: ${yn(goals.incrementalAtMost0_1xRestic)} (${changeTracking[0].vmvaultOverRestic}x); ` +
  `unchanged re-backup <= 0.5x restic: qcow2 ${yn(goals.unchangedQcow2AtMost0_5xRestic)} (${changeTracking[3].vmvaultOverRestic}x), ` +
  `raw ${yn(goals.unchangedRawAtMost0_5xRestic)} (${changeTracking[4].vmvaultOverRestic}x)`);
// Both durable: restic's restore plus `sync --data` of its file, against vmvault's restore (which ends with fdatasync).
const durableRestore = { resticSeconds: +(med('restore.restic') + med('restore-sync.restic')).toFixed(2), resticSyncSeconds: med('restore-sync.restic') };
durableRestore.vmvaultOverRestic = +(rest.vmvaultSeconds / durableRestore.resticSeconds).toFixed(3);
console.log(`restore, both durable: vmvault ${fmt(rest.vmvaultSeconds, 2)} s, restic + sync --data ${fmt(durableRestore.resticSeconds, 2)} s ` +
  `(sync ${fmt(durableRestore.resticSyncSeconds, 2)} s): vmvault/restic ${durableRestore.vmvaultOverRestic}`);
console.log(`restored images and copies equal the source: ${env.VERIFIED}`);
for (const p of problems) console.error(`bench: WRONG MODE: ${p}`);
console.log(`whole run: ${env.WALL_SECONDS} s`);

const result = {
  date: new Date().toISOString(), vmvaultCommit: env.COMMIT, wallSeconds: +env.WALL_SECONDS, repetitions: +env.REPS,
  machine: { loadAverageBefore: +env.LOAD_BEFORE, loadAverageAfter: +env.LOAD_AFTER, cpus: os.availableParallelism(), memoryGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version, restic: env.RESTIC_VERSION, qemu: env.QEMU_VERSION },
  image: { path: env.IMAGE, virtualGiB: 4, dataMiB: DATA_MIB, layout: '64 MiB slots; even slots data (cycling random, log-like text, zeros written as data), odd slots unallocated' },
  incremental: `each round, 20 of 1024 4-MiB regions (in data slots) get 1 MiB of a new byte pattern; same qemu-io writes on every copy`,
  inputs: { vmvault: 'disk.qcow2 (bitmaps), disk-fr.qcow2 (--full-read), disk.raw (raw rows)', restic: 'disk.raw (full, incr, same-raw, restore), disk-restic.qcow2: the qcow2 file itself (full-qcow2, incr-qcow2, same-qcow2)' },
  rows, changeTracking, bitmapGain, durableRestore, runs, goals, problems, restoredImagesEqualSource: env.VERIFIED === 'ok',
};
fs.writeFileSync(env.RESULTS, JSON.stringify(result, null, 2) + '\n');
console.log(`results written to ${env.RESULTS}`);
process.exit(problems.length ? 2 : 0);
EOF
[ "$verified" = ok ] || { echo "bench: a restored image differs from the source" >&2; exit 1; }

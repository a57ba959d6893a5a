#!/usr/bin/env bash
# Restore to raw, side by side, on bench/run.sh's image (4 GiB virtual, 2 GiB written, of which
# 1.33 GiB non-zero): this build of vmvault, optionally another build (OLD=DIR holding bin/ and
# dist/, e.g. a copy of main's), and restic restoring the same disk as a raw file.
# Run by hand: `npm run build && bash bench/restore-raw.sh` (OLD=/path/to/build to compare).
# Prints one line per restore (GNU time: wall, user, sys, peak RSS; allocated bytes; qemu-img
# compare with the source) and the medians. The image is kept in BENCH_DIR between runs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
B=${BENCH_DIR:-/var/tmp/vmvault-restore-bench}
REPS=${BENCH_REPS:-3}
MiB=$((1024 * 1024)) SLOT=64
export VMVAULT_PASSWORD=bench-passphrase RESTIC_PASSWORD=bench-passphrase
unset VMVAULT_REPOSITORY RESTIC_REPOSITORY
mkdir -p "$B/app"
# A copy of this build: others may rebuild dist/ while this runs.
rm -rf "$B/app/new"; mkdir -p "$B/app/new"; cp -a "$ROOT/bin" "$ROOT/dist" "$ROOT/package.json" "$B/app/new/"
ln -sfn "$(readlink -f "$ROOT/node_modules")" "$B/app/new/node_modules"
apps=(new)
if [ -n "${OLD:-}" ]; then
  rm -rf "$B/app/old"; mkdir -p "$B/app/old"; cp -a "$OLD/bin" "$OLD/dist" "$OLD/package.json" "$B/app/old/"
  ln -sfn "$(readlink -f "$ROOT/node_modules")" "$B/app/old/node_modules"; apps+=(old)
fi

if [ ! -f "$B/image.qcow2" ]; then   # the layout of bench/run.sh's image
  echo "building $B/image.qcow2..."
  raw=$B/build.raw; rm -f "$raw"; truncate -s 4G "$raw"; zero_writes=()
  for k in $(seq 0 31); do
    case $((k % 3)) in
      0) dd if=/dev/urandom of="$raw" bs=1M seek=$((2 * k * SLOT)) count=$SLOT conv=notrunc iflag=fullblock status=none ;;
      1) node "$HERE/gen-text.mjs" $SLOT $k | dd of="$raw" bs=1M seek=$((2 * k * SLOT)) count=$SLOT conv=notrunc iflag=fullblock status=none ;;
      2) zero_writes+=(-c "write -P 0 $((2 * k * SLOT * MiB)) $((SLOT * MiB))") ;;
    esac
  done
  qemu-img convert -f raw -O qcow2 "$raw" "$B/build.qcow2"
  qemu-io -f qcow2 "${zero_writes[@]}" "$B/build.qcow2" >/dev/null
  rm -f "$raw"; mv "$B/build.qcow2" "$B/image.qcow2"
fi
if [ ! -f "$B/backup.id" ]; then   # one repository each, written once (by the new build)
  rm -rf "$B/repo" "$B/repo-restic" "$B/cache-restic" "$B/disk.raw"
  VMVAULT_REPOSITORY=$B/repo node "$B/app/new/bin/vmvault.js" init >/dev/null
  VMVAULT_REPOSITORY=$B/repo node "$B/app/new/bin/vmvault.js" backup --vm bench --disk "root=$B/image.qcow2" --format qcow2 --json |
    node -e 'let s="";process.stdin.on("data",(d)=>s+=d).on("end",()=>console.log(JSON.parse(s).id))' >"$B/backup.id.tmp"
  qemu-img convert -f qcow2 -O raw "$B/image.qcow2" "$B/disk.raw"
  restic -q init -r "$B/repo-restic" --cache-dir "$B/cache-restic"
  (cd "$B" && restic -q -r "$B/repo-restic" --cache-dir "$B/cache-restic" backup disk.raw)
  mv "$B/backup.id.tmp" "$B/backup.id"
fi
ID=$(cat "$B/backup.id")

: >"$B/times.tsv"
one() {   # one TOOL REP
  local tool=$1 rep=$2 out=$B/out file
  rm -rf "$out"
  cat "$B"/repo/chunks/*/* "$B"/repo-restic/data/*/* >/dev/null   # both repositories in the page cache
  if [ "$tool" = restic ]; then
    /usr/bin/time -f '%e %U %S %M' -o "$B/t" restic -q -r "$B/repo-restic" --cache-dir "$B/cache-restic" restore latest --target "$out"
    file=$out/disk.raw
    # restic's restore leaves its data in the page cache, vmvault's ends with an fdatasync:
    # restic-durable is restic's restore plus `sync --data` of its file.
    /usr/bin/time -f '%e %U %S %M' -o "$B/t-sync" sync --data "$file"
  else
    /usr/bin/time -f '%e %U %S %M' -o "$B/t" env VMVAULT_REPOSITORY="$B/repo" node "$B/app/$tool/bin/vmvault.js" restore "$ID" --to "$out" --format raw --json >/dev/null
    file=$out/root.raw
  fi
  local same=identical alloc; alloc=$(du -s --block-size=1 "$file" | cut -f1)
  qemu-img compare -q -f qcow2 -F raw "$B/image.qcow2" "$file" || same=DIFFERENT
  read -r secs user sys rss <"$B/t"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$rep" "$secs" "$user" "$sys" "$rss" "$alloc" "$same" | tee -a "$B/times.tsv"
  if [ "$tool" = restic ]; then
    read -r ssecs _ <"$B/t-sync"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' restic-durable "$rep" "$(awk -v a="$secs" -v b="$ssecs" 'BEGIN { printf "%.2f", a + b }')" "$user" "$sys" "$rss" "$alloc" "$same" | tee -a "$B/times.tsv"
  fi
  rm -rf "$out"
}
echo -e "tool\trep\tseconds\tuser\tsys\tpeakKiB\tallocated\tcompare"
for rep in $(seq 1 "$REPS"); do for tool in "${apps[@]}" restic; do one "$tool" "$rep"; done; done
node -e '
const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => l.split("\t"));
const med = (xs) => { const s = xs.map(Number).sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
for (const tool of [...new Set(rows.map((r) => r[0]))]) {
  const r = rows.filter((x) => x[0] === tool);
  console.log(`${tool}: median of ${r.length}: ${med(r.map((x) => x[2]))} s wall, ${med(r.map((x) => x[3]))} s user, ${med(r.map((x) => x[4]))} s sys, peak RSS ${Math.round(med(r.map((x) => x[5])) / 1024)} MiB, ${(med(r.map((x) => x[6])) / 2 ** 30).toFixed(2)} GiB allocated, ${r.every((x) => x[7] === "identical") ? "all identical" : "SOME DIFFERENT"}`);
}' "$B/times.tsv"

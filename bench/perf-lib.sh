# Shared by perf-image.sh and copy.sh (sourced): the perf image's 2% change.
# change_disk QCOW2 RAW: 2% of the disk changed (40 MiB of chunks): 1 MiB of a new byte
# pattern in each of 10 chunk-sized regions, 5 in the random data and 5 in the text; the
# same writes, through qemu-io, on both copies (the qcow2 one as qcow2, so its dirty
# bitmap records them).
change_disk() {
  local MiB=$((1024 * 1024)) c=()
  for i in 0 1 2 3 4; do
    c+=(-c "write -P $((0x61 + i)) $(((13 + 19 * i) * 4 * MiB)) 1M")
    c+=(-c "write -P $((0x71 + i)) $((1024 * MiB + (7 + 16 * i) * 4 * MiB)) 1M")
  done
  qemu-io -f qcow2 "${c[@]}" "$1" >/dev/null
  qemu-io -f raw "${c[@]}" "$2" >/dev/null
}

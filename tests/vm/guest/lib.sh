# Helpers for guest scripts (sourced): each check leaves files in $RESULTS/rows that the
# host-side test reads, so one boot can serve many tests. Nothing here exits on failure.

mkdir -p "$RESULTS/rows"

# row NAME VALUE...: record a value.
row() {
  local name=$1; shift
  printf '%s\n' "$*" > "$RESULTS/rows/$name"
}

# check NAME CMD...: run CMD, record its exit status (NAME.rc), output (NAME.out) and wall
# time in seconds (NAME.seconds); print its stdout for the caller.
check() {
  local name=$1; shift
  local start end rc
  start=$(date +%s.%N)
  "$@" > "$RESULTS/rows/$name.out" 2> "$RESULTS/rows/$name.err"
  rc=$?
  end=$(date +%s.%N)
  echo "$rc" > "$RESULTS/rows/$name.rc"
  awk "BEGIN { print $end - $start }" > "$RESULTS/rows/$name.seconds"
  cat "$RESULTS/rows/$name.out"
  return "$rc"
}

# queue PREFIX DEV: the block queue limits and flags of DEV, one row each.
queue() {
  local prefix=$1 name=${2#/dev/} f
  for f in logical_block_size physical_block_size minimum_io_size optimal_io_size \
           max_hw_sectors_kb max_segments discard_granularity discard_max_hw_bytes \
           write_zeroes_max_bytes write_cache fua rotational nr_requests; do
    row "$prefix.queue.$f" "$(cat "/sys/block/$name/queue/$f" 2>&1)"
  done
  row "$prefix.size" "$(blockdev --getsize64 "$2" 2>&1)"
  row "$prefix.ro" "$(blockdev --getro "$2" 2>&1)"
}

# requests PREFIX DEV CMD...: run CMD with block-layer tracing on; record the request kinds
# (rwbs: FF flush, W…F… FUA write, D discard) the kernel issued to DEV, sorted and unique.
requests() {
  local prefix=$1 dev=$2 tr=/sys/kernel/tracing; shift 2
  local majmin
  majmin=$(printf '%d,%d' "0x$(stat -L -c %t "$dev")" "0x$(stat -L -c %T "$dev")")
  mountpoint -q $tr || mount -t tracefs nodev $tr
  echo 0 > $tr/tracing_on; echo > $tr/trace
  echo 1 > $tr/events/block/block_rq_issue/enable
  echo 1 > $tr/tracing_on
  "$@" 2> "$RESULTS/rows/$prefix.err"
  echo "$?" > "$RESULTS/rows/$prefix.rc"
  echo 0 > $tr/tracing_on
  echo 0 > $tr/events/block/block_rq_issue/enable
  awk -v d="$majmin" '$0 ~ "block_rq_issue: " d " " { for (i = 1; i <= NF; i++)
      if ($i == d) { print $(i + 1); break } }' $tr/trace | sort -u > "$RESULTS/rows/$prefix"
}

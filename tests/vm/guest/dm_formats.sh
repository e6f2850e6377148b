# dm on-disk formats against 6.1's kernel (tests/vm/test_dm_formats.py): runs the
# dm_formats_NAME.sh fragment beside this script named by $2 (every one without it) as
#     bash FRAGMENT INPUT OUTPUT
# with INPUT=$1/NAME (what the host prepared for it, read-only) and OUTPUT=$RESULTS/NAME
# (where it leaves its results), NAME being the fragment's name without dm_formats_.
# A fragment's exit status and output land in OUTPUT/status and OUTPUT/log.
# Exported for the fragments: DMSETUP (the real dmsetup, run from tmpfs with
# --noudevsync: no udev here) and dmdev NAME (the /dev/dm-N node of a mapped device,
# which devtmpfs makes without udev).
inputs=$1
only=${2:-*}
here=$(dirname "$0")
for m in dm-mod loop; do
  modprobe "$m" || echo "modprobe $m failed"
done
source "$here/dmbin.sh"
export DMSETUP="$DMBIN --noudevsync"
dmdev() { echo "/dev/dm-$($DMSETUP info -c --noheadings -o minor "$1")"; }
export -f dmdev
for fragment in "$here"/dm_formats_$only.sh; do
  name=$(basename "$fragment" .sh)
  name=${name#dm_formats_}
  out=$RESULTS/$name
  mkdir -p "$out"
  start=$(date +%s.%N)
  bash "$fragment" "$inputs/$name" "$out" > "$out/log" 2>&1
  echo $? > "$out/status"
  end=$(date +%s.%N)
  awk "BEGIN { print $end - $start }" > "$out/seconds"
done
dmesg > "$RESULTS/dmesg"

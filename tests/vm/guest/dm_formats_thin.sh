# dm-thin's fragment of the format oracle (run by dm_formats.sh; host half:
# tests/vm/dm_formats_thin.py): bash dm_formats_thin.sh INPUT OUTPUT
#  1. minidisk's pool (INPUT/ours_*.img, copied: INPUT is read-only) loaded by 6.1's
#     dm-thin-pool over loop devices: sha256 and status of thins 1 and 2, and the pool's
#     status -> ours.ID.sha, ours.ID.status, ours.pool.status, each checked here against
#     what minidisk read and showed (INPUT/expected.*): a difference fails the fragment;
#  2. the kernel writes into it (a new block on thin 2, one that thin 1 shares) ->
#     ours_after.ID.sha, and the files as the kernel left them -> ours_*.img;
#  3. the kernel's own pool (create_thin, writes, create_snap, more writes,
#     set_transaction_id, reserve_metadata_snap) -> kernel.ID.sha, kernel.ID.status,
#     kernel.pool.status, kernel_*.img.
set -u
IN=$1 OUT=$2
D=$DMSETUP
modprobe dm-thin-pool || exit 1
work=/tmp/thin
mkdir -p $work
thin_sectors=$(cat "$IN/thin_sectors")
data_sectors=$(cat "$IN/data_sectors")

wr() {  # DEVICE OFFSET_BYTES LENGTH PATTERN_OFFSET: one O_DIRECT write from the pattern
  dd if="$IN/pattern" of="$1" bs=4096 skip=$(($4 / 4096)) seek=$(($2 / 4096)) \
     count=$(($3 / 4096)) oflag=direct conv=notrunc status=none || exit 1
}

record() {  # PREFIX POOL THIN_IDS...
  local prefix=$1 pool=$2 id
  shift 2
  for id in "$@"; do
    dd if="$(dmdev $pool.$id)" bs=64k count=$((thin_sectors / 128)) iflag=direct \
       status=none | sha256sum | cut -d' ' -f1 > "$OUT/$prefix.$id.sha"
    $D status $pool.$id > "$OUT/$prefix.$id.status"
  done
  $D status $pool > "$OUT/$prefix.pool.status"
}

up() {  # POOL META DATA: a pool over loop devices of the two files
  local m d
  m=$(losetup -f --show "$2") && d=$(losetup -f --show "$3") || exit 1
  echo "$m $d" > $work/$1.loops
  $D create $1 --table "0 $data_sectors thin-pool $m $d 128 0" || exit 1
}

thin() {  # POOL ID
  # No udev here: no /dev/mapper/NAME, so the pool by its /dev/dm-N node.
  $D create $1.$2 --table "0 $thin_sectors thin $(dmdev $1) $2" || exit 1
}

down() {  # POOL THIN_IDS...
  local pool=$1 id
  shift
  for id in "$@"; do $D remove $pool.$id || exit 1; done
  $D remove $pool || exit 1
  losetup -d $(cat $work/$pool.loops)
}

# 1 and 2: ours
cp "$IN/ours_meta.img" "$IN/ours_data.img" $work/
up opool $work/ours_meta.img $work/ours_data.img
thin opool 1
thin opool 2
record ours opool 1 2
for f in "$IN"/expected.*; do  # what minidisk read and showed for its own pool
  key=${f#$IN/expected.}
  if [ "${key%.status}" != "$key" ]; then
    got=$(cut -d' ' -f4- "$OUT/ours.$key")
  else
    got=$(cat "$OUT/ours.$key")
  fi
  [ "$got" = "$(cat "$f")" ] || { echo "ours.$key: kernel '$got', minidisk '$(cat "$f")'"; exit 1; }
done
wr "$(dmdev opool.2)" $((2 * 65536)) 4096 8192
wr "$(dmdev opool.2)" $((25 * 65536)) 65536 65536
sync
record ours_after opool 1 2
down opool 1 2
cp $work/ours_meta.img $work/ours_data.img "$OUT/"

# 3: the kernel's
truncate -s 2M $work/kernel_meta.img
truncate -s 4M $work/kernel_data.img
up kpool $work/kernel_meta.img $work/kernel_data.img
$D message kpool 0 "create_thin 1" || exit 1
thin kpool 1
wr "$(dmdev kpool.1)" 0 $((3 * 65536)) 0
wr "$(dmdev kpool.1)" $((20 * 65536 + 4096)) 8192 4096
$D suspend kpool.1 && $D message kpool 0 "create_snap 7 1" && $D resume kpool.1 || exit 1
thin kpool 7
wr "$(dmdev kpool.7)" 65536 4096 12288
wr "$(dmdev kpool.1)" $((2 * 65536)) 4096 16384
wr "$(dmdev kpool.7)" $((28 * 65536)) 65536 131072
$D message kpool 0 "set_transaction_id 0 3" || exit 1
$D message kpool 0 "reserve_metadata_snap" || exit 1
wr "$(dmdev kpool.1)" $((29 * 65536)) 4096 0
sync
record kernel kpool 1 7
down kpool 1 7
cp $work/kernel_meta.img $work/kernel_data.img "$OUT/"
echo done

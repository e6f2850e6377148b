# dm-snapshot's formats, kernel side (tests/vm/test_dm_formats.py; run by dm_formats.sh as
# `bash dm_formats_snapshot.sh INPUT OUTPUT`). INPUT has data.bin, refusals and one
# directory per scenario S with
#   ops         one operation a line (below)
#   spec        "origin - - - 0 SECTORS", then one line per snapshot:
#               "sN <P|PO|N> <chunk> <chunk on reload> START SECTORS" (its COW's place)
#   init/disk.img  the origin and the COW devices, one after the other: what the scenario
#               starts from (one loop device, cut by linear devices S.lo and S.lcN)
#   host/disk.img  the same after minidisk ran the scenario
# The kernel runs the scenario on a copy of init/ (an origin S.o with snapshot-origin and
# snapshots S.sN); OUTPUT/S gets NNN.* for every operation, kernel/disk.img (afterwards)
# and host.* (minidisk's disk.img, read-only, opened by the kernel: snapshots read whole).
#   w DEV OFF LEN BS DOFF  dd data.bin[DOFF, +LEN) to DEV (o, sN or m) at OFF, BS bytes a
#                          write, O_DIRECT: one request at a time, in order
#   status | table         dmsetup status | table of every device
#   dump                   every device read whole (NNN.DEV, or NNN.DEV.rc 1 if that fails)
#   cycle                  suspend and resume the origin (its split boundary is computed)
#   reload                 remove them all, create them again (sN with its reload chunk)
#   merge sN               remove the origin and sN, create S.m: snapshot-merge of sN's COW
#                          over the origin, and wait until it is done
#   handover sN            suspend sN, load its table again (reload chunk), resume
#   lvmmerge sN            as LVM merges: suspend sN and the origin, load snapshot-merge of
#                          sN's COW into the origin, resume it, wait; status; remove sN
# Processes are few on purpose (one loop device, one concise create for all devices, minors
# chosen so that /dev/dm-N is known, no subshells): each costs ~0.3 s under TCG on a busy
# host.
# Then OUTPUT/refuse/N.{rc,out} for the tables in INPUT/refusals (ORIGIN and COW stand for
# loop devices), with "dm_formats refusal N" written to the kernel log before each (the
# runner keeps the log), and OUTPUT/targets. Not among them: a COW device with a bad magic.
# 6.1.0-57 refuses it ("Failed to read snapshot metadata", -ENXIO) but in one boot of two
# then hit "list_del corruption" (a BUG in the kernel) and its device-mapper stopped
# working; tests/dm/test_snapshot.py checks ours.
set -u
in=$1 out=$2
modprobe dm-snapshot || echo "modprobe dm-snapshot failed"
dm() { $DMSETUP "$@"; }

# Minors from 200 (other fragments' devices take the lowest free ones): the origin 200,
# snapshot N 201+N, the merge 209, the image's pieces 210 and up.
minor() {  # DEV: sets m
  case $1 in
    o) m=200 ;; m) m=209 ;; lo) m=210 ;; lc*) m=$((${1#lc} + 211)) ;; s*) m=$((${1#s} + 201)) ;;
  esac
}
while read -r major name; do [ "$name" = device-mapper ] && dmmaj=$major; done < /proc/devices

spec_of() {  # S: the origin's and the snapshots' places in disk.img, and their stores
  names=() stores=() chunks=() reloads=() starts=() lengths=()
  local n kind chunk reload start length
  while read -r n kind chunk reload start length; do
    if [ "$n" = origin ]; then sectors=$length; continue; fi
    names+=("$n") stores+=("$kind") chunks+=("$chunk") reloads+=("$reload")
    starts+=("$start") lengths+=("$length")
  done < "$in/$1/spec"
}

pieces() {  # S FLAGS: linear devices S.lo and S.lcN over the loop device's pieces of disk.img
  local i spec="$1.lo,,210,$2,0 $sectors linear $loop 0"
  for i in "${!names[@]}"; do
    spec+=";$1.lc$i,,$((i + 211)),$2,0 ${lengths[$i]} linear $loop ${starts[$i]}"
  done
  dm create --concise "$spec"
}

create() {  # S FLAGS RELOAD(0|1): the origin and every snapshot
  local s=$1 flags=$2 i spec chunk
  spec="$s.o,,200,$flags,0 $sectors snapshot-origin $dmmaj:210"
  for i in "${!names[@]}"; do
    chunk=${chunks[$i]}
    [ "$3" = 1 ] && chunk=${reloads[$i]}
    spec+=";$s.${names[$i]},,$((i + 201)),$flags,0 $sectors snapshot $dmmaj:210"
    spec+=" $dmmaj:$((i + 211)) ${stores[$i]} $chunk"
  done
  dm create --concise "$spec"
  live=(o "${names[@]}")
}

remove() {  # S DEV...
  local s=$1 d args=()
  shift
  for d in "$@"; do args+=("$s.$d"); done
  dm remove "${args[@]}"
}

dump() {  # PREFIX DEV...: each read whole (PREFIX.DEV), or PREFIX.DEV.rc 1 if that fails
  local d prefix=$1
  shift
  for d in "$@"; do
    minor "$d"
    if ! dd if="/dev/dm-$m" of="$prefix.$d" bs=64k iflag=direct status=none 2> /dev/null
    then
      : > "$prefix.$d"; echo 1 > "$prefix.$d.rc"
    fi
  done
}

merge() {  # S sN
  local s=$1 n=$2 i status keep=()
  remove "$s" o "$n"
  i=${n#s}
  dm create --concise "$s.m,,209,,0 $sectors snapshot-merge $dmmaj:210 $dmmaj:$((i + 211)) \
${stores[$i]} ${chunks[$i]}"
  for i in "${live[@]}"; do [ "$i" = o ] || [ "$i" = "$n" ] || keep+=("$i"); done
  live=(m "${keep[@]}")
  merged "$s.m"
}

merged() {  # DEV: wait until its merge is done (only the metadata allocated) or failed
  local i status
  for ((i = 0; i < 100; i++)); do
    status=$(dm status "$1")
    status=${status#* * * }
    case $status in
      Invalid|"Merge failed") break ;;
      */*) [ "${status%%/*}" = "${status##* }" ] && break ;;
    esac
  done
}

lvmmerge() {  # S sN: LVM's merge: the snapshot suspended, the origin's table swapped for
  # snapshot-merge (which takes the snapshot's exceptions over), then the snapshot removed
  local s=$1 n=$2 i=${2#s} d keep=()
  dm suspend "$s.$n"
  dm suspend "$s.o"
  dm load "$s.o" --table "0 $sectors snapshot-merge $dmmaj:210 $dmmaj:$((i + 211)) \
${stores[$i]} ${chunks[$i]}"
  dm resume "$s.o"
  merged "$s.o"
}

run_ops() {  # S OUTDIR
  local n=0 at op a b c d e
  while read -r op a b c d e; do
    n=$((n + 1))
    printf -v at '%s/%03d' "$2" $n
    case $op in
      w) minor "$a"
         dd if="$in/data.bin" of="/dev/dm-$m" bs="$d" skip=$((e / d)) seek=$((b / d)) \
           count=$((c / d)) oflag=direct conv=notrunc status=none 2> /dev/null
         echo $? > "$at.rc" ;;
      status) dm status > "$at.status" ;;
      table) dm table > "$at.table" ;;
      dump) dump "$at" "${live[@]}" ;;
      cycle) dm suspend "$1.o"; dm resume "$1.o" ;;
      reload) remove "$1" "${live[@]}"; create "$1" "" 1; echo $? > "$at.rc" ;;
      merge) merge "$1" "$a"; dm status > "$at.status" ;;
      handover)  # a reload of sN with its reload chunk: the new table takes over
        i=${a#s}
        dm suspend "$1.$a" &&
        dm load "$1.$a" --table "0 $sectors snapshot $dmmaj:210 $dmmaj:$((i + 211)) \
${stores[$i]} ${reloads[$i]}" &&
        dm resume "$1.$a"
        echo $? > "$at.rc" ;;
      lvmmerge)
        lvmmerge "$1" "$a"
        dm status > "$at.status"
        remove "$1" "$a"
        keep=()
        for i in "${live[@]}"; do [ "$i" = "$a" ] || keep+=("$i"); done
        live=("${keep[@]}") ;;
    esac
  done < "$in/$1/ops"
}

# The refusals first, on a kernel nothing has used yet: after the scenarios below, 6.1.0-57
# has oopsed in the page allocator (list_del corruption in get_page_from_freelist) at the
# next dm-snapshot constructor that allocates (its kcopyd client), in the refusals of a
# boot of every fragment and of one of this fragment alone; eight rounds of the refusals
# alone in a fresh guest never did.
mkdir -p "$out/refuse"
truncate -s 256K /tmp/r.origin /tmp/r.cow
lo=$(losetup -f --show /tmp/r.origin)
lc=$(losetup -f --show /tmp/r.cow)
n=0
while read -r line; do
  n=$((n + 1))
  table=${line//ORIGIN/$lo}; table=${table//COW/$lc}
  echo "dm_formats refusal $n" > /dev/kmsg
  dm create refuse --table "0 512 $table" 2> /dev/null
  rc=$?
  echo $rc > "$out/refuse/$n.rc"
  if [ $rc = 0 ]; then
    dm table refuse > "$out/refuse/$n.out"
    dm remove refuse
  fi
done < "$in/refusals"
echo "dm_formats refusal end" > /dev/kmsg
losetup -d "$lo" "$lc"

for dir in "$in"/*/; do
  s=${dir%/}; s=${s##*/}
  o=$out/$s
  mkdir -p "$o/kernel"
  spec_of "$s"
  cp "$dir/init/disk.img" /tmp/disk.img
  loop=$(losetup -f --show /tmp/disk.img)
  pieces "$s" ""
  # The origin is live, not suspended, when the snapshots are loaded and resumed.
  create "$s" "" 0
  echo $? > "$o/create.rc"
  run_ops "$s" "$o"
  lcs=()
  for i in "${!names[@]}"; do lcs+=("lc$i"); done
  remove "$s" "${live[@]}" lo "${lcs[@]}"
  losetup -d "$loop"
  mv /tmp/disk.img "$o/kernel/disk.img"
  # minidisk's files, opened by the kernel (read-only: INPUT is).
  loop=$(losetup -f --show -r "$dir/host/disk.img")
  pieces "$s" ro
  create "$s" ro 0
  echo $? > "$o/host.rc"
  dm status > "$o/host.status"
  dm table > "$o/host.table"
  dump "$o/host" "${names[@]}"
  remove "$s" "${live[@]}" lo "${lcs[@]}"
  losetup -d "$loop"
done

dm targets > "$out/targets"
exit 0  # ran to the end: the rows say the rest

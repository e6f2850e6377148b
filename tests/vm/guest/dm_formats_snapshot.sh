# dm-snapshot's formats, kernel side (tests/vm/test_dm_formats.py; run by dm_formats.sh as
# `bash dm_formats_snapshot.sh INPUT OUTPUT`). INPUT has data.bin, refusals and one
# directory per scenario S with
#   spec        one line per snapshot: "sN <P|PO|N> <chunk> [<chunk on reload>]"
#   ops         one operation a line (below)
#   init/       origin.img and cowN.img: what the scenario starts from
#   host/       the same files after minidisk ran the scenario
# The kernel runs the scenario on copies of init/ (an origin S.o with snapshot-origin and
# snapshots S.sN over loop devices); OUTPUT/S gets NNN.* for every operation, kernel/ (its
# files afterwards) and host.* (minidisk's files, read-only, opened by the kernel).
#   w DEV OFF LEN BS DOFF  dd data.bin[DOFF, +LEN) to DEV (o, sN or m) at OFF, BS bytes a
#                          write, O_DIRECT: one request at a time, in order
#   status | table         dmsetup status | table of every device
#   dump                   every device read whole (DEV.NNN, or DEV.NNN.rc 1 if it fails)
#   cycle                  suspend and resume the origin (its split boundary is computed)
#   reload                 remove them all, create them again (sN with its reload chunk)
#   merge sN               remove the origin and sN, create S.m: snapshot-merge of sN's COW
#                          over the origin, and wait until it is done
# Processes are few on purpose (one concise create for all devices, minors chosen so that
# /dev/dm-N is known): each costs ~0.3 s under TCG on a busy host.
# Then OUTPUT/refuse/N.{rc,out} for the tables in INPUT/refusals (ORIGIN, COW and BAD, a
# store with a bad magic, stand for loop devices), with "dm_formats refusal N" written to
# the kernel log before each (the runner keeps the log), and OUTPUT/targets.
set -u
in=$1 out=$2
modprobe dm-snapshot || echo "modprobe dm-snapshot failed"
dm() { $DMSETUP "$@"; }

# Minors: the origin 0, snapshot N at N+1, the merge 9.
minor_of() { case $1 in o) echo 0 ;; m) echo 9 ;; s*) echo $((${1#s} + 1)) ;; esac; }

spec_of() {  # S: sets names, stores, chunks, reloads from S/spec
  names=() stores=() chunks=() reloads=()
  local n kind chunk reload
  while read -r n kind chunk reload; do
    names+=("$n") stores+=("$kind") chunks+=("$chunk") reloads+=("${reload:-$chunk}")
  done < "$in/$1/spec"
}

create() {  # S FLAGS RELOAD(0|1): the origin and every snapshot
  local s=$1 flags=$2 i spec chunk
  spec="$s.o,,0,$flags,0 $sectors snapshot-origin ${loops[0]}"
  for i in "${!names[@]}"; do
    chunk=${chunks[$i]}
    [ "$3" = 1 ] && chunk=${reloads[$i]}
    spec+=";$s.${names[$i]},,$(minor_of "${names[$i]}"),$flags,0 $sectors snapshot"
    spec+=" ${loops[0]} ${loops[$((i + 1))]} ${stores[$i]} $chunk"
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

dump() {  # S PREFIX: every live device
  local d
  for d in "${live[@]}"; do
    if ! dd if="/dev/dm-$(minor_of "$d")" of="$2.$d" bs=64k iflag=direct status=none \
        2> /dev/null; then
      : > "$2.$d"; echo 1 > "$2.$d.rc"
    fi
  done
}

merge() {  # S sN PREFIX
  local s=$1 n=$2 i status keep=()
  remove "$s" o "$n"
  for i in "${!names[@]}"; do [ "${names[$i]}" = "$n" ] && break; done
  dm create --concise "$s.m,,9,,0 $sectors snapshot-merge ${loops[0]} \
${loops[$((i + 1))]} ${stores[$i]} ${chunks[$i]}"
  for i in "${live[@]}"; do [ "$i" = o ] || [ "$i" = "$n" ] || keep+=("$i"); done
  live=(m "${keep[@]}")
  for ((i = 0; i < 100; i++)); do  # done when only the metadata is allocated
    status=$(dm status "$s.m")
    status=${status#* * * }
    case $status in
      Invalid|"Merge failed") break ;;
      */*) [ "${status%%/*}" = "${status##* }" ] && break ;;
    esac
  done
}

run_ops() {  # S OUTDIR
  local n=0 at op a b c d e
  while read -r op a b c d e; do
    n=$((n + 1))
    at=$2/$(printf %03d $n)
    case $op in
      w) dd if="$in/data.bin" of="/dev/dm-$(minor_of "$a")" bs="$d" skip=$((e / d)) \
           seek=$((b / d)) count=$((c / d)) oflag=direct conv=notrunc status=none \
           2> /dev/null
         echo $? > "$at.rc" ;;
      status) dm status > "$at.status" ;;
      table) dm table > "$at.table" ;;
      dump) dump "$1" "$at" ;;
      cycle) dm suspend "$1.o"; dm resume "$1.o" ;;
      reload) remove "$1" "${live[@]}"; create "$1" "" 1; echo $? > "$at.rc" ;;
      merge) merge "$1" "$a" "$at"; dm status > "$at.status" ;;
    esac
  done < "$in/$1/ops"
}

attach() {  # DIR [-r]: loops[] for origin.img, cow0.img...
  local i
  loops=("$(losetup -f --show ${2:-} "$1/origin.img")")
  for i in "${!names[@]}"; do loops+=("$(losetup -f --show ${2:-} "$1/cow$i.img")"); done
  sectors=$(blockdev --getsz "${loops[0]}")
}

for dir in "$in"/*/; do
  s=$(basename "$dir")
  o=$out/$s
  mkdir -p "$o" "/tmp/$s"
  spec_of "$s"
  cp "$dir"/init/*.img "/tmp/$s/"
  attach "/tmp/$s"
  # The origin is live, not suspended, when the snapshots are loaded and resumed.
  create "$s" "" 0
  echo $? > "$o/create.rc"
  run_ops "$s" "$o"
  remove "$s" "${live[@]}"
  losetup -d "${loops[@]}"
  mv "/tmp/$s" "$o/kernel"
  # minidisk's files, opened by the kernel (read-only: INPUT is).
  attach "$dir/host" -r
  create "$s" ro 0
  echo $? > "$o/host.rc"
  dm status > "$o/host.status"
  dm table > "$o/host.table"
  dump "$s" "$o/host"
  remove "$s" "${live[@]}"
  losetup -d "${loops[@]}"
done

mkdir -p "$out/refuse"
truncate -s 256K /tmp/r.origin /tmp/r.cow /tmp/r.bad
printf 'junkjunkjunkjunk' | dd of=/tmp/r.bad conv=notrunc status=none
lo=$(losetup -f --show /tmp/r.origin)
lc=$(losetup -f --show /tmp/r.cow)
lb=$(losetup -f --show /tmp/r.bad)
n=0
while read -r line; do
  n=$((n + 1))
  table=${line//ORIGIN/$lo}; table=${table//COW/$lc}; table=${table//BAD/$lb}
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
losetup -d "$lo" "$lc" "$lb"
dm targets > "$out/targets"

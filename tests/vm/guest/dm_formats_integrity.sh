# dm-integrity's format, kernel side (tests/vm/test_dm_formats.py; run by dm_formats.sh as
# `bash dm_formats_integrity.sh INPUT OUTPUT`). INPUT (tests/vm/dm_formats_integrity.py):
#   configs     "NAME TAG MODE N OPT..." per configuration: the table's arguments after
#               the device and offset
#   opens       "NAME OPTIONS..." integritysetup open's options for the same device
#   o/NAME.img  minidisk's file (formatted by the first-use procedure, written), and for
#               journal mode NAME.crash.img: as minidisk leaves it when killed after
#               committing a journal section and before writing its blocks back
#   f/NAME.img  o/NAME.img with one data byte flipped
#   data.bin    what both sides wrote: its first half at the start, its second at the end
#   libs        the libraries integritysetup loads (the host's ldd: its root is the guest's)
#   refusals    "LENGTH ARGS" tables 6.1 must refuse (DEV: a formatted device, BAD: data.bin,
#               neither formatted nor zero)
# OUTPUT gets, per configuration NAME:
#   NAME.k.*    the kernel's own first use of a zeroed file (create1.rc: the one-sector
#               load; dump: what integritysetup read provided_data_sectors from), then the
#               same writes as minidisk's; k/NAME.img, its file afterwards
#   NAME.o.*    minidisk's file opened with the same table: dump, the written regions read
#               back (NAME.o.regions); NAME.io.head, the first region through
#               integritysetup open
#   NAME.f.*    the flipped file: the first region read 4 KiB at a time with
#               conv=noerror,sync (failed blocks read as zeroes), dd's errors
#   NAME.c.head the first region of NAME.crash.img, its journal replayed by the kernel
# dmstatus and dmtable: every device's, once written and read; refuse/N.rc with
# "dm_formats integrity refusal N" in the kernel log before each; targets.
# Processes are few on purpose (~0.3 s each under TCG): one create for all devices, with
# minors chosen so that /dev/dm-N is known, one status, one table, one remove.
set -u
in=$1 out=$2
modprobe dm-integrity || echo "modprobe dm-integrity failed"
dm() { $DMSETUP "$@"; }
# integritysetup and its libraries on tmpfs, as dmsetup (each run from 9p is slow).
bin=/tmp/isbin
mkdir -p $bin /tmp/k $out/k
cp /sbin/integritysetup $(< $in/libs) $bin/
export DM_DISABLE_UDEV=1
isetup() { /tmp/dmbin/ld-linux-x86-64.so.2 --library-path $bin $bin/integritysetup "$@"; }
provided_of() {  # DUMPFILE: its provided_data_sectors, into $provided
  local key value
  while read -r key value; do
    [ "$key" = provided_data_sectors ] && provided=$value
  done < "$1"
}

names=() argses=() provideds=() loops=() olos=() crashes=() opens=()
while read -r name tag mode n opts; do
  names+=("$name") argses+=("$tag $mode $n $opts")
  : > /tmp/k/$name.img
done < $in/configs
while read -r name opts; do opens+=("$opts"); done < $in/opens
truncate -r $in/o/${names[0]}.img /tmp/k/*.img  # zeroes, as large as minidisk's
cp -r $in/o $in/f /tmp/
spec=""
for i in "${!names[@]}"; do
  name=${names[$i]} args=${argses[$i]}
  lk=$(losetup -f --show /tmp/k/$name.img)
  lo=$(losetup -f --show /tmp/o/$name.img)
  lf=$(losetup -f --show /tmp/f/$name.img)
  loops+=("$lk" "$lo" "$lf") olos+=("$lo")
  # The kernel's first use: load with one sector (it formats), unload (below, all at
  # once), read provided_data_sectors from the superblock, load with that size (below,
  # with the rest).
  dm create $name.k --table "0 1 integrity $lk 0 $args"; echo $? > $out/$name.k.create1.rc
  isetup dump $lk > $out/$name.k.dump
  isetup dump $lo > $out/$name.o.dump
  provided_of $out/$name.k.dump
  provideds+=("$provided")
  spec+="$name.k2,,$((10 + i)),,0 $provided integrity $lk 0 $args;"
  spec+="$name.o,,$((20 + i)),,0 $provided integrity $lo 0 $args;"
  spec+="$name.f,,$((30 + i)),,0 $provided integrity $lf 0 $args;"
  if [ -e $in/o/$name.crash.img ]; then
    lc=$(losetup -f --show /tmp/o/$name.crash.img)
    loops+=("$lc") crashes+=("$i")
    spec+="$name.c,,$((40 + i)),,0 $provided integrity $lc 0 $args;"
  fi
done
dm remove_all  # the one-sector devices (one of them, 4 KiB blocks, was refused)
dm create --concise "${spec%;}"
echo $? > $out/create.rc
for i in "${!names[@]}"; do
  name=${names[$i]} tail=$((${provideds[$i]} / 8 - 32))
  dd if=$in/data.bin of=/dev/dm-$((10 + i)) bs=4096 count=32 oflag=direct status=none
  dd if=$in/data.bin of=/dev/dm-$((10 + i)) bs=4096 skip=32 count=32 seek=$tail \
    oflag=direct status=none
  { dd if=/dev/dm-$((20 + i)) bs=4096 count=32 iflag=direct status=none
    dd if=/dev/dm-$((20 + i)) bs=4096 skip=$tail count=32 iflag=direct status=none
  } > $out/$name.o.regions
  # Not status=none: with noerror it would silence the errors too.
  dd if=/dev/dm-$((30 + i)) of=$out/$name.f.read bs=4096 count=32 iflag=direct \
    conv=noerror,sync 2> $out/$name.f.errors
done
for i in "${crashes[@]}"; do
  dd if=/dev/dm-$((40 + i)) of=$out/${names[$i]}.c.head bs=4096 count=32 iflag=direct \
    status=none
done
dm status > $out/dmstatus
dm table > $out/dmtable
dm remove_all
cp /tmp/k/*.img $out/k/
for i in "${!names[@]}"; do
  isetup open ${olos[$i]} ${names[$i]}.io ${opens[$i]}; echo $? > $out/${names[$i]}.io.rc
done
declare -A minor
while read -r name m; do minor[$name]=$m; done < <(dm info -c --noheadings -o name,minor \
  --separator ' ')
for name in "${names[@]}"; do
  dd if=/dev/dm-${minor[$name.io]} of=$out/$name.io.head bs=4096 count=32 iflag=direct \
    status=none
done
dm remove_all

mkdir -p $out/refuse
ld=${loops[0]}  # the first configuration's kernel file: formatted
lb=$(losetup -r -f --show $in/data.bin)
n=0
while read -r length line; do
  n=$((n + 1))
  table=${line//DEV/$ld}; table=${table//BAD/$lb}
  echo "dm_formats integrity refusal $n" > /dev/kmsg
  dm create refuse --table "0 $length $table" 2> /dev/null
  rc=$?
  echo $rc > $out/refuse/$n.rc
  [ $rc = 0 ] && dm remove refuse
done < $in/refusals
echo "dm_formats integrity refusal end" > /dev/kmsg
losetup -d "${loops[@]}" $lb
dm targets > $out/targets

# dm-crypt's formats, kernel side (tests/vm/test_dm_formats.py, tests/vm/dm_formats_crypt.py;
# run by dm_formats.sh as `bash dm_formats_crypt.sh INPUT OUTPUT`). INPUT has
#   data.bin      the plaintext
#   ours.img      data.bin as minidisk's crypt table wrote it
#   ours.table    that table, one crypt segment per cipher case, DEV for the device
#   wrong.table   the same with every key's first byte flipped
#   messages      operations on the first segment of `ours`: message ARGS, suspend,
#                 resume, table
# and OUTPUT gets ours.read (ours.img through 6.1's dm-crypt), kernel.img (data.bin written
# through the same table into a zeroed file), wrong.read (ours.img with the wrong keys),
# tables (dmsetup table --showkeys of ours) and messages (an exit status, or the table's
# first line, per operation). Three devices and a handful of processes for all the cases:
# each process costs ~0.3 s under TCG.
set -u
in=$1 out=$2
modprobe dm-crypt || echo "modprobe dm-crypt failed"
dm() { $DMSETUP "$@"; }

truncate -r "$in/ours.img" /tmp/crypt-kernel.img
lo=$(losetup -f --show -r "$in/ours.img")
lk=$(losetup -f --show /tmp/crypt-kernel.img)
table=$(< "$in/ours.table")
wrong=$(< "$in/wrong.table")
ours=${table//DEV/$lo} kern=${table//DEV/$lk} wrong=${wrong//DEV/$lo}
# dmsetup --concise: devices split by ';', a device's segments by ','.
dm create --concise "ours,,0,ro,${ours//$'\n'/,};kern,,1,,${kern//$'\n'/,};wrong,,2,ro,${wrong//$'\n'/,}"
echo "create $?"
dd if=/dev/dm-0 of="$out/ours.read" bs=16k iflag=direct status=none
dd if="$in/data.bin" of=/dev/dm-1 bs=16k oflag=direct status=none
echo "write $?"
dd if=/dev/dm-2 of="$out/wrong.read" bs=16k iflag=direct status=none
dm table --showkeys ours > "$out/tables"
while read -r what args; do
  case $what in
    message) dm message ours 0 $args 2> /dev/null; echo $? ;;
    suspend) dm suspend ours; echo $? ;;
    resume) dm resume ours 2> /dev/null; echo $? ;;
    table) dm table --showkeys ours | head -n 1 ;;
  esac
done < "$in/messages" > "$out/messages"
dm remove ours kern wrong
losetup -d "$lo" "$lk"
cp /tmp/crypt-kernel.img "$out/kernel.img"
dm targets > "$out/targets"

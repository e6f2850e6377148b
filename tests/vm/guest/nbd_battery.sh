# Kernel nbd rows for each attach method (netlink, ioctl): minidisk's server and client in the
# guest over unix sockets (rows METHOD.ours*), then Debian's nbd-client on the same exports
# (rows theirs*, netlink as nbd-client does by default) for comparison.
# Usage: bash nbd_battery.sh METHOD...   (rows in $RESULTS/rows; see tests/vm/test_kernel_nbd.py)
# One boot for all: Python starts slowly in a TCG guest, and serves slowly.
source "$(dirname "$0")/lib.sh"
# Not below /tmp: attach refuses a state directory that others can change.
export MINIDISK_STATE_DIR=/var/lib/minidisk-test
SOCK=/tmp/md.sock
RO_SOCK=/tmp/md-ro.sock
DK="nbd+unix:///dk?socket=$SOCK"
RO="nbd+unix:///ro?socket=$RO_SOCK"
THEIRS=/dev/nbd15  # nbd-client needs a device; ours are allocated from nbd0 up
NBD_CLIENT=(nbd-client)

modprobe nbd
head -c 1M /dev/urandom > /tmp/pattern
mkdir -p /tmp/mnt

# Python in a TCG guest starts in seconds: what does not depend on each other runs at once.
check serve "$MINIDISK" serve "unix://$SOCK" --memory /dk=128M --log-file "$RESULTS/serve.log" &
check serve_ro "$MINIDISK" serve "unix://$RO_SOCK" --read-only --memory /ro=32M \
  --log-file "$RESULTS/serve-ro.log" &
wait

# probe_rw PREFIX DEV: what a read-write device does below a file system.
probe_rw() {
  local p=$1 dev=$2
  queue "$p" "$dev"
  check "$p.dio512_write" dd if=/dev/urandom of="$dev" bs=512 count=1 seek=3 oflag=direct \
    conv=notrunc status=none
  check "$p.dio512_read" dd if="$dev" of=/dev/null bs=512 count=1 skip=3 iflag=direct status=none
  check "$p.write" dd if=/tmp/pattern of="$dev" bs=64k seek=64 oflag=direct conv=notrunc status=none
  check "$p.readback" sh -c "dd if=$dev bs=64k skip=64 count=16 iflag=direct status=none \
    | cmp - /tmp/pattern"
  requests "$p.requests" "$dev" sh -c "
    dd if=/dev/zero of=$dev bs=4k count=1 seek=300 oflag=direct,dsync conv=notrunc status=none &&
    dd if=/dev/zero of=$dev bs=4k count=1 seek=301 oflag=direct conv=notrunc,fsync status=none &&
    blkdiscard -f -o 2097152 -l 1048576 $dev"
}

# probe_fs PREFIX DEV: ext4 on the device, end to end.
probe_fs() {
  local p=$1 dev=$2
  check "$p.mkfs" mkfs.ext4 -q -F "$dev"
  check "$p.mount" mount "$dev" /tmp/mnt
  check "$p.fswrite" sh -c "cp /tmp/pattern /tmp/mnt/f && sync"
  check "$p.umount" umount /tmp/mnt
  check "$p.fsck" fsck.ext4 -f -n "$dev"
  check "$p.fsread" sh -c "mount -o ro $dev /tmp/mnt && cmp /tmp/mnt/f /tmp/pattern; rc=\$?;
    umount /tmp/mnt; exit \$rc"
}

# probe_ro PREFIX DEV: what a read-only device does.
probe_ro() {
  local p=$1 dev=$2
  queue "$p" "$dev"
  check "$p.read" dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none
  check "$p.write" dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct conv=notrunc status=none
  check "$p.discard" blkdiscard -f -o 0 -l 1048576 "$dev"
}

# ours PREFIX ATTACH-ARGS...: attach with minidisk; the device is in the row PREFIX.attach.out.
ours() {
  local p=$1; shift
  check "$p.attach" "$MINIDISK" attach --method "$METHOD" "$@" > /dev/null
}

# ours_done PREFIX: detach what `ours PREFIX` attached, and what is left of it after.
ours_done() {
  local p=$1 dev
  dev=$(cat "$RESULTS/rows/$p.attach.out")
  check "$p.detach" "$MINIDISK" detach "$dev"
  row "$p.pid_after_detach" "$(cat "/sys/block/${dev#/dev/}/pid" 2>/dev/null)"
}

# theirs PREFIX PROBE SOCKET NBD-CLIENT-ARGS...: attach with Debian's nbd-client, probe, detach.
theirs() {
  local p=$1 probe=$2 sock=$3; shift 3
  check "$p.attach" "${NBD_CLIENT[@]}" -u "$sock" "$THEIRS" "$@" || return
  "$probe" "$p" "$THEIRS"
  check "$p.detach" nbd-client -d "$THEIRS"
}

# battery METHOD: every row of minidisk attach --method METHOD.
battery() {
  local m=$1 p
  METHOD=$m
  ours "$m.ours" "$DK"
  probe_rw "$m.ours" "$(cat "$RESULTS/rows/$m.ours.attach.out")"
  probe_fs "$m.ours" "$(cat "$RESULTS/rows/$m.ours.attach.out")"
  ours "$m.ours_ro_flag" --read-only "$DK" &
  ours "$m.ours_ro_export" "$RO" &
  wait
  for p in "$m.ours_ro_flag" "$m.ours_ro_export"; do
    probe_ro "$p" "$(cat "$RESULTS/rows/$p.attach.out")"
  done
  check "$m.ours.list" "$MINIDISK" attach --list > /dev/null
  ours_done "$m.ours"
  ours_done "$m.ours_ro_flag" &
  ours_done "$m.ours_ro_export" &
  wait
  row "$m.state_after_detach" "$(ls "$MINIDISK_STATE_DIR/attach")"
}

for method in "$@"; do battery "$method"; done
theirs theirs probe_rw "$SOCK" -N dk
theirs theirs_ro_flag probe_ro "$SOCK" -N dk -readonly
theirs theirs_ro_export probe_ro "$RO_SOCK" -N ro
dmesg > "$RESULTS/dmesg"

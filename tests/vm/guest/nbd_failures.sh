# Kernel nbd when it gets hard: several connections, a server killed, a server that stops
# answering, each for minidisk attach and for Debian's nbd-client on the same kind of export.
# Rows go to $RESULTS/rows (see tests/vm/test_kernel_nbd_failures.py).
source "$(dirname "$0")/lib.sh"
# Not below /tmp: attach refuses a state directory that others can change.
export MINIDISK_STATE_DIR=/var/lib/minidisk-test
TIMEOUT=5  # attach --timeout / nbd-client -t, seconds

modprobe nbd
head -c 1M /dev/urandom > /tmp/pattern

# server NAME: a foreground server on /tmp/NAME.sock; its pid in /tmp/NAME.pid once it listens.
server() {
  "$MINIDISK" serve -s "unix:///tmp/$1.sock" --memory /dk=64M > "$RESULTS/$1.log" 2>&1 &
  echo $! > "/tmp/$1.pid"
  local i
  for i in $(seq 600); do [ -S "/tmp/$1.sock" ] && return; sleep 0.2; done
}
sockets_of() {  # the number of sockets process $1 holds
  ls -l "/proc/$1/fd" | grep -c 'socket:'
}
uri() { echo "nbd+unix:///dk?socket=/tmp/$1.sock"; }

for s in multi kill theirs_kill; do server "$s" & done
wait

# Several connections: the server sees them, data goes through them.
multi=$(cat /tmp/multi.pid)
for method in netlink ioctl; do
  p=multi_$method
  row "$p.sockets_before" "$(sockets_of "$multi")"
  dev=$(check "$p.attach" "$MINIDISK" attach --method "$method" --connections 2 "$(uri multi)")
  row "$p.sockets" "$(sockets_of "$multi")"
  check "$p.write" dd if=/tmp/pattern of="$dev" bs=64k seek=$((RANDOM % 256)) oflag=direct \
    conv=notrunc,fsync status=none
  check "$p.detach" "$MINIDISK" detach "$dev"
done
row multi_theirs.sockets_before "$(sockets_of "$multi")"
check multi_theirs.attach nbd-client -C 2 -u /tmp/multi.sock /dev/nbd15 -N dk
row multi_theirs.sockets "$(sockets_of "$multi")"
check multi_theirs.detach nbd-client -d /dev/nbd15

# A server killed: I/O fails at once; detach still works.
dev=$(check kill.attach "$MINIDISK" attach --method netlink --timeout $TIMEOUT "$(uri kill)")
check kill.read_before dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none
kill -KILL "$(cat /tmp/kill.pid)"
check kill.read_after dd if="$dev" of=/dev/null bs=4k count=1 skip=7 iflag=direct status=none
check kill.detach "$MINIDISK" detach "$dev"
check theirs_kill.attach nbd-client -t $TIMEOUT -u /tmp/theirs_kill.sock /dev/nbd15 -N dk
check theirs_kill.read_before dd if=/dev/nbd15 of=/dev/null bs=4k count=1 iflag=direct status=none
kill -KILL "$(cat /tmp/theirs_kill.pid)"
check theirs_kill.read_after dd if=/dev/nbd15 of=/dev/null bs=4k count=1 skip=7 iflag=direct \
  status=none
check theirs_kill.detach nbd-client -d /dev/nbd15

# A server that stops answering (the multi one, stopped and continued for each client): the
# request fails after the timeout instead of hanging (`timeout 120` only bounds the test: its
# exit status 124 would mean "hung").
dev=$(check stop.attach "$MINIDISK" attach --method netlink --timeout $TIMEOUT "$(uri multi)")
kill -STOP "$multi"
check stop.read timeout 120 dd if="$dev" of=/dev/null bs=4k count=1 skip=9 iflag=direct \
  status=none
check stop.detach "$MINIDISK" detach "$dev"
kill -CONT "$multi"
check theirs_stop.attach nbd-client -t $TIMEOUT -u /tmp/multi.sock /dev/nbd15 -N dk
kill -STOP "$multi"
check theirs_stop.read timeout 120 dd if=/dev/nbd15 of=/dev/null bs=4k count=1 skip=9 \
  iflag=direct status=none
check theirs_stop.detach nbd-client -d /dev/nbd15
kill -CONT "$multi"

# --persist: the server is killed and a new one started on the same socket (the old one's
# socket file left behind) while a file system is mounted and written; it must go on without
# an error. The same for Debian's nbd-client -persist (ioctl; its own reconnect loop).
truncate -s 64M /tmp/persist.img
file_server() {  # a server of /tmp/persist.img on /tmp/persist.sock
  "$MINIDISK" serve -s unix:///tmp/persist.sock --file /dk=/tmp/persist.img \
    >> "$RESULTS/persist-server.log" 2>&1 &
  echo $! > /tmp/persist.pid
  local i
  for i in $(seq 600); do
    nbdinfo --size "$(uri persist)" > /dev/null 2>&1 && return
    sleep 0.2
  done
}
# survive PREFIX DEV: mkfs, mount, write; kill the server; write while it is away; restart
# it; write again; every write must land and the file system stay clean.
survive() {
  local p=$1 dev=$2 writer
  check "$p.mkfs" mkfs.ext4 -q -F "$dev"
  mkdir -p /tmp/mnt-persist
  check "$p.mount" mount "$dev" /tmp/mnt-persist
  check "$p.before" dd if=/tmp/pattern of=/tmp/mnt-persist/before bs=64k conv=fsync status=none
  kill -KILL "$(cat /tmp/persist.pid)"
  sleep 1
  ( dd if=/tmp/pattern of=/tmp/mnt-persist/during bs=64k conv=fsync status=none \
      2> "$RESULTS/rows/$p.during.err"; echo $? > "$RESULTS/rows/$p.during.rc" ) &
  writer=$!
  sleep 3
  file_server
  timeout 120 tail --pid=$writer -f /dev/null
  check "$p.after" dd if=/tmp/pattern of=/tmp/mnt-persist/after bs=64k conv=fsync status=none
  echo 3 > /proc/sys/vm/drop_caches
  check "$p.readback" cmp /tmp/pattern /tmp/mnt-persist/during
  check "$p.umount" umount /tmp/mnt-persist
  check "$p.fsck" fsck.ext4 -f -n "$dev"
}
dmesg -C
file_server
dev=$(check persist.attach "$MINIDISK" attach --method netlink --persist --timeout $TIMEOUT \
  "$(uri persist)")
keeper=$(awk '/"pid"/ { gsub(/[^0-9]/, ""); print }' "$MINIDISK_STATE_DIR/attach/${dev#/dev/}.json")
survive persist "$dev"
dmesg > "$RESULTS/rows/persist.dmesg"
row persist.kernel_errors "$(dmesg | grep -ciE 'I/O error|EXT4-fs error')"
cp "$MINIDISK_STATE_DIR/attach/${dev#/dev/}.keeper.log" "$RESULTS/rows/persist.keeper_log"
check persist.detach "$MINIDISK" detach "$dev"
# Gone or a zombie (the guest's init need not reap orphans promptly): not running.
state=$(awk '{ print $3 }' "/proc/$keeper/stat" 2>/dev/null)
row persist.keeper_after "$([ -n "$state" ] && [ "$state" != Z ] && echo "running ($state)" || echo gone)"
dmesg -C
check persist_theirs.attach nbd-client -persist -t $TIMEOUT -u /tmp/persist.sock /dev/nbd15 -N dk
survive persist_theirs /dev/nbd15
dmesg > "$RESULTS/rows/persist_theirs.dmesg"
row persist_theirs.kernel_errors "$(dmesg | grep -ciE 'I/O error|EXT4-fs error')"
check persist_theirs.detach nbd-client -d /dev/nbd15
kill "$(cat /tmp/persist.pid)"
dmesg > "$RESULTS/dmesg"

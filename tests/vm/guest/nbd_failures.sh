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
dmesg > "$RESULTS/dmesg"

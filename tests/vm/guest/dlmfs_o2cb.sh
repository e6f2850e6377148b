# The kernel's own ocfs2_dlmfs for the dlmfs battery: a one-node o2cb cluster made with
# configfs writes alone (no ocfs2-tools), two dlmfs mounts (two lock owners), then
# dlmfs_battery.sh, whose observations land in $RESULTS/obs.
# Recipe and timings: research/real-kernel.md (heartbeat start ~10 s, each domain rmdir ~4 s).
source "$(dirname "$0")/lib.sh"
set -u
# step NAME CMD...: a set-up step that must work (its stderr kept in rows/setup.NAME.err).
# No timing per step: lib.sh's `check` costs three more execs, seconds in a loaded TCG guest.
step() {
  "${@:2}" > /dev/null 2> "$RESULTS/rows/setup.$1.err" ||
    { echo "setup step $1 failed: $(< "$RESULTS/rows/setup.$1.err")"; exit 97; }
}
started=$EPOCHREALTIME

ip link set lo up
step modprobe modprobe -a configfs ocfs2_nodemanager ocfs2_dlm ocfs2_stack_o2cb ocfs2_dlmfs loop
mountpoint -q /sys/kernel/config || step configfs mount -t configfs none /sys/kernel/config
C=/sys/kernel/config/cluster/minidisk
N=$C/node/$(uname -n)
step cluster mkdir "$C"
step node mkdir "$N"
# The address and port before `num` (EINVAL otherwise); `local` starts the o2net listener.
echo 127.0.0.1 > "$N/ipv4_address" && echo 7777 > "$N/ipv4_port" &&
  echo 0 > "$N/num" && echo 1 > "$N/local" || { echo "setup step node failed"; exit 97; }
# Local heartbeat on a 1 MiB loop file; `dev` takes a descriptor this shell holds, and the
# write returns once the heartbeat is steady.
truncate -s 1M /tmp/heartbeat
LOOP=$(losetup -f --show /tmp/heartbeat)
R=$C/heartbeat/0123456789ABCDEF0123456789ABCDEF
step region mkdir "$R"
echo "$(blockdev --getss "$LOOP")" > "$R/block_bytes" && echo 1 > "$R/start_block" &&
  echo 255 > "$R/blocks" || { echo "setup step region geometry failed"; exit 97; }
exec 5<> "$LOOP"
echo 5 > "$R/dev" || { echo "setup step heartbeat failed"; exit 97; }
mkdir -p /tmp/dlm/a /tmp/dlm/b
step mount_a mount -t ocfs2_dlmfs none /tmp/dlm/a
step mount_b mount -t ocfs2_dlmfs none /tmp/dlm/b
row setup.seconds "$(awk "BEGIN { print $EPOCHREALTIME - $started }")"
started=$EPOCHREALTIME
bash "$(dirname "$0")/dlmfs_battery.sh" /tmp/dlm/a /tmp/dlm/b "$RESULTS/obs"
row battery.seconds "$(awk "BEGIN { print $EPOCHREALTIME - $started }")"
umount /tmp/dlm/a /tmp/dlm/b

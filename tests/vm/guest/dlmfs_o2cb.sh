# The kernel's own ocfs2_dlmfs for the dlmfs battery: a one-node o2cb cluster made with
# configfs writes alone (no ocfs2-tools), two dlmfs mounts (two lock owners), then
# dlmfs_battery.sh, whose observations land in $RESULTS/obs.
# Recipe and timings: research/real-kernel.md (heartbeat start ~10 s, each domain rmdir ~4 s).
source "$(dirname "$0")/lib.sh"
set -u
step() { check "setup.$1" "${@:2}" > /dev/null || { echo "setup step $1 failed"; exit 97; }; }

ip link set lo up
for m in configfs ocfs2_nodemanager ocfs2_dlm ocfs2_stack_o2cb ocfs2_dlmfs loop; do
  step "modprobe.$m" modprobe "$m"
done
mountpoint -q /sys/kernel/config || step configfs mount -t configfs none /sys/kernel/config
C=/sys/kernel/config/cluster/minidisk
N=$C/node/$(uname -n)
step cluster mkdir "$C"
step node mkdir "$N"
# The address and port before `num` (EINVAL otherwise); `local` starts the o2net listener.
step address sh -c "echo 127.0.0.1 > $N/ipv4_address && echo 7777 > $N/ipv4_port"
step num sh -c "echo 0 > $N/num && echo 1 > $N/local"
# Local heartbeat on a 1 MiB loop file; `dev` takes a descriptor this shell holds, and the
# write returns once the heartbeat is steady.
truncate -s 1M /tmp/heartbeat
LOOP=$(losetup -f --show /tmp/heartbeat)
R=$C/heartbeat/0123456789ABCDEF0123456789ABCDEF
step region mkdir "$R"
step region_geometry sh -c "echo $(blockdev --getss "$LOOP") > $R/block_bytes &&
  echo 1 > $R/start_block && echo 255 > $R/blocks"
exec 5<> "$LOOP"
step heartbeat sh -c "echo 5 > $R/dev"
mkdir -p /tmp/dlm/a /tmp/dlm/b
step mount_a mount -t ocfs2_dlmfs none /tmp/dlm/a
step mount_b mount -t ocfs2_dlmfs none /tmp/dlm/b
start=$(date +%s)
bash "$(dirname "$0")/dlmfs_battery.sh" /tmp/dlm/a /tmp/dlm/b "$RESULTS/obs"
row battery.seconds $(($(date +%s) - start))
umount /tmp/dlm/a /tmp/dlm/b

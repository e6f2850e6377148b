# The dmsetup battery (dmsetup_battery.sh) with the real dmsetup against 6.1's device-mapper,
# on two loop devices; the steps come back as $RESULTS/kernel.tar (kernel/NNN-NAME.*), and
# kernel/env says what the host side normalizes (the loop devices' numbers, dm's major).
# No udev in the guest: /dev/mapper nodes come from `dmsetup mknodes` after the steps that
# add or remove devices, and --noudevsync stops dmsetup waiting for udev.
here=$(dirname "$0")
# Every target module minidisk also has, loaded up front and in this order, so that
# `dmsetup targets` lists the same set at every step (the kernel lists what is loaded,
# most recently registered first).
for m in dm-mod dm-integrity dm-crypt dm-thin-pool dm-snapshot dm-zero dm-delay dm-flakey \
    dm-log-writes loop; do
  modprobe "$m" || echo "modprobe $m failed"
done
for i in 0 1; do
  truncate -s 8M "/tmp/disk$i"
  losetup "/dev/loop$i" "/tmp/disk$i" || echo "losetup loop$i failed"
done
source "$here/dmbin.sh"
read -r -a dmsetup <<< "$DMBIN"
out=/tmp/kernel  # on tmpfs too; one tar to $RESULTS at the end
mkdir -p $out
dmmaj=$(awk '$2 == "device-mapper" { print $1 }' /proc/devices)
{
  echo "DMMAJ=$dmmaj"
  for i in 0 1; do
    echo "DISK$i=/dev/loop$i $(printf '%d:%d' "0x$(stat -c %t /dev/loop$i)" "0x$(stat -c %T /dev/loop$i)")"
  done
  echo "KERNEL=$(uname -r)"
} > $out/env
# The battery's I/O, as single requests: O_DIRECT, one bio per dd block.
cat > /tmp/io <<'EOF2'
#!/bin/sh
dd if="/dev/mapper/$1" of=/dev/null bs=4096 count=4 iflag=direct
dd if=/dev/zero of="/dev/mapper/$1" bs=4096 seek=16 count=2 oflag=direct
EOF2
chmod +x /tmp/io
start=$(date +%s.%N)
DMSETUP="${dmsetup[*]} --noudevsync" DISK0=/dev/loop0 DISK1=/dev/loop1 DMMAJ=$dmmaj \
  NODES="${dmsetup[*]} mknodes" IO=/tmp/io bash "$here/dmsetup_battery.sh" $out
end=$(date +%s.%N)
awk "BEGIN { print $end - $start }" > $out/seconds
dmesg > $out/dmesg
tar -C /tmp -cf "$RESULTS/kernel.tar" kernel

#!/bin/busybox sh
# /init of dvmm's stock-kernel test initramfs (busybox + this script + a parallel
# user-mode program). Prints what the tests look for, then powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "dvmm-init: nproc=$(nproc)"
echo "dvmm-init: $(grep MemTotal /proc/meminfo)"
echo "dvmm-init: numa nodes=$(cat /sys/devices/system/node/online 2>/dev/null || echo none)"
for n in /sys/devices/system/node/node*; do
  [ -d "$n" ] || continue
  echo "dvmm-init: $(basename $n) cpus=$(cat $n/cpulist) $(grep MemTotal $n/meminfo | tr -s ' ')"
done
echo "dvmm-init: clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
if /bin/parallel; then
  echo "dvmm-init: parallel ok"
else
  echo "dvmm-init: parallel FAILED"
fi
if grep -qw dvmm.shell /proc/cmdline; then
  echo "dvmm-init: starting a shell (exit to power off)"
  setsid cttyhack sh
fi
echo "dvmm-init: powering off"
poweroff -f

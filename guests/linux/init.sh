#!/bin/busybox sh
# /init of dvmm's Linux test initramfs (busybox + this script + smp-check). Prints what
# the tests look for, then powers off. Kernel command-line words it reads:
#   dvmm.iters=N   iterations of smp-check's tests (default 2000)
#   dvmm.shell     start an interactive shell on the console before powering off
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "dvmm-init: kernel $(uname -r)"
echo "dvmm-init: nproc=$(nproc)"
echo "dvmm-init: $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "dvmm-init: numa nodes=$(cat /sys/devices/system/node/online 2>/dev/null || echo none)"
for n in /sys/devices/system/node/node*; do
  [ -d "$n" ] || continue
  echo "dvmm-init: $(basename "$n") cpus=$(cat "$n/cpulist") $(grep -E 'MemTotal|MemFree' "$n/meminfo" | sed 's/.*\(Mem[A-Za-z]*:\)/\1/' | tr -s ' ' | tr '\n' ' ') distance=$(cat "$n/distance" | tr ' ' ,)"
done
echo "dvmm-init: clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
iters=2000
for w in $(cat /proc/cmdline); do
  case "$w" in dvmm.iters=*) iters=${w#dvmm.iters=} ;; esac
done
if /bin/smp-check "$iters"; then
  echo "dvmm-init: smp-check ok"
else
  echo "dvmm-init: smp-check FAILED"
fi
if grep -qw dvmm.shell /proc/cmdline; then
  echo "dvmm-init: starting a shell (exit to power off)"
  setsid cttyhack sh
fi
echo "dvmm-init: powering off"
poweroff -f

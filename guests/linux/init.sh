#!/bin/busybox sh
# /init of dvmm's Linux test initramfs (busybox + this script + smp-check). Prints what
# the tests look for, then powers off. Kernel command-line words it reads:
#   dvmm.iters=N   iterations of smp-check's tests (default 2000)
#   dvmm.shell     start an interactive shell on the console before powering off
#   dvmm.disk_cpu=N  do the disk check below pinned to CPU N
# With a virtio disk (/dev/vda, ext4) it mounts it, prints the SHA-256 of /host.bin (what
# the host wrote), writes 256 KiB of random bytes to /guest.bin, prints their SHA-256 and
# unmounts (the host then checks the file in the image); read-only disks are only read.
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
disk_cpu=
for w in $(cat /proc/cmdline); do
  case "$w" in dvmm.disk_cpu=*) disk_cpu=${w#dvmm.disk_cpu=} ;; esac
done
if [ -b /dev/vda ]; then
  if [ -n "$disk_cpu" ]; then
    taskset -p -c "$disk_cpu" $$ >/dev/null && echo "dvmm-init: disk check on cpu $disk_cpu"
  fi
  ro=$(cat /sys/block/vda/ro)
  echo "dvmm-init: disk vda sectors=$(cat /sys/block/vda/size) ro=$ro"
  mkdir -p /mnt
  opts=rw
  [ "$ro" = 1 ] && opts=ro
  if mount -t ext4 -o "$opts" /dev/vda /mnt; then
    [ -f /mnt/host.bin ] && echo "dvmm-init: disk host.bin sha256=$(sha256sum /mnt/host.bin | cut -d' ' -f1)"
    if [ "$ro" = 0 ]; then
      dd if=/dev/urandom of=/mnt/guest.bin bs=65536 count=4 2>/dev/null
      echo "dvmm-init: disk guest.bin sha256=$(sha256sum /mnt/guest.bin | cut -d' ' -f1)"
    elif touch /mnt/written 2>/dev/null; then
      echo "dvmm-init: disk read-only but writable: FAILED"
    fi
    umount /mnt && echo "dvmm-init: disk unmounted"
  else
    echo "dvmm-init: disk mount FAILED"
  fi
fi
if grep -qw dvmm.shell /proc/cmdline; then
  echo "dvmm-init: starting a shell (exit to power off)"
  setsid cttyhack sh
fi
echo "dvmm-init: powering off"
poweroff -f

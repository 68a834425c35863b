#!/bin/busybox sh
# /init of dvmm's Linux test initramfs (busybox + this script + smp-check, io-bench,
# tcp-xfer). Prints what
# the tests look for, then powers off. Kernel command-line words it reads:
#   dvmm.iters=N   iterations of smp-check's tests (default 2000)
#   dvmm.shell     start an interactive shell on the console before powering off
#   dvmm.io_cpu=N  do the device checks below (disk, rng, hvc0, net) pinned to CPU N
#   dvmm.hvc_read  after the greeting on /dev/hvc0, read one line from it and print it
#   dvmm.net=GUEST_IP,PEER_IP:PORT,BYTES  configure eth0 as GUEST_IP/24, send BYTES (at
#                  most ~6 MiB) of this initramfs's programs to PEER_IP:PORT over TCP, keep what the peer sends back
#   dvmm.bench=MIB,SECONDS  instead of the disk check: io-bench on /dev/vda (a scratch
#                  disk: it is overwritten), MIB MiB sequential, SECONDS of 4 KiB reads
#   dvmm.netbench=GUEST_IP,PEER_IP:PORT,MIB  send MIB MiB of zeros to the peer, then
#                  take what it sends on a second connection (the peer times both)
# With a virtio disk (/dev/vda, ext4) it mounts it, prints the SHA-256 of /host.bin (what
# the host wrote), writes 256 KiB of random bytes to /guest.bin, prints their SHA-256 and
# unmounts (the host then checks the file in the image); read-only disks are only read.
# It also counts the kernel's warnings about PCI, virtio, MSI and ACPI ("pci warnings=N").
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "dvmm-init: kernel $(uname -r)"
echo "dvmm-init: nproc=$(nproc)"
echo "dvmm-init: $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "dvmm-init: $(grep DirectMap /proc/meminfo | tr -s " " | tr "\n" " ")"
echo "dvmm-init: numa nodes=$(cat /sys/devices/system/node/online 2>/dev/null || echo none)"
for n in /sys/devices/system/node/node*; do
  [ -d "$n" ] || continue
  echo "dvmm-init: $(basename "$n") cpus=$(cat "$n/cpulist") $(grep -E 'MemTotal|MemFree' "$n/meminfo" | sed 's/.*\(Mem[A-Za-z]*:\)/\1/' | tr -s ' ' | tr '\n' ' ') distance=$(cat "$n/distance" | tr ' ' ,)"
done
echo "dvmm-init: clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# What the kernel said about the PCI bus and its devices at warning level or worse
# (`dmesg -r` keeps the "<level>" prefix: 0-4 are emergency .. warning).
kwarn() { dmesg -r | grep -E '^<[0-4]>' | grep -iE 'pci|virtio|msi|acpi'; }
echo "dvmm-init: kernel warnings=$(dmesg -r | grep -cE '^<[0-4]>')"
echo "dvmm-init: pci warnings=$(kwarn | grep -c .)"
kwarn | sed 's/^/dvmm-init: pci warning: /'
iters=2000
for w in $(cat /proc/cmdline); do
  case "$w" in dvmm.iters=*) iters=${w#dvmm.iters=} ;; esac
done
if /bin/smp-check "$iters"; then
  echo "dvmm-init: smp-check ok"
else
  echo "dvmm-init: smp-check FAILED"
fi
io_cpu=
for w in $(cat /proc/cmdline); do
  case "$w" in dvmm.io_cpu=*) io_cpu=${w#dvmm.io_cpu=} ;; esac
done
if [ -n "$io_cpu" ]; then
  taskset -p -c "$io_cpu" $$ >/dev/null && echo "dvmm-init: device checks on cpu $io_cpu"
fi
bench=
netbench=
for w in $(cat /proc/cmdline); do
  case "$w" in
    dvmm.bench=*) bench=${w#dvmm.bench=} ;;
    dvmm.netbench=*) netbench=${w#dvmm.netbench=} ;;
  esac
done
if [ -n "$bench" ] && [ -b /dev/vda ]; then
  /bin/io-bench /dev/vda "${bench%,*}" "${bench#*,}" || echo "dvmm-init: io-bench FAILED"
elif [ -b /dev/vda ]; then
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
if [ -e /sys/class/misc/hw_random/rng_current ]; then
  echo "dvmm-init: rng current=$(cat /sys/class/misc/hw_random/rng_current) bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
fi
if [ -c /dev/hvc0 ]; then
  exec 3<>/dev/hvc0
  stty -F /dev/hvc0 -echo 2>/dev/null
  echo "dvmm-init: hello on hvc0" >&3
  echo "dvmm-init: hvc0 greeted"
  if grep -qw dvmm.hvc_read /proc/cmdline; then
    if read -t 300 line <&3; then
      echo "dvmm-init: hvc0 read: $line"
    else
      echo "dvmm-init: hvc0 read nothing"
    fi
  fi
  exec 3<&-
fi
net=
for w in $(cat /proc/cmdline); do
  case "$w" in dvmm.net=*) net=${w#dvmm.net=} ;; esac
done
if [ -n "$net" ]; then
  ip=${net%%,*}; rest=${net#*,}; peer=${rest%%,*}; bytes=${rest#*,}
  echo "dvmm-init: net eth0 mac=$(cat /sys/class/net/eth0/address 2>/dev/null)"
  ifconfig eth0 "$ip" netmask 255.255.255.0 up
  # Varied bytes without the emulated kernel's urandom: the programs in this initramfs.
  cat /bin/busybox /bin/smp-check /bin/io-bench /bin/tcp-xfer /bin/busybox | head -c "$bytes" > /tmp/tx
  echo "dvmm-init: net sending $(wc -c < /tmp/tx) bytes sha256=$(sha256sum /tmp/tx | cut -d' ' -f1)"
  if tcp-xfer "${peer%:*}" "${peer#*:}" < /tmp/tx > /tmp/rx; then
    echo "dvmm-init: net received $(wc -c < /tmp/rx) bytes sha256=$(sha256sum /tmp/rx | cut -d' ' -f1)"
  else
    echo "dvmm-init: net tcp-xfer FAILED"
    # What the host's and the guest's sides need to tell a lost frame from a lost
    # interrupt: the card's counters, its interrupts per CPU, the neighbour table.
    grep eth0 /proc/net/dev
    grep virtio /proc/interrupts
    ip neigh
  fi
fi
if [ -n "$netbench" ]; then
  ip=${netbench%%,*}; rest=${netbench#*,}; peer=${rest%%,*}; mib=${rest#*,}
  ifconfig eth0 "$ip" netmask 255.255.255.0 up
  tcp-xfer "${peer%:*}" "${peer#*:}" $((mib << 20)) > /dev/null
  tcp-xfer "${peer%:*}" "${peer#*:}" < /dev/null > /dev/null
  echo "dvmm-init: netbench done"
fi
if grep -qw dvmm.shell /proc/cmdline; then
  echo "dvmm-init: starting a shell (exit to power off)"
  setsid cttyhack sh
fi
echo "dvmm-init: powering off"
poweroff -f

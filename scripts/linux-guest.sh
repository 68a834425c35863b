#!/usr/bin/env bash
# Fetches Debian's stock kernel and builds our small initramfs, from the package
# registry only: the package linux-image-amd64 depends on (apt-get download, unpacked,
# its bzImage used as is) and busybox-static, plus guests/linux/{init.sh,parallel.c}.
# Prints the kernel and initramfs paths. Usage: scripts/linux-guest.sh [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-guest-images}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

kernel=$(ls "$out"/vmlinuz-* 2>/dev/null | head -n1 || true)
if [ -z "$kernel" ]; then
  [ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ] || apt-get update -qq
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  (cd "$work" && apt-get download -qq "$pkg" 2>/dev/null && dpkg-deb -x "$pkg"_*.deb k)
  cp "$work"/k/boot/vmlinuz-* "$out"/
  kernel=$(ls "$out"/vmlinuz-* | head -n1)
fi

initrd="$out/initramfs.cpio"
if [ ! -f "$initrd" ] || [ guests/linux/init.sh -nt "$initrd" ] || [ guests/linux/parallel.c -nt "$initrd" ]; then
  (cd "$work" && apt-get download -qq busybox-static 2>/dev/null && dpkg-deb -x busybox-static_*.deb bb)
  root="$work/root"
  mkdir -p "$root/bin"
  cp "$work/bb/bin/busybox" "$root/bin/busybox"
  install -m 755 guests/linux/init.sh "$root/init"
  gcc -O2 -static -pthread -o "$root/bin/parallel" guests/linux/parallel.c
  (cd "$root" && find . | cpio -o -H newc --quiet) > "$initrd"
fi
echo "$kernel"
echo "$initrd"

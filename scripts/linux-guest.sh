#!/usr/bin/env bash
# Fetches Debian's stock kernel and builds dvmm's Linux test initramfs, from the package
# registry only: the package linux-image-amd64 depends on (apt-get download, unpacked,
# its bzImage used as is, with its System.map for the profiler) and busybox-static, plus
# guests/linux/{init.sh,smp-check.c,io-bench.c,tcp-xfer.c}. Prints three paths: kernel, initramfs, System.map.
#   scripts/linux-guest.sh [outdir]      (default: ${XDG_CACHE_HOME:-~/.cache}/dvmm/debian)
#   scripts/linux-guest.sh --initramfs-only [outdir]   (prints the initramfs path)
#   DVMM_DEBIAN_SYMBOLS=1 scripts/linux-guest.sh   (the real System.map, from the -dbg package)
set -euo pipefail
cd "$(dirname "$0")/.."
only_initramfs=0
if [ "${1:-}" = --initramfs-only ]; then only_initramfs=1; shift; fi
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dvmm/debian}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# One at a time per output directory (tests call this in parallel): the others wait for
# the files the first one makes.
exec 9>"$out/.lock"
flock 9
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt_ready() { [ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ] || apt-get update -qq >&2; }

if [ $only_initramfs = 0 ]; then
  kernel=$(ls "$out"/vmlinuz-* 2>/dev/null | head -n1 || true)
  if [ -z "$kernel" ] || [ ! -f "$out/System.map" ]; then
    apt_ready
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    (cd "$work" && apt-get download -qq "$pkg" >&2 && dpkg-deb -x "$pkg"_*.deb k)
    cp "$work"/k/boot/vmlinuz-* "$out"/
    cp "$work"/k/boot/System.map-* "$out/System.map"
    kernel=$(ls "$out"/vmlinuz-* | head -n1)
  fi
  # The package's System.map is a one-line placeholder; with DVMM_DEBIAN_SYMBOLS=1 the
  # real one comes from the -dbg package (~860 MB download, once) for the profiler.
  if [ "${DVMM_DEBIAN_SYMBOLS:-0}" = 1 ] && [ "$(wc -l < "$out/System.map")" -lt 2 ]; then
    apt_ready
    ver=$(basename "$kernel" | sed 's/^vmlinuz-//')
    # tar stops after the one file: dpkg-deb then dies of SIGPIPE, which is expected.
    (cd "$work" && apt-get download -qq "linux-image-$ver-dbg" >&2 \
      && { dpkg-deb --fsys-tarfile linux-image-"$ver"-dbg_*.deb 2>/dev/null || true; } \
         | tar -x --occurrence=1 "./usr/lib/debug/boot/System.map-$ver")
    cp "$work/usr/lib/debug/boot/System.map-$ver" "$out/System.map"
  fi
fi

initrd="$out/initramfs.cpio"
if [ ! -f "$initrd" ] || [ guests/linux/init.sh -nt "$initrd" ] || [ guests/linux/smp-check.c -nt "$initrd" ] \
   || [ guests/linux/io-bench.c -nt "$initrd" ] || [ guests/linux/tcp-xfer.c -nt "$initrd" ] \
   || [ "$0" -nt "$initrd" ]; then
  command -v cpio >/dev/null || { apt_ready; apt-get install -y -qq cpio >&2; }
  if [ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static; then
    mkdir -p "$work/bb/bin" && cp /bin/busybox "$work/bb/bin/busybox"
  else
    apt_ready
    (cd "$work" && apt-get download -qq busybox-static >&2 && dpkg-deb -x busybox-static_*.deb bb)
  fi
  root="$work/root"
  mkdir -p "$root/bin"
  cp "$work/bb/bin/busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh"       # for rdinit=/bin/sh
  install -m 755 guests/linux/init.sh "$root/init"
  gcc -O2 -static -pthread -o "$root/bin/smp-check" guests/linux/smp-check.c
  gcc -O2 -static -o "$root/bin/io-bench" guests/linux/io-bench.c
  gcc -O2 -static -o "$root/bin/tcp-xfer" guests/linux/tcp-xfer.c
  (cd "$root" && find . | cpio -o -H newc --quiet) > "$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
fi
if [ $only_initramfs = 1 ]; then
  echo "$initrd"
else
  echo "$kernel"
  echo "$initrd"
  echo "$out/System.map"
fi

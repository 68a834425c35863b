#!/usr/bin/env bash
# Side by side, in one run: how far Debian's stock kernel gets in a fixed time under
# dvmm and under QEMU with its userspace interrupt controllers
# (qemu-system-x86_64 -enable-kvm -M pc,kernel-irqchip=off), and the last console line
# each printed. Usage: scripts/stock-kernel-compare.sh [seconds] [cpus]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-180}
cpus=${2:-1}
work=${DVMM_GUEST_DIR:-guest-images}
mkdir -p "$work"
kernel=$(ls "$work"/vmlinuz-* 2>/dev/null | head -n1 || true)
if [ -z "$kernel" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  (cd "$work" && apt-get download "$pkg" >/dev/null && dpkg-deb -x "$pkg"_*.deb deb && cp deb/boot/vmlinuz-* .)
  kernel=$(ls "$work"/vmlinuz-* | head -n1)
fi
command -v qemu-system-x86_64 >/dev/null || { echo "needs qemu-system-x86 (apt-get install qemu-system-x86)" >&2; exit 1; }
cargo build --release -q
cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8"

run_one() { # name, command...
  local name=$1; shift
  local out="$work/compare-$name.log"
  local t0=$(date +%s.%N)
  timeout "$secs" "$@" >"$out" 2>&1 </dev/null || true
  local t1=$(date +%s.%N)
  local last=$(tr -d '\r' <"$out" | grep -v '^\s*$' | grep -v 'dvmm_vmm\|INFO\|qemu-system' | tail -n1)
  printf '%-6s %6.1f s  %5d lines  last: %s\n' "$name" "$(echo "$t1 - $t0" | bc)" \
    "$(grep -c . "$out" || true)" "$last"
}

echo "kernel: $kernel, $cpus vCPU(s), ${secs}s each, host: $(nproc) CPUs"
run_one dvmm ./target/release/dvmm run --kernel "$kernel" --cpus "$cpus" --memory 1G --cmdline "$cmdline"
run_one qemu qemu-system-x86_64 -enable-kvm -M pc,kernel-irqchip=off -smp "$cpus" -m 1G \
  -nographic -no-reboot -kernel "$kernel" -append "$cmdline"

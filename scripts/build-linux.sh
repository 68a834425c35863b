#!/usr/bin/env bash
# Builds dvmm's small guest kernel, unmodified, from Debian's linux-source-6.1 package:
# `make tinyconfig`, then guests/linux/kernel.config merged on top. The result is cached
# outside the checkout, keyed by the source package version and the config fragment, so
# a cache hit costs nothing and any change rebuilds.
#
#   scripts/build-linux.sh [cache-dir]     # prints the path of the bzImage
#
# Needs: apt (for linux-source-6.1), gcc, make, flex, bison, bc, libelf-dev. ~3-8 min on
# 2 cores. The cache defaults to ${XDG_CACHE_HOME:-~/.cache}/dvmm/linux.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/dvmm/linux}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# One build at a time per cache (tests call this in parallel): the others wait, then hit.
exec 9>"$cache/.lock"
flock 9

export DEBIAN_FRONTEND=noninteractive
need=()
for p in flex bison bc make gcc; do command -v "$p" >/dev/null || need+=("$p"); done
[ -e /usr/include/libelf.h ] || need+=(libelf-dev)
[ -e /usr/src/linux-source-6.1.tar.xz ] || need+=(linux-source-6.1)
if [ ${#need[@]} -gt 0 ]; then
  [ -n "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ] || apt-get update -qq >&2
  apt-get install -y -qq "${need[@]}" >&2
fi
tarball=/usr/src/linux-source-6.1.tar.xz
version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %Y "$tarball")
key=$( (echo "$version"; cat guests/linux/kernel.config) | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -f "$out/bzImage" ]; then
  echo "$out/bzImage"
  exit 0
fi

work="$cache/build-$key"
rm -rf "$work"
mkdir -p "$work"
echo "build-linux: building linux-source-6.1 $version with guests/linux/kernel.config in $work" >&2
tar -C "$work" -xf "$tarball"
src="$work/linux-source-6.1"
(
  cd "$src"
  make -s tinyconfig
  ./scripts/kconfig/merge_config.sh -m .config "$repo/guests/linux/kernel.config" >/dev/null
  make -s olddefconfig
  # Every option of the fragment must have survived (a typo or a missing dependency
  # would silently build another kernel).
  missing=$(grep -E '^CONFIG_[A-Z0-9_]+=' "$repo/guests/linux/kernel.config" | while read -r line; do
    grep -qxF "$line" .config || echo "$line"
  done)
  if [ -n "$missing" ]; then
    echo "build-linux: options that did not make it into .config:" >&2
    echo "$missing" >&2
    exit 1
  fi
  make -s -j"$(nproc)" bzImage
) >&2
mkdir -p "$out.tmp"
cp "$src/arch/x86/boot/bzImage" "$src/System.map" "$src/.config" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "$out/bzImage"

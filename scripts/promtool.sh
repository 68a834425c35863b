#!/usr/bin/env bash
# Prints the path of a `promtool` (Prometheus' metrics checker, for tests/api.rs): the
# one on PATH, else one unpacked from Debian's `prometheus` package into a cache outside
# the checkout (~20 MB download, once; nothing is installed or started).
set -euo pipefail
if command -v promtool >/dev/null; then command -v promtool; exit 0; fi
cache=${DVMM_CACHE:-$HOME/.cache/dvmm}/promtool
if [ ! -x "$cache/promtool" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1 \
     && dpkg-deb -x prometheus_*.deb x) \
    || { echo "cannot fetch Debian's prometheus package (apt-get download prometheus)" >&2; exit 1; }
  mkdir -p "$cache"
  cp "$tmp/x/usr/bin/promtool" "$cache/promtool.tmp"
  mv "$cache/promtool.tmp" "$cache/promtool"
fi
echo "$cache/promtool"

#!/usr/bin/env bash
# Scaling runs that a 2-core machine cannot show (run on a many-core host): testos on
# 1..8 nodes with long litmus runs, and a node-local parallel workload on 1 vs 2 nodes.
# Usage: scripts/scaling.sh [dvmm binary] [testos.elf]   (defaults: a release build)
set -u
dvmm=${1:-target/release/dvmm}
testos=${2:-$(cargo run -q --release -p dvmm-testos --bin testos-path)}
host=""  # testos needs no host-specific options

echo "host: $(nproc) CPUs, $(uname -r), kvm_pvm=$([ -e /sys/module/kvm_pvm ] && echo yes || echo no)"

run() { # label, timeout, dvmm args...
  local label=$1 limit=$2; shift 2
  local t0=$(date +%s%N)
  local out
  out=$(timeout "$limit" "$dvmm" run --kernel "$testos" "$@" 2>/dev/null)
  local rc=$?
  local t1=$(date +%s%N)
  printf '== %s: rc=%s %d ms %s\n' "$label" "$rc" "$(( (t1 - t0) / 1000000 ))" \
    "$(echo "$out" | grep -E 'testos: (PASS|FAIL)' | head -1)"
  echo "$out" | grep -E 'cpu 0: (litmus|pingpong|counter|spinlock)|cpu [0-9]+: user ok' | sed 's/^/   /'
}

# Node-local parallel work: the 'user' check runs a CPL3 sieve on every CPU over its own
# memory; compare sieve rounds per CPU on 1 node and on 2 nodes with the same vCPUs.
run "1 node, 4 vCPUs" 40 --nodes 1 --cpus 4 --cmdline "testos testos.iters=2000 $host"
run "2 nodes, 4 vCPUs" 90 --nodes 2 --cpus 4 --cmdline "testos testos.iters=2000 $host"
# Long litmus runs across nodes.
run "2 nodes, 4 vCPUs, 10000 iterations" 150 --nodes 2 --cpus 4 \
  --cmdline "testos testos.iters=10000 testos.iters.spinlock=2000 testos.watchdog=140 $host"
run "4 nodes, 4 vCPUs" 300 --nodes 4 --cpus 4 --cmdline "testos testos.iters=500 testos.iters.spinlock=200 testos.watchdog=280 $host"
run "8 nodes, 8 vCPUs" 600 --nodes 8 --cpus 8 --memory 512M --cmdline "testos testos.iters=300 testos.iters.spinlock=100 testos.watchdog=580 $host"

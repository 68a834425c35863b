#!/usr/bin/env bash
# The litmus tests at 100,000 iterations across nodes (too long for CI: ~20 min on a
# 2-core host). Two runs of testos on local clusters:
#   1. 2 nodes x 1 vCPU: litmus-mp and litmus-sb, 100,000 iterations each (the two CPUs
#      of each pair on different nodes); counter and spinlock at 100,000 as well.
#   2. 4 nodes x 1 vCPU: litmus-iriw, 100,000 writes per writer, each seen by both
#      readers (all four roles on different nodes).
# Exits non-zero unless both runs print `testos: PASS`. Logs go to $OUT (default
# target/litmus-100k).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/litmus-100k}
mkdir -p "$OUT"
cargo build --release -q
KERNEL=$(cargo run -q --release -p dvmm-testos --bin testos-path)

run() {
    local name=$1 nodes=$2 cmdline=$3
    echo "== $name: --nodes $nodes --cpus $nodes, $cmdline"
    local start=$SECONDS
    ./target/release/dvmm run --nodes "$nodes" --cpus "$nodes" --memory 256M \
        --kernel "$KERNEL" --cmdline "$cmdline testos.watchdog=3000" >"$OUT/$name.log" 2>&1 || true
    grep -E "testos: (cpu [0-9]+: (litmus|counter|spinlock|pingpong)|PASS|FAIL)" "$OUT/$name.log" || true
    echo "   ($((SECONDS - start)) s, log: $OUT/$name.log)"
    grep -q "^testos: PASS" "$OUT/$name.log"
}

run mp-sb 2 "testos.iters=100000 testos.iters.pingpong=10000 testos.iters.litmus-iriw=2"
run iriw 4 "testos.iters=200 testos.iters.litmus-iriw=100000"
echo "litmus-100k: PASS"

#!/bin/sh
# A longer campaign of link faults than CI runs: the delay-and-jitter case with
# ROUNDS different delays and seeds, then every other fault case REPEAT times.
# Usage: scripts/link-faults.sh [ROUNDS] [REPEAT]   (defaults 10 and 3)
set -eu
cd "$(dirname "$0")/.."
rounds=${1:-10}
repeat=${2:-3}
cargo build --release --quiet
DVMM_FAULT_ROUNDS=$rounds cargo test --release --test faults delay_and_jitter -- --nocapture
i=0
while [ "$i" -lt "$repeat" ]; do
    cargo test --release --test faults -- --skip delay_and_jitter
    i=$((i + 1))
done
echo "link faults: $rounds delay/jitter rounds and $repeat passes of the other cases, all as expected"

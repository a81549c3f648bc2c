#!/usr/bin/env bash
# Dedup's bookkeeping and its mapping budget (issue 13):
# - examples/dedup_budget: the saving the default vm.max_map_count buys on
#   two workloads that need more mappings than it has (run at the
#   machine's own limit);
# - examples/dedup_metadata: bytes of bookkeeping per tracked page on four
#   clones of GIB GiB, after a full merge, at its peak and while scanning
#   (vm.max_map_count raised for that run so the merge is complete, and put
#   back on exit or on a signal).
#
#   benches/dedup_budget.sh [GIB]
set -euo pipefail
cd "$(dirname "$0")/.."
gib="${1:-1}"
cargo build --release --example dedup_budget --example dedup_metadata
./target/release/examples/dedup_budget "$gib"
limit=/proc/sys/vm/max_map_count
saved=$(cat "$limit")
restore() { echo "$saved" > "$limit" 2>/dev/null || true; }
trap restore EXIT
trap 'exit 130' INT TERM HUP
if ! echo 1048576 > "$limit" 2>/dev/null; then
  echo "cannot raise vm.max_map_count (not root?): the metadata run may stop at the budget" >&2
fi
./target/release/examples/dedup_metadata "$gib"

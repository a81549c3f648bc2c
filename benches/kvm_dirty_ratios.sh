#!/usr/bin/env bash
# KVM dirty-log harvest cost against guest memory size (64 MiB, 256 MiB,
# 1 GiB, 4 GiB; sparse): a 64-bit guest writes PAGES pages (default 1000)
# spread over its memory each round; one fetch_dirty_log (KVM ioctls and
# the merge into pagefold's log), one harvest_dirty, and one fetch with
# nothing dirty, timed with manual protection (KVM_GET_DIRTY_LOG +
# KVM_CLEAR_DIRTY_LOG) and with the legacy get-and-clear (the peer):
# medians, ratio = legacy / manual with the quartile range, ns per GiB.
# Prints a SKIP line where /dev/kvm is absent or unusable.
#
#   benches/kvm_dirty_ratios.sh [PAGES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example kvm_dirty_ratios -- "$@"

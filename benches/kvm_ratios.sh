#!/usr/bin/env bash
# KVM against Linux KSM in the same run, same guest program, same KVM:
# (1) a guest write to a merged page (fault, copy-on-write, resume),
# pagefold's merged pages vs KSM-merged anonymous memory, microseconds per
# write (median of REPS); (2) the guest's speed while the scanner runs flat
# out vs the same guest with no scanner, pagefold's background scanner vs
# ksmd. Needs root and /dev/kvm; KSM's settings are restored afterwards.
#
#   benches/kvm_ratios.sh [PAGES [REPS [SECONDS]]]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example kvm_ratios -- "$@"

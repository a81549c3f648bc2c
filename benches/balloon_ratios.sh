#!/usr/bin/env bash
# Inflating 1 GiB (or GIB GiB) of written guest memory through the balloon,
# in 4 KiB PFNs (virtio le32 requests of 256) and as one range: seconds,
# GiB/s released, and the share of ballooned memory the kernel shows as
# freed (memfd allocated bytes before/after). Targets: >= 99% freed,
# >= 10 GiB/s for contiguous ranges.
#
#   benches/balloon_ratios.sh [GIB]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example balloon_ratios -- "$@"

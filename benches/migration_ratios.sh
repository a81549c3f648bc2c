#!/usr/bin/env bash
# Bytes on the wire of a migration (one round, guest idle) against the
# distinct non-zero content (target: at most +1%) and against a
# zero-page-only stream (QEMU's default), for four clones of a booted guest
# image, the four booted images, and 1 GiB with 10% duplicates; total time
# of both streams from the same run; the receiver's allocated bytes plain vs
# folded on arrival (four clones); downtime of a 256 MiB guest dirtied at
# 20 MiB/s over a 500 MiB/s in-memory pipe against the 300 ms budget.
#
#   benches/migration_ratios.sh [IMAGE_DIR]   (default target/guest-images)
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example migration_ratios -- "$@"

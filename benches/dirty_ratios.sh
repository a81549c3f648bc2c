#!/usr/bin/env bash
# Prints pagefold / vm-memory ratios for the dirty-log benches
# (benches/dirty), all measured in one run.
#
#   benches/dirty_ratios.sh [--from DIR] [--strict] [-- CRITERION_ARGS...]
#
# Without --from: runs `cargo bench --bench main -- 'harvest_16g|dirty_'
# CRITERION_ARGS` once, with CRITERION_HOME set to a fresh directory
# (target/dirty-ratios/<UTC time>), so every number comes from that run.
# With --from DIR: prints the table of an earlier run kept in DIR.
# --strict: exit 1 when a row misses its target.
#
# Ratio = vm-memory time / pagefold time (criterion's median): above 1
# means pagefold is faster. Targets: 10 for harvest_16g_1pct/clustered
# (16 GiB, 1% of pages dirty in 256 KiB runs, against a full scan of
# vm-memory's AtomicBitmap), 1.3 for 8-byte object writes with tracking
# on; the scattered harvest (1% of pages uniformly, which dirties ~47% of
# the 64-page words) and reads are reported against parity (1.0).
set -euo pipefail

cd "$(dirname "$0")/.."

. benches/ratio_run.sh
ratio_run dirty-ratios 'harvest_16g|dirty_' 2,19p "$@"

exec python3 - "$from" "$strict" <<'PY'
import re, sys

sys.path.insert(0, "benches")
from ratio_table import table

home, strict = sys.argv[1], sys.argv[2] == "1"
ROWS = ["harvest_16g_1pct", "dirty_read_obj_u64", "dirty_write_obj_u64"]
LAYOUTS = ["clustered", "scattered", "1_region"]


def target(row, layout):
    if row == "harvest_16g_1pct" and layout == "clustered":
        return 10.0
    if row == "dirty_write_obj_u64":
        return 1.3
    return 1.0


def per_op(ns, row, throughput):
    """Time per element: an access, or for harvests the whole harvest."""
    if row.startswith("harvest"):
        return ns
    if "Elements" in throughput:
        return ns / throughput["Elements"]
    m = re.search(r"_(\d+)k$", row)
    if "Bytes" in throughput and m:
        return ns / (throughput["Bytes"] / (int(m.group(1)) * 1024))
    return ns


table(home, strict, ROWS, LAYOUTS, target, per_op,
      "pagefold vs vm-memory, dirty log, criterion median (per access; per harvest)")
PY

#!/usr/bin/env bash
# Prints pagefold / vm-memory ratios for the rust-vmm path (benches/rust_vmm):
# vm-memory's operations through pagefold's trait impls against
# GuestMemoryMmap<()>, all measured in one run.
#
#   benches/rust_vmm_ratios.sh [--from DIR] [--strict] [-- CRITERION_ARGS...]
#
# Without --from: runs `cargo bench --bench main -- vmm_ CRITERION_ARGS` once,
# with CRITERION_HOME set to a fresh directory (target/rust-vmm-ratios/<UTC
# time>), so every number in the table comes from that one run.
# With --from DIR: prints the table of an earlier run kept in DIR.
# --strict: exit 1 when a row misses its target.
#
# Ratio = vm-memory time / pagefold time, from criterion's median estimate:
# above 1 means pagefold is faster. Target: parity (1.0) on every row (a VMM
# that switches must not get slower). A row below target whose 95% interval
# reaches it is marked "noise".
set -euo pipefail

cd "$(dirname "$0")/.."

. benches/ratio_run.sh
ratio_run rust-vmm-ratios vmm_ 2,17p "$@"

exec python3 - "$from" "$strict" <<'PY'
import re, sys

sys.path.insert(0, "benches")
from ratio_table import table

home, strict = sys.argv[1], sys.argv[2] == "1"
ROWS = ["vmm_read_obj_u64", "vmm_write_obj_u64", "vmm_read_slice_4k",
        "vmm_write_slice_4k", "vmm_read_volatile_from_64k",
        "vmm_write_volatile_to_64k", "vmm_find_region", "vmm_to_region_addr",
        "vmm_get_slice"]
LAYOUTS = ["1_region", "8_regions", "64_regions"]


def per_op(ns, row, throughput):
    if "Elements" in throughput:
        return ns / throughput["Elements"]
    m = re.search(r"_(\d+)k$", row)
    if "Bytes" in throughput and m:
        return ns / (throughput["Bytes"] / (int(m.group(1)) * 1024))
    return ns


table(home, strict, ROWS, LAYOUTS, lambda row, layout: 1.0, per_op,
      "pagefold (vm-memory traits) vs vm-memory GuestMemoryMmap, criterion median per access")
PY

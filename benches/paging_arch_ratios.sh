#!/usr/bin/env bash
# Prints each architecture's page-table walk time over x86-64's, all
# measured in one run of the `paging_arch/` benches (benches/paging/arch.rs):
# the same 4096-page layout in each architecture's format, translated by
# the same Walker, cold (no cache) and warm (WalkCache), and nested under
# each architecture's second level (EPT, AArch64 stage 2, RISC-V G stage),
# cold and warm. The bench prints the warm nested walks' memory references
# on stderr.
#
#   benches/paging_arch_ratios.sh [--from DIR] [-- CRITERION_ARGS...]
#
# Without --from: runs `cargo bench --bench main -- paging_arch/` once with
# CRITERION_HOME set to a fresh directory (target/paging-arch-ratios/<UTC
# time>). With --from DIR: prints an earlier run kept in DIR.
#
# Ratio = architecture time / x86_64 time per translation (criterion
# medians): 1.00 is x86's speed, above 1 slower.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/ratio_run.sh
ratio_run paging-arch-ratios paging_arch/ '2,15p' "$@"

exec python3 - "$from" <<'PY'
import json, os, sys

home = sys.argv[1]
data = {}
for root, _dirs, files in os.walk(home):
    if os.path.basename(root) != "new" or "estimates.json" not in files:
        continue
    with open(os.path.join(root, "benchmark.json")) as f:
        bench = json.load(f)
    with open(os.path.join(root, "estimates.json")) as f:
        med = json.load(f)["median"]["point_estimate"]
    n = (bench.get("throughput") or {}).get("Elements", 1)
    data[(bench["group_id"], bench["function_id"])] = med / n
print(f"walk time per translation by architecture, against x86_64, run {home}")
groups = sorted({g for g, _ in data})
for g in groups:
    base = data.get((g, "x86_64"))
    print()
    print(f"{g:<32} {'ns':>8} {'/ x86_64':>9}")
    for (gg, fn), t in sorted(data.items()):
        if gg != g:
            continue
        r = f"{t / base:>9.2f}" if base else f"{'-':>9}"
        print(f"  {fn:<30} {t:>8.2f} {r}")
PY

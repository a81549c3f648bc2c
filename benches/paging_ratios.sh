#!/usr/bin/env bash
# Prints x86_64-crate / pagefold time ratios for the page-table walk benches
# (benches/paging), all measured in one run, and the memory references of
# pagefold's nested walks.
#
#   benches/paging_ratios.sh [--from DIR] [-- CRITERION_ARGS...]
#
# Without --from: runs `cargo bench --bench main -- paging/` once with
# CRITERION_HOME set to a fresh directory (target/paging-ratios/<UTC time>),
# so every number comes from that run. With --from DIR: prints an earlier
# run kept in DIR.
#
# Ratio = x86_64 time / pagefold time per translation (criterion medians):
# above 1 means pagefold is faster. Targets (issue 4): cold walk >= 1.0,
# warm translation >= 10, range >= 1.0; nested walks with a warm cache
# under 2 memory references per translation. Two sets of rows: hot tables
# (4096 pages, tables in L1/L2, throughput) and big tables (4 GiB of 4 KiB
# pages, 1 TiB of 2 MiB pages, tables missing L1/L2, latency); see
# benches/paging/mod.rs and benches/paging/big.rs. Beside criterion's
# ratio, "paired" is the median ratio over alternating pagefold/crate
# passes over the same list, which see the same load from other processes.
# Warm rows come twice: the full Translation (`translate_with`) and the
# lean path (`BoundCache::translate_pa`, the address only, as the crate).
set -euo pipefail
cd "$(dirname "$0")/.."

from=""
extra=()
while (($#)); do
    case "$1" in
        --from) from="${2:?--from needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ -z "$from" ]]; then
    target_dir="${CARGO_TARGET_DIR:-target}"
    from="$target_dir/paging-ratios/$(date -u +%Y%m%dT%H%M%SZ)"
    mkdir -p "$from"
    from="$(cd "$from" && pwd)"
    echo "criterion output: $from" >&2
    CRITERION_HOME="$from" cargo bench --bench main -- paging/ "${extra[@]}" 2>&1 \
        | tee "$from/bench.log" >&2
fi

exec python3 - "$from" <<'PY'
import json, os, re, sys

home = sys.argv[1]
# (group, label, target); sections as (title, rows).
SECTIONS = [
    ("hot tables (4096 pages, 8 table pages in L1/L2; throughput, 512 independent addresses)", [
        ("cold_walk", "cold walk", 1.0),
        ("warm_translate", "warm translation, full Translation", 10.0),
        ("warm_lean", "warm translation, lean (address only)", 10.0),
        ("range_1mib", "1 MiB range", 1.0),
    ]),
    ("big tables (tables scattered in 1 GiB of guest memory, missing L1/L2; latency, each address waits for the previous)", [
        ("big_cold_4k", "cold walk, 4 GiB of 4 KiB pages (2048 PTs, 8 MiB)", 1.0),
        ("big_warm_4k", "warm, 4 KiB pages, full Translation", 10.0),
        ("big_warm_lean_4k", "warm, 4 KiB pages, lean (address only)", 10.0),
        ("big_cold_2m", "cold walk, 1 TiB of 2 MiB pages (1024 PDs, 4 MiB)", 1.0),
        ("big_warm_2m", "warm, 2 MiB pages, full Translation", 10.0),
        ("big_warm_lean_2m", "warm, 2 MiB pages, lean (address only)", 10.0),
    ]),
]


def load(d):
    out = {}
    for root, _dirs, files in os.walk(d):
        if os.path.basename(root) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(root, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(root, "estimates.json")) as f:
            med = json.load(f)["median"]
        n = (bench.get("throughput") or {}).get("Elements", 1)
        out[(bench["group_id"], bench["function_id"])] = med["point_estimate"] / n
    return out


data = load(home)
# "paging/<row> paired: ratio R (...)" lines from the bench's stderr.
paired = {}
log = os.path.join(home, "bench.log")
if os.path.exists(log):
    for line in open(log):
        m = re.match(r"paging/(\w+) paired: ratio ([0-9.]+)", line)
        if m:
            paired[m.group(1)] = float(m.group(2))
print(f"pagefold vs x86_64 crate (OffsetPageTable), median ns per translation, run {home}")
W = 52
for title, rows in SECTIONS:
    print()
    print(title)
    print(f"{'row':<{W}} {'pagefold':>9} {'x86_64':>9} {'ratio':>7} {'target':>7}  met  {'paired':>6}")
    for row, label, target in rows:
        pf = data.get((f"paging/{row}", "pagefold"))
        xc = data.get((f"paging/{row}", "x86_64"))
        if pf is None or xc is None:
            print(f"{label:<{W}} (missing)")
            continue
        r = xc / pf
        pr = f"{paired[row]:>6.2f}" if row in paired else f"{'-':>6}"
        print(f"{label:<{W}} {pf:>9.2f} {xc:>9.2f} {r:>7.2f} {target:>7.1f}  {'yes' if r >= target else 'NO ':<3}  {pr}")
print()
print("ratio: criterion medians (decides 'met'). paired: median ratio over alternating")
print("pagefold/crate passes of the same list, which see the same load on the machine.")
print()
for row in ("nested_cold", "nested_warm"):
    pf = data.get((f"paging/{row}", "pagefold"))
    if pf is not None:
        print(f"{row + ' (hot tables)':<{W}} {pf:>9.2f}        -       -       -   (pagefold only)")
log = os.path.join(home, "bench.log")
if os.path.exists(log):
    for line in open(log):
        if re.match(r"paging/\w+ paired: |paging/big(_warm_\w+)?: |paging/warm_\w+: ", line):
            print(line.strip())
        if "memory references" in line:
            print(line.strip())
            m = re.search(r"warm ([0-9.]+)", line)
            if m:
                print(f"nested warm refs {m.group(1)} (target < 2): {'yes' if float(m.group(1)) < 2 else 'NO'}")
PY

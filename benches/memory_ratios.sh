#!/usr/bin/env bash
# Prints pagefold / vm-memory throughput ratios for the guest-memory benches
# (benches/memory), all measured in one run.
#
#   benches/memory_ratios.sh [--from DIR] [--strict] [FILTER] [-- CRITERION_ARGS...]
#
# Without --from: runs `cargo bench --bench main -- FILTER CRITERION_ARGS`
# once, with CRITERION_HOME set to a fresh directory
# (target/memory-ratios/<UTC time>), so every number in the table comes from
# that one run and nothing else that writes target/criterion can mix in.
# With --from DIR: prints the table of an earlier run kept in DIR.
# --strict: exit 1 when a row misses its target.
#
# Ratio = vm-memory time / pagefold time, from criterion's median estimate:
# above 1 means pagefold is faster. Targets: 1.3 for 8-byte object reads and
# writes and for lookups with 64 regions, parity (1.0) elsewhere. A row whose
# ratio is below target but whose 95% interval reaches it is marked "noise".
set -euo pipefail

cd "$(dirname "$0")/.."

from=""
strict=0
filter=()
extra=()
while (($#)); do
    case "$1" in
        --from) from="${2:?--from needs a directory}"; shift 2 ;;
        --strict) strict=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) filter+=("$1"); shift ;;
    esac
done

if [[ -z "$from" ]]; then
    target_dir="${CARGO_TARGET_DIR:-target}"
    from="$target_dir/memory-ratios/$(date -u +%Y%m%dT%H%M%SZ)"
    mkdir -p "$from"
    from="$(cd "$from" && pwd)"
    echo "criterion output: $from" >&2
    CRITERION_HOME="$from" cargo bench --bench main -- "${filter[@]}" "${extra[@]}" >&2
fi

exec python3 - "$from" "$strict" <<'PY'
import re, sys

sys.path.insert(0, "benches")
from ratio_table import table

home, strict = sys.argv[1], sys.argv[2] == "1"
ROWS = ["read_obj_u64", "write_obj_u64", "read_4k", "write_4k", "read_64k",
        "write_64k", "find_region", "to_region_addr", "host_address"]
LAYOUTS = ["1_region", "8_regions", "64_regions"]
LOOKUPS = {"find_region", "to_region_addr", "host_address"}


def target(row, layout):
    if row in ("read_obj_u64", "write_obj_u64"):
        return 1.3
    if row in LOOKUPS and layout == "64_regions":
        return 1.3
    return 1.0


def per_op(ns, row, throughput):
    """Time of one access: Elements counts accesses, Bytes counts bytes of
    copies whose size the row names (read_4k: 4 KiB)."""
    if "Elements" in throughput:
        return ns / throughput["Elements"]
    m = re.search(r"_(\d+)k$", row)
    if "Bytes" in throughput and m:
        return ns / (throughput["Bytes"] / (int(m.group(1)) * 1024))
    return ns


table(home, strict, ROWS, LAYOUTS, target, per_op,
      "pagefold vs vm-memory, criterion median per access")
PY

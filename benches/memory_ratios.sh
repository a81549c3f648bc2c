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
import json, math, os, re, sys

home, strict = sys.argv[1], sys.argv[2] == "1"
ROWS = ["read_obj_u64", "write_obj_u64", "read_4k", "write_4k", "read_64k",
        "write_64k", "find_region", "to_region_addr", "host_address"]
LAYOUTS = ["1_region", "8_regions", "64_regions"]
LOOKUPS = {"find_region", "to_region_addr", "host_address"}
PF, VM = "pagefold", "vm-memory"


def target(row, layout):
    if row in ("read_obj_u64", "write_obj_u64"):
        return 1.3
    if row in LOOKUPS and layout == "64_regions":
        return 1.3
    return 1.0


def load(d):
    """(group_id, function_id) -> (median ns, lo, hi, throughput)."""
    out = {}
    for root, _dirs, files in os.walk(d):
        if os.path.basename(root) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(root, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(root, "estimates.json")) as f:
            med = json.load(f)["median"]
        ci = med["confidence_interval"]
        out[(bench["group_id"], bench["function_id"])] = (
            med["point_estimate"], ci["lower_bound"], ci["upper_bound"],
            bench.get("throughput") or {})
    return out


def per_op(ns, row, throughput):
    """Time of one access: Elements counts accesses, Bytes counts bytes of
    copies whose size the row names (read_4k: 4 KiB)."""
    if "Elements" in throughput:
        return ns / throughput["Elements"]
    m = re.search(r"_(\d+)k$", row)
    if "Bytes" in throughput and m:
        return ns / (throughput["Bytes"] / (int(m.group(1)) * 1024))
    return ns


def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.2f} ns"


def order(group):
    row, _, layout = group.partition("/")
    return (ROWS.index(row) if row in ROWS else len(ROWS), row,
            LAYOUTS.index(layout) if layout in LAYOUTS else len(LAYOUTS), layout)


data = load(home)
groups = sorted({g for g, fn in data if fn in (PF, VM)}, key=order)
if not groups:
    sys.exit(f"no pagefold/vm-memory results under {home}")

print(f"pagefold vs vm-memory, criterion median per access, run {home}")
hdr = f"{'row':<28} {'pagefold':>10} {'vm-memory':>10} {'ratio':>6} {'95% range':>13} {'target':>6}  met"
print(hdr)
print("-" * len(hdr))
met = noise = 0
missed, missing = [], []
for g in groups:
    pf, vm = data.get((g, PF)), data.get((g, VM))
    if pf is None or vm is None:
        missing.append(g)
        print(f"{g:<28} {'-' if pf is None else 'ok':>10} {'-' if vm is None else 'ok':>10}   (one side missing)")
        continue
    row, _, layout = g.partition("/")
    ratio = vm[0] / pf[0]
    lo, hi = vm[1] / pf[2], vm[2] / pf[1]
    t = target(row, layout)
    if ratio >= t:
        status, met = "yes", met + 1
    elif hi >= t:
        status, noise = "noise", noise + 1
        missed.append(g)
    else:
        status = "NO"
        missed.append(g)
    print(f"{g:<28} {fmt_time(per_op(pf[0], row, pf[3])):>10} "
          f"{fmt_time(per_op(vm[0], row, vm[3])):>10} {ratio:>6.2f} "
          f"{f'{lo:.2f}-{hi:.2f}':>13} {t:>6.1f}  {status}")

total = len(groups) - len(missing)
geo = math.exp(sum(math.log(data[(g, VM)][0] / data[(g, PF)][0])
                   for g in groups if g not in missing) / max(total, 1))
summary = f"summary: {met}/{total} rows meet their target, geometric-mean ratio {geo:.2f}"
if missed:
    summary += f"; below target: {', '.join(missed)}"
    if noise:
        summary += f" ({noise} of them within noise)"
if missing:
    summary += f"; incomplete: {', '.join(missing)}"
print(summary)
sys.exit(1 if strict and (missed or missing) else 0)
PY

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

from=""
strict=0
extra=()
while (($#)); do
    case "$1" in
        --from) from="${2:?--from needs a directory}"; shift 2 ;;
        --strict) strict=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ -z "$from" ]]; then
    target_dir="${CARGO_TARGET_DIR:-target}"
    from="$target_dir/dirty-ratios/$(date -u +%Y%m%dT%H%M%SZ)"
    mkdir -p "$from"
    from="$(cd "$from" && pwd)"
    echo "criterion output: $from" >&2
    CRITERION_HOME="$from" cargo bench --bench main -- 'harvest_16g|dirty_' "${extra[@]}" >&2
fi

exec python3 - "$from" "$strict" <<'PY'
import json, math, os, re, sys

home, strict = sys.argv[1], sys.argv[2] == "1"
ROWS = ["harvest_16g_1pct", "dirty_read_obj_u64", "dirty_write_obj_u64"]
LAYOUTS = ["clustered", "scattered", "1_region"]
PF, VM = "pagefold", "vm-memory"


def target(row, layout):
    if row == "harvest_16g_1pct" and layout == "clustered":
        return 10.0
    if row == "dirty_write_obj_u64":
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
    """Time per element: an access, or for harvests the whole harvest."""
    if row.startswith("harvest"):
        return ns
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
groups = sorted({g for g, fn in data if fn in (PF, VM) and g.partition("/")[0] in ROWS}, key=order)
if not groups:
    sys.exit(f"no pagefold/vm-memory results under {home}")

print(f"pagefold vs vm-memory, dirty log, criterion median (per access; per harvest), run {home}")
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

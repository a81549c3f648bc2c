"""Ratio tables for the criterion runs that benches/*_ratios.sh start: every
row measured for pagefold and for the peer in one run, the ratio = peer
time / pagefold time from criterion's median, with the 95% range and a
target per row. Used by memory_ratios.sh and dirty_ratios.sh."""

import json, math, os, sys


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


def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.2f} ns"


def table(home, strict, rows, layouts, target, per_op, title,
          pf="pagefold", peer="vm-memory"):
    """Prints the table of the run in `home` for groups `row/layout` with
    `row` in `rows`, and exits (1 under `strict` when a row misses)."""

    def order(group):
        row, _, layout = group.partition("/")
        return (rows.index(row) if row in rows else len(rows), row,
                layouts.index(layout) if layout in layouts else len(layouts), layout)

    data = load(home)
    groups = sorted({g for g, fn in data
                     if fn in (pf, peer) and g.partition("/")[0] in rows}, key=order)
    if not groups:
        sys.exit(f"no {pf}/{peer} results under {home}")

    print(f"{title}, run {home}")
    hdr = f"{'row':<28} {pf:>10} {peer:>10} {'ratio':>6} {'95% range':>13} {'target':>6}  met"
    print(hdr)
    print("-" * len(hdr))
    met = noise = 0
    missed, missing = [], []
    for g in groups:
        ours, theirs = data.get((g, pf)), data.get((g, peer))
        if ours is None or theirs is None:
            missing.append(g)
            print(f"{g:<28} {'-' if ours is None else 'ok':>10} "
                  f"{'-' if theirs is None else 'ok':>10}   (one side missing)")
            continue
        row, _, layout = g.partition("/")
        ratio = theirs[0] / ours[0]
        lo, hi = theirs[1] / ours[2], theirs[2] / ours[1]
        t = target(row, layout)
        if ratio >= t:
            status, met = "yes", met + 1
        elif hi >= t:
            status, noise = "noise", noise + 1
            missed.append(g)
        else:
            status = "NO"
            missed.append(g)
        print(f"{g:<28} {fmt_time(per_op(ours[0], row, ours[3])):>10} "
              f"{fmt_time(per_op(theirs[0], row, theirs[3])):>10} {ratio:>6.2f} "
              f"{f'{lo:.2f}-{hi:.2f}':>13} {t:>6.1f}  {status}")

    total = len(groups) - len(missing)
    geo = math.exp(sum(math.log(data[(g, peer)][0] / data[(g, pf)][0])
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

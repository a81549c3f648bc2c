#!/usr/bin/env bash
# Runs the ratio scripts of two checkouts one right after the other, so a
# change can be compared with its base on the same machine under the same
# load: for each script, the BEFORE tree's run, then the AFTER tree's.
#
#   benches/compare_trees.sh BEFORE_DIR AFTER_DIR [SCRIPT...] [-- ARGS...]
#
# SCRIPT names a script under benches/ without `.sh` (default: every
# `*_ratios.sh` and `dedup_budget.sh`, and `compare-ksm` for the CLI's
# comparison with Linux KSM on its built-in workloads). ARGS are passed to
# every criterion-based script after its own `--` (for example
# `--measurement-time 2`). Outputs land in
# target/compare-trees/<UTC time>/<script>.{before,after}.txt of AFTER_DIR;
# each run's log is printed as it goes. Each tree builds with its own
# target directory, so the two builds never mix.
set -euo pipefail

before="${1:?usage: compare_trees.sh BEFORE_DIR AFTER_DIR [SCRIPT...] [-- ARGS...]}"
after="${2:?usage: compare_trees.sh BEFORE_DIR AFTER_DIR [SCRIPT...] [-- ARGS...]}"
shift 2
scripts=()
extra=()
while (($#)); do
    if [[ "$1" == "--" ]]; then shift; extra=("$@"); break; fi
    scripts+=("$1"); shift
done
if [[ ${#scripts[@]} -eq 0 ]]; then
    for f in "$after"/benches/*_ratios.sh "$after"/benches/dedup_budget.sh; do
        scripts+=("$(basename "$f" .sh)")
    done
    scripts+=(compare-ksm)
fi

out="$after/target/compare-trees/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
echo "outputs: $out" >&2

run_one() {  # tree script side
    local tree="$1" script="$2" side="$3"
    local log="$out/$script.$side.txt"
    echo "=== $script ($side: $tree) $(date -u +%H:%M:%S)" | tee "$log" >&2
    (
        cd "$tree"
        case "$script" in
            compare-ksm)
                cargo run -q --release -p pagefold-cli -- compare-ksm ;;
            memory_ratios|paging_ratios|dirty_ratios)
                bash "benches/$script.sh" -- "${extra[@]}" ;;
            *)
                bash "benches/$script.sh" ;;
        esac
    ) 2>&1 | tee -a "$log" >&2 || echo "(exit status $?)" | tee -a "$log" >&2
}

for s in "${scripts[@]}"; do
    run_one "$before" "$s" before
    run_one "$after" "$s" after
done
echo "done: $out" >&2

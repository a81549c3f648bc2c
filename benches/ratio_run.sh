# Sourced by the benches/*_ratios.sh scripts that take no filter: parses
# [--from DIR] [--strict] [-- CRITERION_ARGS...], and without --from runs
# `cargo bench --bench main -- FILTER CRITERION_ARGS` once with
# CRITERION_HOME set to a fresh directory (target/NAME/<UTC time>), so every
# number of a table comes from that one run.
#
#   ratio_run NAME FILTER HELP_LINES "$@"   # sets $from and $strict
ratio_run() {
    local name="$1" filter="$2" help="$3"
    shift 3
    from=""
    strict=0
    local extra=()
    while (($#)); do
        case "$1" in
            --from) from="${2:?--from needs a directory}"; shift 2 ;;
            --strict) strict=1; shift ;;
            -h|--help) sed -n "$help" "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
            --) shift; extra=("$@"); break ;;
            *) echo "unknown argument $1" >&2; exit 2 ;;
        esac
    done
    if [[ -z "$from" ]]; then
        local target_dir="${CARGO_TARGET_DIR:-target}"
        from="$target_dir/$name/$(date -u +%Y%m%dT%H%M%SZ)"
        mkdir -p "$from"
        from="$(cd "$from" && pwd)"
        echo "criterion output: $from" >&2
        CRITERION_HOME="$from" cargo bench --bench main -- "$filter" "${extra[@]}" >&2
    fi
}

#!/usr/bin/env bash
# What the host service costs a VMM process, beside Linux KSM in the same
# run: the first write to a merged page (the kernel's copy on write in a
# VMM process; break on write through the service, from the VMM and from a
# vhost-user backend) against a write to a page KSM merged; writes caught
# in a merge pass; a client's threads and memory. Prints
# `cow_ratio= break_ratio= backend_break_ratio=` (pagefold / KSM, lower is
# better). Root, for KSM (its settings are restored, on signals too).
#
#   benches/service_costs.sh [PAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example service_costs -- "$@"

#!/usr/bin/env bash
# C tests of libpagefold.
#
# Builds the ffi crate (cargo build -p pagefold-ffi), compiles every
# tests/c/test_*.c twice -- as C11 linked against libpagefold.a and as C++17
# linked against libpagefold.so, both with -Wall -Wextra -Werror -- runs each
# binary under valgrind (definite and indirect leaks and memory errors fail;
# "still reachable" blocks from the Rust runtime do not), checks that every
# function in include/pagefold.h is exported by the library and used by a
# test, installs into a scratch prefix with install.sh and builds
# examples/minimal.c through pkg-config (shared and static), and ends with
# the line "N passed, M failed". Exit status 0 only when
# nothing failed.
#
# Test files marked "pf-test: needs-userfaultfd" (dedup) need the
# userfaultfd syscall, which valgrind (3.19 at least) does not implement:
# each of their binaries runs natively, always, and under valgrind as well.
# A probe decides how: where valgrind runs userfaultfd, the valgrind run is
# complete; where it does not, the binary gets PF_TEST_NO_USERFAULTFD=1
# under valgrind and reports the tests that need a dedup host as "skip"
# (they passed natively); run.sh lists them before its last line. No test
# skips anywhere else.
#
# Usage: ffi/tests/c/run.sh        (from anywhere)
# Env:   CC, CXX (default cc, c++), CARGO_TARGET_DIR,
#        PF_NO_VALGRIND=1 to run the binaries without valgrind.

set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ffi=$(cd "$here/../.." && pwd)
root=$(cd "$ffi/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
lib_dir=$target_dir/debug
out=$target_dir/ffi-ctests
CC=${CC:-cc}
CXX=${CXX:-c++}
header=$ffi/include/pagefold.h

# What rustc links a staticlib against (cargo rustc -p pagefold-ffi --lib
# --crate-type staticlib -- --print native-static-libs); also in pagefold.pc.
static_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
warnings="-Wall -Wextra -Werror"

passed=0
failed=0
failures=()
skipped=()

fail() { # name, reason
    failed=$((failed + 1))
    failures+=("$1: $2")
    echo "FAIL $1: $2"
}
pass() {
    passed=$((passed + 1))
    echo "ok   $1"
}

use_valgrind=1
if [ "${PF_NO_VALGRIND:-0}" = 1 ]; then
    use_valgrind=0
elif ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind not found; installing it"
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq valgrind >/dev/null
    if ! command -v valgrind >/dev/null 2>&1; then
        echo "error: valgrind is not installed and could not be installed" >&2
        exit 1
    fi
fi

echo "== cargo build -p pagefold-ffi"
if ! (cd "$root" && cargo build -p pagefold-ffi); then
    echo "error: cargo build failed" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
for f in libpagefold.a libpagefold.so; do
    if [ ! -f "$lib_dir/$f" ]; then
        echo "error: $lib_dir/$f missing after the build" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
done
mkdir -p "$out/lib"
# The library's SONAME is libpagefold.so.<ABI major>: that is the file the
# C++ binaries look for at run time (through their rpath).
soname=$(readelf -d "$lib_dir/libpagefold.so" | sed -nE 's/.*Library soname: \[(.*)\].*/\1/p')
ln -sf "$lib_dir/libpagefold.so" "$out/lib/${soname:-libpagefold.so}"

valgrind_cmd=(valgrind --quiet --leak-check=full --error-exitcode=1
    --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect)

# Whether valgrind runs the userfaultfd syscall (and its UFFDIO_API ioctl).
# Natively the dedup tests need it too; if the host lacks it they fail.
valgrind_userfaultfd=0
if [ "$use_valgrind" = 1 ] && grep -lq 'pf-test: needs-userfaultfd' "$here"/test_*.c; then
    cat >"$out/uffd-probe.c" <<'PROBE'
#define _GNU_SOURCE 1
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api;
    if (fd < 0) {
        printf("userfaultfd: %s\n", strerror(errno));
        return 1;
    }
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    if (ioctl((int)fd, UFFDIO_API, &api) != 0) {
        printf("UFFDIO_API: %s\n", strerror(errno));
        return 1;
    }
    close((int)fd);
    printf("userfaultfd works\n");
    return 0;
}
PROBE
    if $CC -std=c11 $warnings "$out/uffd-probe.c" -o "$out/uffd-probe"; then
        probe_native=$("$out/uffd-probe" 2>&1)
        probe_valgrind=$(valgrind --quiet --log-file=/dev/null "$out/uffd-probe" 2>&1)
        echo "== userfaultfd probe: natively \"$probe_native\"; under valgrind \"$probe_valgrind\""
        if [ "$probe_valgrind" = "userfaultfd works" ]; then
            valgrind_userfaultfd=1
        fi
    else
        fail "userfaultfd probe" "does not compile"
    fi
    if [ "$valgrind_userfaultfd" = 1 ]; then
        echo "   valgrind runs userfaultfd: dedup tests run natively and fully under valgrind"
    else
        echo "   valgrind lacks userfaultfd: dedup tests run natively in full, and under valgrind"
        echo "   with PF_TEST_NO_USERFAULTFD=1 (tests needing a dedup host report skip there)"
    fi
fi

# Runs one test binary; adds up its summary line "# suite: N passed, M
# failed[, K skipped]". mode: valgrind, native, or valgrind-no-uffd
# (valgrind with PF_TEST_NO_USERFAULTFD=1, the only mode that may skip).
run_binary() { # label, binary, mode
    local label=$1 bin=$2 mode=$3 rc summary n m k
    local log=$out/$(basename "$2").$mode.log
    local runner=() env=()
    rm -f "$log.valgrind"
    case $mode in
    valgrind) runner=("${valgrind_cmd[@]}" --log-file="$log.valgrind") ;;
    valgrind-no-uffd)
        runner=("${valgrind_cmd[@]}" --log-file="$log.valgrind")
        env=(PF_TEST_NO_USERFAULTFD=1)
        ;;
    esac
    env "${env[@]}" "${runner[@]}" "$bin" >"$log" 2>&1
    rc=$?
    sed 's/^/    /' "$log"
    summary=$(grep -E '^# .*: [0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$' "$log" | tail -n 1)
    if [ -z "$summary" ]; then
        fail "$label" "no summary line (crashed? exit status $rc)"
        [ -s "$log.valgrind" ] && sed 's/^/    valgrind: /' "$log.valgrind"
        return
    fi
    n=$(sed -E 's/.*: ([0-9]+) passed.*/\1/' <<<"$summary")
    m=$(sed -E 's/.*, ([0-9]+) failed.*/\1/' <<<"$summary")
    k=$(sed -nE 's/.*, ([0-9]+) skipped$/\1/p' <<<"$summary")
    passed=$((passed + n))
    failed=$((failed + m))
    if [ "$m" != 0 ]; then
        failures+=("$label: $m tests failed")
    fi
    if [ -n "$k" ] && [ "$k" != 0 ]; then
        if [ "$mode" = valgrind-no-uffd ]; then
            while IFS= read -r line; do
                skipped+=("$label: ${line#skip }")
            done < <(grep -E '^skip ' "$log")
        else
            fail "$label" "$k tests skipped where nothing may skip"
        fi
    fi
    # Exit status: 0 all passed, 2 tests failed (counted above), 1 valgrind
    # found errors, anything else a crash.
    if [ -s "$log.valgrind" ] && [ "$mode" = valgrind-no-uffd ]; then
        # Valgrind's warning about the syscall it lacks (5 lines each time)
        # is what this mode expects: count it, show anything else.
        k=$(grep -c 'WARNING: unhandled .* syscall' "$log.valgrind")
        echo "    valgrind: $k \"unhandled syscall\" warnings (userfaultfd), as expected"
        grep -vE 'WARNING: unhandled .* syscall|You may be able to write your own handler|README_MISSING_SYSCALL_OR_IOCTL|Nevertheless we consider this a bug|valgrind.org/support/bug_reports' \
            "$log.valgrind" | sed 's/^/    valgrind: /'
    elif [ -s "$log.valgrind" ]; then
        sed 's/^/    valgrind: /' "$log.valgrind"
    fi
    if [ "$rc" != 0 ] && ! { [ "$rc" = 2 ] && [ "$m" != 0 ]; }; then
        fail "$label" "valgrind reported errors or the binary exited $rc"
    fi
}

# Runs a binary as its source file needs: see the header of this script.
run_test() { # label, binary, source
    local label=$1 bin=$2 src=$3
    if ! grep -q 'pf-test: needs-userfaultfd' "$src"; then
        if [ "$use_valgrind" = 1 ]; then
            run_binary "$label" "$bin" valgrind
        else
            run_binary "$label" "$bin" native
        fi
        return
    fi
    echo "  -- natively (needs userfaultfd)"
    run_binary "$label, native" "$bin" native
    if [ "$use_valgrind" = 1 ]; then
        if [ "$valgrind_userfaultfd" = 1 ]; then
            echo "  -- under valgrind"
            run_binary "$label, valgrind" "$bin" valgrind
        else
            echo "  -- under valgrind, which lacks userfaultfd (PF_TEST_NO_USERFAULTFD=1)"
            run_binary "$label, valgrind without userfaultfd" "$bin" valgrind-no-uffd
        fi
    fi
}

for src in "$here"/test_*.c; do
    name=$(basename "$src" .c)

    echo "== $name (C11, static)"
    # shellcheck disable=SC2086
    if $CC -std=c11 $warnings -g -I"$ffi/include" "$src" -o "$out/$name-c" \
        "$lib_dir/libpagefold.a" $static_libs; then
        run_test "$name (C)" "$out/$name-c" "$src"
    else
        fail "$name (C)" "does not compile"
    fi

    echo "== $name (C++17, shared)"
    # shellcheck disable=SC2086
    if $CXX -x c++ -std=c++17 $warnings -g -I"$ffi/include" "$src" -x none -o "$out/$name-cxx" \
        -L"$lib_dir" -Wl,-rpath,"$out/lib" -lpagefold -lpthread; then
        run_test "$name (C++)" "$out/$name-cxx" "$src"
    else
        fail "$name (C++)" "does not compile"
    fi
done

echo "== install.sh and pkg-config (examples/minimal.c)"
prefix=$out/prefix
rm -rf "$prefix"
# Runs a built example; true if it printed what it read back. (Output is
# captured first: `prog | grep -q` can fail under pipefail when grep exits
# early and prog gets SIGPIPE.)
example_works() {
    local output
    output=$("$1" 2>&1) && grep -q "read back: hello, guest" <<<"$output"
}
if PROFILE=debug "$ffi/install.sh" "$prefix" >"$out/install.log" 2>&1; then
    export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
    # shellcheck disable=SC2046
    if $CC -std=c11 $warnings "$ffi/examples/minimal.c" -o "$out/minimal-shared" \
        $(pkg-config --cflags --libs pagefold) -Wl,-rpath,"$prefix/lib" &&
        example_works "$out/minimal-shared"; then
        pass "install.pkg_config_shared"
    else
        fail "install.pkg_config_shared" "examples/minimal.c did not build or run against the installed .so"
    fi
    # shellcheck disable=SC2046
    if $CC -std=c11 $warnings "$ffi/examples/minimal.c" -o "$out/minimal-static" \
        $(pkg-config --cflags pagefold) "$(pkg-config --variable=libdir pagefold)/libpagefold.a" \
        $(pkg-config --static --libs-only-l pagefold | sed 's/-lpagefold//') &&
        [[ $(readelf -d "$out/minimal-static") != *libpagefold* ]] &&
        example_works "$out/minimal-static"; then
        pass "install.pkg_config_static"
    else
        fail "install.pkg_config_static" "examples/minimal.c did not build or run against the installed .a"
    fi
else
    sed 's/^/    /' "$out/install.log"
    fail "install.pkg_config_shared" "install.sh failed"
    fail "install.pkg_config_static" "install.sh failed"
fi

echo "== coverage"
# Function names declared in the header, symbols the library exports.
declared=$(sed -nE 's/^[A-Za-z].*[ *](pf_[a-z0-9_]+)\(.*/\1/p' "$header" | sort -u)
exported=$(nm -D --defined-only "$lib_dir/libpagefold.so" | awk '$2 == "T" && $3 ~ /^pf_/ { print $3 }' | sort -u)
if [ -z "$declared" ]; then
    fail "coverage.header_matches_library" "no functions found in $header"
elif [ "$declared" = "$exported" ]; then
    pass "coverage.header_matches_library ($(wc -l <<<"$declared") functions)"
else
    fail "coverage.header_matches_library" "header and library differ: $(diff <(echo "$declared") <(echo "$exported") | grep '^[<>]' | tr '\n' ' ')"
fi
untested=()
for fn in $declared; do
    grep -qw "$fn" "$here"/*.c "$here"/*.h || untested+=("$fn")
done
if [ ${#untested[@]} = 0 ]; then
    pass "coverage.every_export_is_tested"
else
    fail "coverage.every_export_is_tested" "not called by any test: ${untested[*]}"
fi

echo
if [ ${#skipped[@]} != 0 ]; then
    echo "skipped under valgrind, which lacks userfaultfd (these ran natively above):"
    printf '  %s\n' "${skipped[@]}"
fi
if [ "$failed" != 0 ]; then
    echo "failures:"
    printf '  %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

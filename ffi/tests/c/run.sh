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

# Runs one test binary; adds up its summary line "# suite: N passed, M failed".
run_binary() { # label, binary
    local label=$1 bin=$2 log=$out/$(basename "$2").log rc summary n m
    local runner=()
    if [ "$use_valgrind" = 1 ]; then
        runner=(valgrind --quiet --leak-check=full --error-exitcode=1
            --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect
            --log-file="$log.valgrind")
    fi
    "${runner[@]}" "$bin" >"$log" 2>&1
    rc=$?
    sed 's/^/    /' "$log"
    summary=$(grep -E '^# .*: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
    if [ -z "$summary" ]; then
        fail "$label" "no summary line (crashed? exit status $rc)"
        [ -s "$log.valgrind" ] && sed 's/^/    valgrind: /' "$log.valgrind"
        return
    fi
    n=$(sed -E 's/.*: ([0-9]+) passed.*/\1/' <<<"$summary")
    m=$(sed -E 's/.*, ([0-9]+) failed$/\1/' <<<"$summary")
    passed=$((passed + n))
    failed=$((failed + m))
    if [ "$m" != 0 ]; then
        failures+=("$label: $m tests failed")
    fi
    # Exit status: 0 all passed, 2 tests failed (counted above), 1 valgrind
    # found errors, anything else a crash.
    if [ -s "$log.valgrind" ]; then
        sed 's/^/    valgrind: /' "$log.valgrind"
    fi
    if [ "$rc" != 0 ] && ! { [ "$rc" = 2 ] && [ "$m" != 0 ]; }; then
        fail "$label" "valgrind reported errors or the binary exited $rc"
    fi
}

for src in "$here"/test_*.c; do
    name=$(basename "$src" .c)

    echo "== $name (C11, static)"
    # shellcheck disable=SC2086
    if $CC -std=c11 $warnings -g -I"$ffi/include" "$src" -o "$out/$name-c" \
        "$lib_dir/libpagefold.a" $static_libs; then
        run_binary "$name (C)" "$out/$name-c"
    else
        fail "$name (C)" "does not compile"
    fi

    echo "== $name (C++17, shared)"
    # shellcheck disable=SC2086
    if $CXX -x c++ -std=c++17 $warnings -g -I"$ffi/include" "$src" -x none -o "$out/$name-cxx" \
        -L"$lib_dir" -Wl,-rpath,"$out/lib" -lpagefold -lpthread; then
        run_binary "$name (C++)" "$out/$name-cxx"
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
if [ "$failed" != 0 ]; then
    echo "failures:"
    printf '  %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]

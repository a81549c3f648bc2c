#!/usr/bin/env bash
# Builds libpagefold and installs it for C and C++ programs:
#
#   PREFIX/include/pagefold.h
#   PREFIX/lib/libpagefold.a
#   PREFIX/lib/libpagefold.so.<version>, libpagefold.so.<abi major> -> it (the
#     SONAME programs record), libpagefold.so -> it (for -lpagefold)
#   PREFIX/lib/pkgconfig/pagefold.pc
#
# Usage: ffi/install.sh PREFIX
# Env:   DESTDIR (staging root for packagers), LIBDIR (default PREFIX/lib),
#        PROFILE (cargo profile, default release), CARGO_TARGET_DIR.
#
# Then, shared:
#   export PKG_CONFIG_PATH=PREFIX/lib/pkgconfig
#   cc app.c $(pkg-config --cflags --libs pagefold)
# static (the archive by path, plus what it needs from the system):
#   cc app.c $(pkg-config --cflags pagefold) \
#      "$(pkg-config --variable=libdir pagefold)/libpagefold.a" \
#      $(pkg-config --static --libs-only-l pagefold | sed 's/-lpagefold//')

set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
prefix=$1
case $prefix in
/*) ;;
*) prefix=$(cd "$(dirname "$prefix")" 2>/dev/null && pwd)/$(basename "$prefix") ;;
esac
libdir=${LIBDIR:-$prefix/lib}
# shellcheck disable=SC2016 # a pkg-config variable, not a shell one
pc_libdir=${LIBDIR:-'${exec_prefix}/lib'}
profile=${PROFILE:-release}
destdir=${DESTDIR:-}

ffi=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$ffi/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
case $profile in
dev | debug) profile_dir=debug; profile_arg=() ;;
*) profile_dir=$profile; profile_arg=(--profile "$profile") ;;
esac

(cd "$root" && cargo build -p pagefold-ffi "${profile_arg[@]}")
built=$target_dir/$profile_dir

version=$(cd "$root" && cargo pkgid -p pagefold-ffi | sed -E 's/.*[#@]//')
soname=$(readelf -d "$built/libpagefold.so" | sed -nE 's/.*Library soname: \[(.*)\].*/\1/p')
soname=${soname:-libpagefold.so.0}
real=libpagefold.so.$version

install -d "$destdir$prefix/include" "$destdir$libdir/pkgconfig"
install -m 644 "$ffi/include/pagefold.h" "$destdir$prefix/include/pagefold.h"
install -m 644 "$built/libpagefold.a" "$destdir$libdir/libpagefold.a"
install -m 755 "$built/libpagefold.so" "$destdir$libdir/$real"
ln -sf "$real" "$destdir$libdir/$soname"
ln -sf "$soname" "$destdir$libdir/libpagefold.so"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@LIBDIR@|$pc_libdir|g" -e "s|@VERSION@|$version|g" \
    "$ffi/pagefold.pc.in" >"$destdir$libdir/pkgconfig/pagefold.pc"

echo "installed libpagefold $version ($soname) under $destdir$prefix"
echo "use: PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --cflags --libs pagefold"

#!/usr/bin/env bash
# Boots real Linux guests (stock Debian kernel, busybox initramfs) under QEMU
# TCG with a file-backed RAM and keeps each guest's RAM as a raw image, with
# its CPU registers and QEMU's own translations taken while it was stopped.
#
#   benches/guest/boot_guest.sh [--arch x86_64|aarch64|riscv64] [--out DIR]
#                               [--mem MiB] [--clones N]
#                               [--mode auto|boot|copy] [--jobs J]
#                               [--timeout S] [--cpu MODEL] [--samples N]
#                               [--append ARGS] [--flavour F] [--suite S]
#                               [--force]
#
#   --arch A      the guest architecture (default x86_64: `info tlb` as the
#                 ground truth). aarch64 (qemu-system-aarch64 -machine virt,
#                 Debian's arm64 kernel) and riscv64 (qemu-system-riscv64
#                 -machine virt, OpenSBI, Debian's riscv64 kernel): the ground
#                 truth is the paging registers read through QEMU's gdbstub
#                 and QEMU's `gva2gpa` for --samples addresses (capture.py).
#   --out DIR     where the images go (default: target/guest-images under the
#                 repository root, target/guest-images-ARCH for the others;
#                 /target is ignored by git)
#   --mem MiB     guest RAM per VM (default 256). Above ~3 GiB the pc machine
#                 puts part of it above 4 GiB; see DIR/layout.txt.
#   --clones N    number of VMs, images DIR/ram-0.img .. ram-(N-1).img
#                 (default 4 for x86_64, 1 for the others)
#   --mode M      boot: boot every VM separately (own KASLR layout, own
#                 random and timing-dependent pages); copy: boot one, copy its
#                 image N-1 times; auto (default): boot the first and, if it
#                 was ready in under 60 s, boot the others too, else copy.
#   --jobs J      guests booted at once in boot mode (default 1; TCG runs one
#                 host thread per guest)
#   --timeout S   seconds to wait for a guest's ready marker (default 300,
#                 600 for the emulated architectures)
#   --cpu MODEL   QEMU -cpu model (default qemu64: 4-level paging, no LA57;
#                 aarch64: max,pauth-impdef=on; riscv64: rv64)
#   --samples N   aarch64/riscv64: addresses given to gva2gpa per privilege
#                 context (default 12000)
#   --append ARGS more kernel command line, e.g. riscv64's `no5lvl` (Sv48
#                 instead of the Sv57 QEMU's rv64 offers) or `no4lvl` (Sv39)
#   --flavour F   Debian's linux-image-<arch>-F kernel instead of the default
#                 one, e.g. aarch64's `16k` (16 KiB pages, from Debian 13);
#                 images in target/guest-images-<arch>-F
#   --suite S     take the guest's kernel and busybox from Debian release S
#                 (e.g. trixie) rather than the system's apt sources; images
#                 in target/guest-images-<arch>[-F]-S. Debian 13's arm64
#                 kernels are built for 52-bit VAs, which they use where the
#                 CPU has FEAT_LPA2 (QEMU's max; `--cpu max,lpa2=off` keeps
#                 them to 48 bits, 47 with 16 KiB pages)
#   --force       ignore the cache and boot again
#
# Per VM i, DIR holds: ram-i.img (raw RAM, byte o of the file = the o-th byte
# of guest RAM, see layout.txt for the GPA of each part), registers-i.txt
# (`info registers`), tlb-i.txt (`info tlb`: the mappings of the CR3 at stop),
# mem-i.txt (`info mem`), mtree-i.txt (`info mtree -f`), serial-i.log (guest
# console) and boot-i.txt (timing). registers.txt and tlb.txt link to VM 0's.
# aarch64/riscv64 have no tlb/mem files; instead paging-i.txt (the paging
# registers by name, from the gdbstub), sysregs-i.txt (every register the
# gdbstub reads), gva2gpa-i.txt (QEMU's translation of each sampled address
# per privilege context) and capture-i.txt (counts, timing); see capture.py.
# DIR/README.txt says how the images were made. A second run with the same
# parameters, kernel, busybox, QEMU and init reuses them ("cached").
#
# Needs root for apt (installs qemu-system-x86 / -arm / -misc if QEMU is
# missing; adds the dpkg architecture arm64 or riscv64; the kernel and
# busybox-static are only downloaded with `apt-get download` and unpacked
# into target/guest-cache, nothing is installed for them) and python3 (QMP
# and gdbstub clients). When the configured mirrors lack the guest's kernel
# package (Debian 12 has no riscv64 port and no arm64 16k kernel), it and
# busybox come from Debian 13 (trixie) through a private apt configuration
# in the cache (the system's sources are left alone). Override the cache
# with PAGEFOLD_GUEST_CACHE=DIR.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$script_dir/../.." && pwd)"

arch=x86_64
out=""
mem=256
clones=""
mode=auto
jobs=1
timeout=""
cpu=""
samples=12000
append=""
flavour=""
suite=""
force=0
auto_limit=60

die() { echo "boot_guest: error: $*" >&2; exit 1; }
say() { echo "boot_guest: $*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

while (($#)); do
    case "$1" in
        --arch) arch="${2:?--arch needs x86_64, aarch64 or riscv64}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --mem) mem="${2:?--mem needs MiB}"; shift 2 ;;
        --clones) clones="${2:?--clones needs a count}"; shift 2 ;;
        --mode) mode="${2:?--mode needs auto, boot or copy}"; shift 2 ;;
        --jobs) jobs="${2:?--jobs needs a count}"; shift 2 ;;
        --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
        --cpu) cpu="${2:?--cpu needs a model}"; shift 2 ;;
        --samples) samples="${2:?--samples needs a count}"; shift 2 ;;
        --append) append="${2?--append needs kernel arguments}"; shift 2 ;;
        --flavour) flavour="${2:?--flavour needs a Debian kernel flavour, e.g. 16k}"; shift 2 ;;
        --suite) suite="${2:?--suite needs a Debian release name, e.g. trixie}"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# What differs between the architectures. x86_64 keeps the layout it always
# had (cache root, target/guest-images, 4 clones, `info tlb`).
case "$arch" in
    x86_64)
        qemu_bin=qemu-system-x86_64 qemu_pkg=qemu-system-x86 deb_arch=amd64
        machine=pc console=ttyS0 ram_base=0x0 default_cpu=qemu64
        default_clones=4 default_timeout=300 sub="" ;;
    aarch64)
        qemu_bin=qemu-system-aarch64 qemu_pkg=qemu-system-arm deb_arch=arm64
        machine=virt console=ttyAMA0 ram_base=0x40000000
        default_cpu=max,pauth-impdef=on
        default_clones=1 default_timeout=600 sub=aarch64 ;;
    riscv64)
        qemu_bin=qemu-system-riscv64 qemu_pkg=qemu-system-misc deb_arch=riscv64
        machine=virt console=ttyS0 ram_base=0x80000000 default_cpu=rv64
        default_clones=1 default_timeout=600 sub=riscv64 ;;
    *) die "--arch must be x86_64, aarch64 or riscv64 (got '$arch')" ;;
esac
if [[ -n "$flavour$suite" ]]; then
    [[ "$flavour" =~ ^[a-z0-9]*$ ]] || die "--flavour must be a Debian kernel flavour such as 16k"
    [[ "$suite" =~ ^[a-z]*$ ]] || die "--suite must be a Debian release name such as trixie"
    [[ -n "$sub" ]] || die "--flavour and --suite are for aarch64 and riscv64"
    sub="$sub${flavour:+-$flavour}${suite:+-$suite}"
fi
kernel_meta="linux-image-$deb_arch${flavour:+-$flavour}"
clones="${clones:-$default_clones}"
timeout="${timeout:-$default_timeout}"
cpu="${cpu:-$default_cpu}"
out="${out:-$repo/target/guest-images${sub:+-$sub}}"

{ is_uint "$mem" && ((mem >= 64)); } || die "--mem must be a whole number of MiB, at least 64"
{ is_uint "$clones" && ((clones >= 1)); } || die "--clones must be at least 1"
{ is_uint "$jobs" && ((jobs >= 1)); } || die "--jobs must be at least 1"
{ is_uint "$timeout" && ((timeout >= 1)); } || die "--timeout must be whole seconds"
{ is_uint "$samples" && ((samples >= 100)); } || die "--samples must be at least 100"
[[ "$mode" == auto || "$mode" == boot || "$mode" == copy ]] || die "--mode must be auto, boot or copy"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
# One run at a time per folder (the tests of one guest may start two).
command -v flock >/dev/null || die "flock (util-linux) is needed"
exec 9>"$out/.lock"
flock -w 3600 9 || die "another boot_guest.sh kept $out/.lock for an hour"
cache="${PAGEFOLD_GUEST_CACHE:-$repo/target/guest-cache}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
# The guest's kernel, busybox and initramfs (x86_64's in the cache root, as
# before; the others in a folder per architecture).
acache="$cache${sub:+/$sub}"
mkdir -p "$acache"
# Runs for other folders may share this cache (the same kernel): one at a
# time fetches and builds.
exec 8>"$acache/.lock"
flock -w 3600 8 || die "another boot_guest.sh kept $acache/.lock for an hour"

# ---------------------------------------------------------------- tools --

# apt_update_once [OPTS...]: `apt-get update` once per configuration (the
# system's, or the private one use_private_apt makes).
declare -A apt_updated=()
apt_update_once() {
    local which="${1:+private}"
    which="${which:-system}"
    if [[ -z "${apt_updated[$which]:-}" ]]; then
        say "apt-get update${1:+ (private configuration)}"
        apt-get "$@" update -qq >&2 || die "apt-get update failed (no access to the Debian mirrors?)"
        apt_updated[$which]=1
    fi
}

ensure_qemu() {
    if ! command -v "$qemu_bin" >/dev/null; then
        ((EUID == 0)) || die "$qemu_bin is missing; run as root or install $qemu_pkg"
        say "installing $qemu_pkg"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$qemu_pkg" >&2 \
            || die "could not install $qemu_pkg"
    fi
    command -v "$qemu_bin" >/dev/null || die "$qemu_bin still missing"
    qemu_version="$("$qemu_bin" --version | sed -n 1p)"
}

ensure_python() {
    command -v python3 >/dev/null || die "python3 is needed for the QMP client"
}

# pkg NAME: NAME as apt knows it for the guest's architecture.
pkg() {
    if [[ "$deb_arch" == "$(dpkg --print-architecture 2>/dev/null || echo amd64)" ]]; then echo "$1"; else echo "$1:$deb_arch"; fi
}

# candidate PKG [OPTS...]: the version apt would fetch, empty if none.
candidate() {
    local p="$1"
    shift
    apt-cache "$@" policy "$p" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2; exit}'
}

# apt options for the guest's packages: empty (the system's configuration)
# or the private one; set by ensure_apt_arch.
guest_apt=()
guest_apt_ready=0

# A foreign guest architecture: dpkg must know it for apt to list its
# packages; a Debian release without that port (riscv64 before Debian 13)
# gets a private apt configuration for the release that has it.
ensure_apt_arch() {
    local native meta
    ((guest_apt_ready == 0)) || return 0
    guest_apt_ready=1
    native="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    [[ "$deb_arch" == "$native" ]] && return 0
    command -v apt-get >/dev/null || die "apt-get missing; cannot fetch $deb_arch packages"
    meta="$(pkg "$kernel_meta")"
    if ! dpkg --print-foreign-architectures | grep -qx "$deb_arch"; then
        ((EUID == 0)) || die "dpkg does not know the architecture $deb_arch; run as root (dpkg --add-architecture $deb_arch)"
        say "dpkg --add-architecture $deb_arch"
        dpkg --add-architecture "$deb_arch" || die "dpkg --add-architecture $deb_arch failed"
        unset 'apt_updated[system]'
        apt_update_once
    fi
    local release="$suite"
    if [[ -z "$release" ]]; then
        [[ -n "$(candidate "$meta")" ]] && return 0
        apt_update_once
        [[ -n "$(candidate "$meta")" ]] && return 0
        release=trixie
        say "the configured apt sources have no $meta; using Debian $release's"
    fi
    local dir="$acache/apt" keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f "$keyring" ]] || die "no $keyring for Debian $release's packages"
    say "$deb_arch packages from Debian $release (private apt configuration in $dir; the system's sources are not changed)"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    echo "deb [arch=$deb_arch signed-by=$keyring] http://deb.debian.org/debian $release main" >"$dir/sources.list"
    guest_apt=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
               -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
               -o "APT::Architectures::=$deb_arch" -o Acquire::Languages=none)
    [[ -n "$(candidate "$meta" "${guest_apt[@]}")" ]] || apt_update_once "${guest_apt[@]}"
    [[ -n "$(candidate "$meta" "${guest_apt[@]}")" ]] || die "Debian $release has no $meta"
}

# apt_fetch PKG DIR: downloads PKG's .deb into DIR (apt-get download: no
# install, no maintainer scripts), updating the package lists once if needed.
# A package of the guest's foreign architecture goes through ensure_apt_arch.
apt_fetch() {
    local pkg="$1" dir="$2" o=()
    command -v apt-get >/dev/null || die "apt-get missing; cannot fetch $pkg"
    if [[ "$pkg" == *":$deb_arch" ]]; then
        ensure_apt_arch
        o=("${guest_apt[@]}")
    fi
    rm -f "$dir"/*.deb
    if ! (cd "$dir" && apt-get "${o[@]}" download -qq "$pkg" >/dev/null 2>&1); then
        apt_update_once "${o[@]}"
        (cd "$dir" && apt-get "${o[@]}" download -qq "$pkg" >&2 2>/dev/null) || die "could not download $pkg"
    fi
    compgen -G "$dir/*.deb" >/dev/null || die "apt-get download $pkg left no .deb"
}

ensure_kernel() {
    local dir="$acache/kernel" pkg meta
    meta="$(pkg "$kernel_meta")"
    mkdir -p "$dir"
    if ! compgen -G "$dir/vmlinu[xz]-*" >/dev/null; then
        ensure_apt_arch
        pkg="$(apt-cache "${guest_apt[@]}" depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ && !n++ {print $2}')"
        if [[ -z "$pkg" ]]; then
            apt_update_once "${guest_apt[@]}"
            pkg="$(apt-cache "${guest_apt[@]}" depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ && !n++ {print $2}')"
        fi
        [[ -n "$pkg" ]] || die "cannot resolve $meta to a kernel package"
        say "downloading $pkg (only the kernel image and config are unpacked)"
        apt_fetch "$pkg" "$dir"
        dpkg-deb --fsys-tarfile "$dir"/*.deb | tar -x -C "$dir" --strip-components=2 \
            --wildcards './boot/vmlinu*' './boot/config-*' \
            || die "could not unpack the kernel from $(basename "$dir"/*.deb)"
        dpkg-deb -f "$dir"/*.deb Package Version >"$dir/package.txt"
        rm -f "$dir"/*.deb
    fi
    kernel="$(compgen -G "$dir/vmlinu[xz]-*" | sort -V | tail -n1)"
    [[ -s "$kernel" ]] || die "no kernel in $dir"
    kernel_version="$(basename "$kernel" | sed 's/^vmlinu[xz]-//') ($(awk '{printf "%s%s", (NR > 1 ? " " : ""), $2}' "$dir/package.txt" 2>/dev/null))"
}

# ensure_busybox DIR PKG: busybox-static's binary in DIR/busybox; sets
# bb_path and bb_version (from running it where it runs here, else from the
# version string inside it).
ensure_busybox() {
    local dir="$1" pkg="$2"
    mkdir -p "$dir"
    if [[ ! -x "$dir/busybox" ]]; then
        say "downloading $pkg"
        apt_fetch "$pkg" "$dir"
        dpkg-deb --fsys-tarfile "$dir"/*.deb | tar -x -O ./bin/busybox >"$dir/busybox.tmp" 2>/dev/null \
            || dpkg-deb --fsys-tarfile "$dir"/*.deb | tar -x -O ./usr/bin/busybox >"$dir/busybox.tmp" \
            || die "could not unpack busybox from the $pkg package"
        chmod 755 "$dir/busybox.tmp"
        dpkg-deb -f "$dir"/*.deb Package Version >"$dir/package.txt"
        rm -f "$dir"/*.deb
        mv "$dir/busybox.tmp" "$dir/busybox"
    fi
    bb_path="$dir/busybox"
    bb_version="$({ "$bb_path" --help 2>&1 || true; } | sed -n '1s/ multi-call binary\.$//p')"
    if [[ -z "$bb_version" ]]; then
        bb_version="$(grep -a -o -m1 'BusyBox v[0-9][0-9.]* ([^)]*)' "$bb_path" | head -n1)"
    fi
}

# The guest's busybox, and one that runs here (cpio for the initramfs).
ensure_busyboxes() {
    ensure_busybox "$cache/busybox" busybox-static
    host_busybox="$bb_path"
    if [[ -n "$sub" ]]; then
        ensure_busybox "$acache/busybox" "$(pkg busybox-static)"
    fi
    busybox="$bb_path"
    busybox_version="$bb_version"
}

# ------------------------------------------------------------ initramfs --

# The guest's /init. Leaves a realistically used memory behind: page cache of
# the unpacked initramfs, tmpfs files (several copies of one binary, text,
# compressed data, guest-unique random data), dentry/inode/slab caches from
# walking /proc and /sys, long-lived processes with anonymous memory, and the
# freed (not zeroed) pages of everything that ran and exited.
init_script() {
    init_main
    if [[ -n "$sub" ]]; then init_hints; fi
    init_tail
}

init_main() {
    cat <<'INIT'
#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/log /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mount -t tmpfs -o size=50% tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
hostname pagefold-guest
echo "pagefold-guest: $(uname -r) up $(cut -d' ' -f1 /proc/uptime)s"

work=/tmp/work
mkdir -p $work/copies $work/text
# The same binary several times (identical pages inside one guest and
# across guests).
for i in 1 2 3 4; do cp /bin/busybox $work/copies/busybox.$i; done
# Text and compressed data (deterministic: the same bytes in every guest,
# but at guest-dependent places).
seq 1 200000 >$work/text/seq.txt
sort -r $work/text/seq.txt >$work/text/seq-sorted.txt
gzip -c $work/text/seq.txt >$work/text/seq.txt.gz
md5sum $work/text/* >$work/text/md5sums
dmesg >$work/text/dmesg.txt
cat /proc/kallsyms >$work/text/kallsyms.txt 2>/dev/null
tar -cf $work/sys-class.tar /sys/class 2>/dev/null
# Guest-unique data.
dd if=/dev/urandom of=$work/random.bin bs=1024 count=8192 2>/dev/null
# Metadata caches.
find / -xdev >/dev/null 2>&1
ls -lR /sys/devices >/dev/null 2>&1
ls -lR /proc/sys >/dev/null 2>&1
# Long-lived processes with anonymous memory (heap of shell variables).
sh -c 'v=$(seq 1 150000); while :; do sleep 3600; done' &
sh -c 'v=$(awk "BEGIN{for(i=0;i<40000;i++) printf \"%08x\\n\", i*2654435761%4294967296}"); while :; do sleep 3600; done' &
syslogd -C256 2>/dev/null
klogd 2>/dev/null
crond -c /tmp 2>/dev/null
# History: data written and deleted again; the freed pages keep their bytes
# until reused (init_on_free is off in the Debian kernel).
dd if=/dev/urandom of=/tmp/old.bin bs=1024 count=16384 2>/dev/null
cat $work/text/seq.txt $work/text/seq-sorted.txt $work/text/kallsyms.txt /bin/busybox >/tmp/old.txt
rm -f /tmp/old.bin /tmp/old.txt
# Short-lived work whose freed pages stay dirty.
awk 'BEGIN{for(i=0;i<100000;i++) a[i]=i*i; s=0; for(i in a) s+=a[i]; print "awk sum " s}' >/dev/null
for i in 1 2 3; do gzip -c $work/copies/busybox.$i | gunzip -c | md5sum >/dev/null; done
sync
sleep 2
INIT
}

init_tail() {
    cat <<'INIT'
grep -E '^(MemTotal|MemFree|MemAvailable|Buffers|Cached|Shmem|AnonPages|Slab):' /proc/meminfo
echo "pagefold-guest: $(cut -d' ' -f1 /proc/uptime)s"
echo PAGEFOLD-GUEST-READY
while :; do sleep 3600; done
INIT
}

# aarch64/riscv64: a process that stays on the CPU, mostly inside the kernel
# (reading /dev/zero), so that the stopped CPU's user translation table base
# (TTBR0_EL1, satp) is a live process's; and addresses worth sampling for
# the ground truth (capture.py reads the `pagefold-hint:` lines): that
# process's and init's maps, kernel symbols, /proc/iomem, vmalloc areas and
# the kernel's memory-layout banner where it prints one. kptr_restrict=1
# (not 0) because %pK prints hashed values at 0 and real ones to root at 1.
init_hints() {
    cat <<'INIT'
echo 1 >/proc/sys/kernel/kptr_restrict
dd if=/dev/zero of=/dev/null bs=1M 2>/dev/null &
busy=$!
sleep 1
echo "pagefold-hint: busy $busy dd"
for p in $busy 1; do sed "s/^/pagefold-hint: maps $p /" /proc/$p/maps; done
grep -E ' (_text|_stext|_etext|_sdata|_edata|__bss_start|__bss_stop|_end|__init_begin|__init_end|__start_rodata|swapper_pg_dir|init_task|init_mm|init_cred|init_pid_ns|jiffies_64|memstart_addr|kimage_voffset|vectors|empty_zero_page|phys_ram_base|kernel_map|__per_cpu_start|__per_cpu_end)$' /proc/kallsyms | sed 's/^/pagefold-hint: ksym /'
sed 's/^/pagefold-hint: iomem /' /proc/iomem
head -n 400 /proc/vmallocinfo | sed 's/^/pagefold-hint: vmalloc /'
dmesg | grep -i -A16 'virtual kernel memory layout' | sed 's/^/pagefold-hint: layout /'
INIT
}

build_initrd() {
    local root="$acache/initrd-root.$$"
    rm -rf "$root"
    mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/etc"
    cp "$busybox" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    init_script >"$root/init"
    chmod 755 "$root/init"
    echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
    # Device nodes for the console before devtmpfs is mounted (cpio keeps
    # them; creating them needs root, so skip them otherwise: the kernel
    # makes /dev/console itself when the initramfs has none).
    if ((EUID == 0)); then
        mknod -m 600 "$root/dev/console" c 5 1
        mknod -m 666 "$root/dev/null" c 1 3
    fi
    (cd "$root" && find . | LC_ALL=C sort | "$host_busybox" cpio -o -H newc 2>/dev/null) \
        | gzip -9 -n >"$acache/initrd.gz.tmp" || die "could not build the initramfs"
    mv "$acache/initrd.gz.tmp" "$acache/initrd.gz"
    rm -rf "$root"
    initrd="$acache/initrd.gz"
}

# ----------------------------------------------------------------- boot --

# What a VM leaves besides its image: x86_64 `info` texts; the others the
# ground truth capture.py writes.
if [[ -z "$sub" ]]; then
    vm_files=(registers tlb mem mtree)
else
    vm_files=(registers mtree mem paging sysregs gva2gpa capture)
fi

# capture I SOCK GDBSOCK SERIAL IMAGE: stops VM I and saves the monitor's
# (x86_64) or the gdbstub's and gva2gpa's (the others) view of it, then quits.
capture() {
    local i="$1" sock="$2" gsock="$3" serial="$4" img="$5"
    if [[ -z "$sub" ]]; then
        timeout 300 python3 "$script_dir/capture.py" snapshot --qmp "$sock" --out "$out" --idx "$i" >&2
    else
        timeout 900 python3 "$script_dir/capture.py" truth --arch "$arch" --qmp "$sock" --gdb "$gsock" \
            --out "$out" --idx "$i" --serial "$serial" --ram "$img" --ram-base "$ram_base" \
            --mem "$((mem * 1024 * 1024))" --samples "$samples" >&2
    fi
}

# boot_one I: boots VM I into DIR/ram-I.img and saves its monitor output.
boot_one() {
    local i="$1" ram="$out/ram-$1.img" tmp="$out/ram-$1.img.part"
    local sock="$out/.qmp-$1.sock" serial="$out/serial-$1.log" pidf="$out/.qemu-$1.pid"
    local gsock="$out/.gdb-$1.sock" start now elapsed qpid rc=0 extra=() f cap0 cap_s
    rm -f "$ram" "$tmp" "$sock" "$gsock" "$serial" "$pidf" "$out/done-$i" "$out/boot-$i.txt"
    for f in registers tlb mem mtree paging sysregs gva2gpa capture; do rm -f "$out/$f-$i.txt"; done
    # The gdbstub on a unix socket (no TCP port to collide with others').
    [[ -n "$sub" ]] && extra=(-gdb "unix:$gsock,server=on,wait=off")
    start="$(date +%s.%N)"
    "$qemu_bin" -accel tcg -cpu "$cpu" -smp 1 -m "${mem}M" \
        -object "memory-backend-file,id=ram,size=${mem}M,mem-path=$tmp,share=on" \
        -machine "$machine,memory-backend=ram" \
        -kernel "$kernel" -initrd "$initrd" -append "console=$console quiet${append:+ $append}" \
        -nodefaults -display none -no-reboot \
        -serial "file:$serial" -qmp "unix:$sock,server=on,wait=off" \
        "${extra[@]}" -pidfile "$pidf" >"$out/qemu-$i.log" 2>&1 &
    qpid=$!
    while :; do
        if grep -q PAGEFOLD-GUEST-READY "$serial" 2>/dev/null; then break; fi
        if grep -q 'Kernel panic' "$serial" 2>/dev/null; then
            kill "$qpid" 2>/dev/null || true
            wait "$qpid" 2>/dev/null || true
            say "VM $i: the guest kernel panicked; last console lines ($serial):"
            tail -n 20 "$serial" 2>/dev/null | sed 's/^/    /' >&2
            return 1
        fi
        if ! kill -0 "$qpid" 2>/dev/null; then
            wait "$qpid" || rc=$?
            say "VM $i: QEMU exited ($rc) before the guest was ready; $out/qemu-$i.log:"
            sed 's/^/    /' "$out/qemu-$i.log" >&2
            say "last console lines ($serial):"
            tail -n 20 "$serial" 2>/dev/null | sed 's/^/    /' >&2
            return 1
        fi
        now="$(date +%s.%N)"
        if awk -v a="$start" -v b="$now" -v t="$timeout" 'BEGIN{exit !(b - a > t)}'; then
            kill "$qpid" 2>/dev/null || true
            wait "$qpid" 2>/dev/null || true
            say "VM $i: no PAGEFOLD-GUEST-READY within ${timeout}s; last console lines ($serial):"
            tail -n 20 "$serial" 2>/dev/null | sed 's/^/    /' >&2
            return 1
        fi
        sleep 0.5
    done
    now="$(date +%s.%N)"
    elapsed="$(awk -v a="$start" -v b="$now" 'BEGIN{printf "%.1f", b - a}')"
    cap0="$(date +%s.%N)"
    if ! capture "$i" "$sock" "$gsock" "$serial" "$tmp"; then
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
        say "VM $i: capturing the stopped guest failed (see capture's message above)"
        return 1
    fi
    cap_s="$(awk -v a="$cap0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')"
    wait "$qpid" || rc=$?
    ((rc == 0)) || { say "VM $i: QEMU exited with $rc after quit"; return 1; }
    rm -f "$sock" "$gsock" "$pidf"
    [[ "$(stat -c %s "$tmp")" == "$((mem * 1024 * 1024))" ]] || { say "VM $i: image has the wrong size"; return 1; }
    mv "$tmp" "$ram"
    {
        echo "ready_after_s=$elapsed"
        echo "booted=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "guest_uptime_at_ready_s=$(tr -d '\r' <"$serial" | sed -n 's/^pagefold-guest: \([0-9.]*\)s$/\1/p' | tail -n1)"
        echo "allocated_bytes=$(($(stat -c %b "$ram") * $(stat -c %B "$ram")))"
        if [[ -n "$sub" ]]; then echo "capture_s=$cap_s"; fi
    } >"$out/boot-$i.txt"
    echo "$key" >"$out/done-$i"
    say "VM $i: ready after ${elapsed}s (wall clock from QEMU start), image $ram"
}

# copy_one I: VM I is a byte copy of VM 0.
copy_one() {
    local i="$1"
    rm -f "$out/done-$i"
    cp --reflink=auto --sparse=always "$out/ram-0.img" "$out/ram-$i.img.part"
    mv "$out/ram-$i.img.part" "$out/ram-$i.img"
    for f in "${vm_files[@]}"; do cp "$out/$f-0.txt" "$out/$f-$i.txt"; done
    cp "$out/serial-0.log" "$out/serial-$i.log"
    echo "copy_of=0" >"$out/boot-$i.txt"
    echo "$key" >"$out/done-$i"
}

# registers.txt, tlb.txt (x86_64) or paging.txt (the others): VM 0's.
link_vm0() {
    ln -sf registers-0.txt "$out/registers.txt"
    if [[ -z "$sub" ]]; then ln -sf tlb-0.txt "$out/tlb.txt"; else ln -sf paging-0.txt "$out/paging.txt"; fi
}

is_done() { [[ -f "$out/done-$1" && "$(cat "$out/done-$1")" == "$key" && -f "$out/ram-$1.img" ]]; }

# ------------------------------------------------------------- layout --

# The GPA ranges that map the backend (file offsets), from `info mtree -f`:
# flat-view lines for region "ram" read "START-END (prio P, ram): ram @OFFSET".
write_layout() {
    {
        echo "# Guest-physical layout of ram-*.img (QEMU $machine machine, -m ${mem}M)."
        echo "# From 'info mtree -f' of VM 0 (the same for every VM of this size):"
        echo "# the system flat view's ranges backed by the RAM backend 'ram'."
        echo "# Columns: first GPA, last GPA, offset in the image file, how the guest sees it"
        echo "# (rom = the BIOS/option-ROM shadow, read-only to the guest). Image bytes that"
        echo "# no line covers (e.g. the part under the PCI hole when RAM is split"
        echo "# below/above 4 GiB) are not guest-addressable but are still in the file."
        awk '
            /^FlatView/ { sys = 0 }
            /Root memory region: system$/ { sys = 1 }
            sys && !done && /^ *[0-9a-f]+-[0-9a-f]+ \(prio [-0-9]+, (ram|rom)[^)]*\): ram( @[0-9a-f]+)?$/ {
                split($1, r, "-")
                off = "0000000000000000"
                for (k = 1; k <= NF; k++) if ($k ~ /^@/) off = substr($k, 2)
                mode = $0; sub(/^.*\(prio [-0-9]+, /, "", mode); sub(/\).*$/, "", mode)
                print "0x" r[1], "0x" r[2], "0x" off, mode
                printed = 1
            }
            /^$/ { if (printed) done = 1 }
        ' "$out/mtree-0.txt"
    } >"$out/layout.txt"
}

write_readme() {
    local how="$1"
    {
        echo "pagefold guest images, made by benches/guest/boot_guest.sh"
        echo
        echo "VMs:        $clones x ${mem} MiB (ram-0.img .. ram-$((clones - 1)).img)"
        echo "How:        $how"
        echo "Kernel:     $kernel_version, command line 'console=$console quiet${append:+ $append}' (KASLR on)"
        echo "Initramfs:  $busybox_version; /init is in boot_guest.sh (init_script)"
        echo "QEMU:       $qemu_version, -accel tcg -cpu $cpu -smp 1 -machine $machine,"
        echo "            RAM = memory-backend-file (share=on) = the image file"
        if [[ -z "$sub" ]]; then
            echo "Snapshot:   taken after the guest printed PAGEFOLD-GUEST-READY: QMP 'stop',"
            echo "            then info registers / tlb / mem / mtree -f, then 'quit'."
        else
            echo "Snapshot:   taken after the guest printed PAGEFOLD-GUEST-READY: QMP 'stop';"
            echo "            the registers through the gdbstub (paging-i.txt, sysregs-i.txt);"
            echo "            info registers / mtree -f / mem; then 'gva2gpa' for $samples addresses"
            echo "            (gva2gpa-i.txt) in each privilege context, set through the gdbstub"
            echo "            (a data read at that privilege: QEMU 7.2's debug walk checks the"
            echo "            permissions, with PAN on AArch64 but not the access flag; on"
            echo "            RISC-V it takes SUM as set and sets a clear A bit in the image);"
            echo "            then 'quit' (capture.py; counts and timing in capture-i.txt)."
        fi
        if [[ -z "$sub" ]]; then
            echo "Layout:     layout.txt (GPA ranges of the image)"
        else
            echo "Layout:     layout.txt (GPA ranges of the image; byte o of ram-i.img is GPA $ram_base + o)"
        fi
        echo
        echo "Per VM (ready_after_s = wall clock from QEMU start to the marker, TCG):"
        for ((i = 0; i < clones; i++)); do
            echo "  VM $i: $(tr '\n' ' ' <"$out/boot-$i.txt")"
        done
        echo
        echo "Cache key: $key"
    } >"$out/README.txt"
}

# ------------------------------------------------------------------ main --

# On exit or interrupt, stop any QEMU this run started (by the pid in its
# pidfile, after checking that it is QEMU).
cleanup() {
    local f pid
    for f in "$out"/.qemu-*.pid; do
        [[ -f "$f" ]] || continue
        pid="$(cat "$f" 2>/dev/null || true)"
        if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == qemu-system-* ]]; then
            kill "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_qemu
ensure_python
ensure_kernel
ensure_busyboxes

init_hash="$(init_script | sha256sum | cut -c1-16)"
if [[ -z "$sub" ]]; then
    # The QMP client and the snapshot it takes.
    script_hash="$({ cat "$script_dir/qmp.py"; sed -n '/^def snapshot/,/^$/p' "$script_dir/capture.py"; } | sha256sum | cut -c1-16)"
    key="mem=${mem}M cpu=$cpu kernel=$kernel_version busybox=$busybox_version qemu=$qemu_version init=$init_hash qmp=$script_hash"
    # x86_64 keys had no --append; one given makes its own.
    [[ -z "$append" ]] || key="$key append=$append"
else
    script_hash="$(cat "$script_dir"/{qmp,gdb_rsp,capture}.py | sha256sum | cut -c1-16)"
    key="arch=$arch append=$append mem=${mem}M cpu=$cpu kernel=$kernel_version busybox=$busybox_version qemu=$qemu_version init=$init_hash capture=$script_hash samples=$samples"
fi

say "out:    $out"
say "kernel: $kernel_version"
say "qemu:   $qemu_version"

if ((force)); then rm -f "$out"/done-*; fi

# Images beyond N from an earlier run would be picked up by ram-*.img globs.
for f in "$out"/ram-*.img; do
    [[ -e "$f" ]] || continue
    n="${f##*/ram-}"; n="${n%.img}"
    if ! is_uint "$n" || ((n >= clones)); then
        say "removing $f (beyond --clones $clones)"
        rm -f "$f" "$out/done-$n" "$out/boot-$n.txt" "$out/serial-$n.log"
        for g in registers tlb mem mtree paging sysregs gva2gpa capture; do rm -f "$out/$g-$n.txt"; done
    fi
done

# What the cache says about how the existing images were made.
prev_how=""
[[ -f "$out/how.txt" ]] && prev_how="$(cat "$out/how.txt")"

all_done=1
for ((i = 0; i < clones; i++)); do is_done "$i" || all_done=0; done
if ((all_done)) && [[ -n "$prev_how" ]] && { [[ "$mode" == auto ]] || [[ "$prev_how" == "$mode"* ]]; }; then
    write_layout
    write_readme "$prev_how"
    link_vm0
    say "cached: $clones x ${mem} MiB in $out ($prev_how)"
    ls -1 "$out"/ram-*.img
    exit 0
fi

build_initrd
rm -f "$out/how.txt"

# VM 0 is always booted (unless cached); it decides the mode under auto.
t0="$(date +%s)"
if ! is_done 0; then
    boot_one 0 || die "VM 0 did not boot"
else
    say "VM 0: cached"
fi
ready0="$(sed -n 's/^ready_after_s=//p' "$out/boot-0.txt")"
ready0="${ready0:-0}"
if [[ "$mode" == auto ]] && ((clones == 1)); then
    mode=boot
elif [[ "$mode" == auto ]]; then
    if awk -v r="$ready0" -v l="$auto_limit" 'BEGIN{exit !(r < l)}'; then mode=boot; else mode=copy; fi
    say "VM 0 was ready after ${ready0}s (limit ${auto_limit}s): mode $mode"
fi

if [[ "$mode" == boot ]]; then
    how="boot: every VM booted separately (own KASLR layout and timing)"
    # A copy from an earlier copy-mode run is not a booted VM.
    for ((i = 1; i < clones; i++)); do
        if is_done "$i" && grep -q '^copy_of=' "$out/boot-$i.txt" 2>/dev/null; then rm -f "$out/done-$i"; fi
    done
    pending=()
    for ((i = 1; i < clones; i++)); do
        if is_done "$i"; then say "VM $i: cached"; else pending+=("$i"); fi
    done
    failed=0
    running=0
    for i in "${pending[@]}"; do
        if ((running >= jobs)); then
            wait -n || failed=1
            running=$((running - 1))
        fi
        boot_one "$i" &
        running=$((running + 1))
    done
    while ((running > 0)); do
        wait -n || failed=1
        running=$((running - 1))
    done
    ((failed == 0)) || die "some VMs did not boot (see the messages above)"
else
    how="copy: VM 0 booted once, ram-1.. are byte copies of ram-0 (clones of one booted guest)"
    for ((i = 1; i < clones; i++)); do copy_one "$i"; done
fi
echo "$how" >"$out/how.txt"

write_layout
write_readme "$how"
link_vm0
say "done in $(($(date +%s) - t0))s: $how"
ls -1 "$out"/ram-*.img

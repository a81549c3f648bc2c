#!/usr/bin/env bash
# Boots real Linux guests (stock Debian kernel, busybox initramfs) under QEMU
# TCG with a file-backed RAM and keeps each guest's RAM as a raw image, with
# its CPU registers and QEMU's `info tlb` taken while it was stopped.
#
#   benches/guest/boot_guest.sh [--out DIR] [--mem MiB] [--clones N]
#                               [--mode auto|boot|copy] [--jobs J]
#                               [--timeout S] [--cpu MODEL] [--force]
#
#   --out DIR     where the images go (default: target/guest-images under the
#                 repository root; /target is ignored by git)
#   --mem MiB     guest RAM per VM (default 256). Above ~3 GiB the pc machine
#                 puts part of it above 4 GiB; see DIR/layout.txt.
#   --clones N    number of VMs, images DIR/ram-0.img .. ram-(N-1).img
#                 (default 4)
#   --mode M      boot: boot every VM separately (own KASLR layout, own
#                 random and timing-dependent pages); copy: boot one, copy its
#                 image N-1 times; auto (default): boot the first and, if it
#                 was ready in under 60 s, boot the others too, else copy.
#   --jobs J      guests booted at once in boot mode (default 1; TCG runs one
#                 host thread per guest)
#   --timeout S   seconds to wait for a guest's ready marker (default 300)
#   --cpu MODEL   QEMU -cpu model (default qemu64: 4-level paging, no LA57)
#   --force       ignore the cache and boot again
#
# Per VM i, DIR holds: ram-i.img (raw RAM, byte o of the file = the o-th byte
# of guest RAM, see layout.txt for the GPA of each part), registers-i.txt
# (`info registers`), tlb-i.txt (`info tlb`: the mappings of the CR3 at stop),
# mem-i.txt (`info mem`), mtree-i.txt (`info mtree -f`), serial-i.log (guest
# console) and boot-i.txt (timing). registers.txt and tlb.txt link to VM 0's.
# DIR/README.txt says how the images were made. A second run with the same
# parameters, kernel, busybox, QEMU and init reuses them ("cached").
#
# Needs root for apt (installs qemu-system-x86 if QEMU is missing; the kernel
# and busybox-static are only downloaded with `apt-get download` and unpacked
# into target/guest-cache, nothing is installed for them) and python3 (QMP
# client). Override the cache with PAGEFOLD_GUEST_CACHE=DIR.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$script_dir/../.." && pwd)"

out="$repo/target/guest-images"
mem=256
clones=4
mode=auto
jobs=1
timeout=300
cpu=qemu64
force=0
auto_limit=60

die() { echo "boot_guest: error: $*" >&2; exit 1; }
say() { echo "boot_guest: $*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

while (($#)); do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --mem) mem="${2:?--mem needs MiB}"; shift 2 ;;
        --clones) clones="${2:?--clones needs a count}"; shift 2 ;;
        --mode) mode="${2:?--mode needs auto, boot or copy}"; shift 2 ;;
        --jobs) jobs="${2:?--jobs needs a count}"; shift 2 ;;
        --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
        --cpu) cpu="${2:?--cpu needs a model}"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
{ is_uint "$mem" && ((mem >= 64)); } || die "--mem must be a whole number of MiB, at least 64"
{ is_uint "$clones" && ((clones >= 1)); } || die "--clones must be at least 1"
{ is_uint "$jobs" && ((jobs >= 1)); } || die "--jobs must be at least 1"
{ is_uint "$timeout" && ((timeout >= 1)); } || die "--timeout must be whole seconds"
[[ "$mode" == auto || "$mode" == boot || "$mode" == copy ]] || die "--mode must be auto, boot or copy"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
cache="${PAGEFOLD_GUEST_CACHE:-$repo/target/guest-cache}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

# ---------------------------------------------------------------- tools --

apt_updated=0
apt_update_once() {
    if ((apt_updated == 0)); then
        say "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed (no access to the Debian mirrors?)"
        apt_updated=1
    fi
}

ensure_qemu() {
    if ! command -v qemu-system-x86_64 >/dev/null; then
        ((EUID == 0)) || die "qemu-system-x86_64 is missing; run as root or install qemu-system-x86"
        say "installing qemu-system-x86"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2 \
            || die "could not install qemu-system-x86"
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 still missing"
    qemu_version="$(qemu-system-x86_64 --version | sed -n 1p)"
}

ensure_python() {
    command -v python3 >/dev/null || die "python3 is needed for the QMP client"
}

# apt_fetch PKG DIR: downloads PKG's .deb into DIR (apt-get download: no
# install, no maintainer scripts), updating the package lists once if needed.
apt_fetch() {
    local pkg="$1" dir="$2"
    command -v apt-get >/dev/null || die "apt-get missing; cannot fetch $pkg"
    rm -f "$dir"/*.deb
    if ! (cd "$dir" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
        apt_update_once
        (cd "$dir" && apt-get download -qq "$pkg" >&2 2>/dev/null) || die "could not download $pkg"
    fi
    compgen -G "$dir/*.deb" >/dev/null || die "apt-get download $pkg left no .deb"
}

ensure_kernel() {
    local dir="$cache/kernel" pkg
    mkdir -p "$dir"
    if ! compgen -G "$dir/vmlinuz-*" >/dev/null; then
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ && !n++ {print $2}')"
        if [[ -z "$pkg" ]]; then
            apt_update_once
            pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ && !n++ {print $2}')"
        fi
        [[ -n "$pkg" ]] || die "cannot resolve linux-image-amd64 to a kernel package"
        say "downloading $pkg (only vmlinuz and config are unpacked)"
        apt_fetch "$pkg" "$dir"
        dpkg-deb --fsys-tarfile "$dir"/*.deb | tar -x -C "$dir" --strip-components=2 \
            --wildcards './boot/vmlinuz-*' './boot/config-*' \
            || die "could not unpack the kernel from $(basename "$dir"/*.deb)"
        dpkg-deb -f "$dir"/*.deb Package Version >"$dir/package.txt"
        rm -f "$dir"/*.deb
    fi
    kernel="$(compgen -G "$dir/vmlinuz-*" | sort -V | tail -n1)"
    [[ -s "$kernel" ]] || die "no kernel in $dir"
    kernel_version="$(basename "$kernel" | sed 's/^vmlinuz-//') ($(awk '{printf "%s%s", (NR > 1 ? " " : ""), $2}' "$dir/package.txt" 2>/dev/null))"
}

ensure_busybox() {
    local dir="$cache/busybox"
    mkdir -p "$dir"
    if [[ ! -x "$dir/busybox" ]]; then
        say "downloading busybox-static"
        apt_fetch busybox-static "$dir"
        dpkg-deb --fsys-tarfile "$dir"/*.deb | tar -x -O ./bin/busybox >"$dir/busybox.tmp" \
            || die "could not unpack busybox from the busybox-static package"
        chmod 755 "$dir/busybox.tmp"
        dpkg-deb -f "$dir"/*.deb Package Version >"$dir/package.txt"
        rm -f "$dir"/*.deb
        mv "$dir/busybox.tmp" "$dir/busybox"
    fi
    busybox="$dir/busybox"
    busybox_version="$({ "$busybox" --help 2>&1 || true; } | sed -n '1s/ multi-call binary\.$//p')"
}

# ------------------------------------------------------------ initramfs --

# The guest's /init. Leaves a realistically used memory behind: page cache of
# the unpacked initramfs, tmpfs files (several copies of one binary, text,
# compressed data, guest-unique random data), dentry/inode/slab caches from
# walking /proc and /sys, long-lived processes with anonymous memory, and the
# freed (not zeroed) pages of everything that ran and exited.
init_script() {
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
grep -E '^(MemTotal|MemFree|MemAvailable|Buffers|Cached|Shmem|AnonPages|Slab):' /proc/meminfo
echo "pagefold-guest: $(cut -d' ' -f1 /proc/uptime)s"
echo PAGEFOLD-GUEST-READY
while :; do sleep 3600; done
INIT
}

build_initrd() {
    local root="$cache/initrd-root.$$"
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
    (cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) \
        | gzip -9 -n >"$cache/initrd.gz.tmp" || die "could not build the initramfs"
    mv "$cache/initrd.gz.tmp" "$cache/initrd.gz"
    rm -rf "$root"
    initrd="$cache/initrd.gz"
}

# ----------------------------------------------------------------- boot --

# The QMP client: stops the guest, saves the monitor's view of it, quits.
qmp_py='
import json, socket, sys
sock_path, out, idx = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(120)
s.connect(sock_path)
f = s.makefile("rwb", buffering=0)
def recv():
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("QMP connection closed")
        msg = json.loads(line)
        if "event" in msg:
            continue
        return msg
def cmd(name, **args):
    req = {"execute": name}
    if args:
        req["arguments"] = args
    f.write((json.dumps(req) + "\n").encode())
    r = recv()
    if "error" in r:
        raise SystemExit("QMP %s: %s" % (name, r["error"]))
    return r["return"]
recv()  # greeting
cmd("qmp_capabilities")
cmd("stop")
for what, file in (("info registers", "registers"), ("info tlb", "tlb"),
                   ("info mem", "mem"), ("info mtree -f", "mtree")):
    text = cmd("human-monitor-command", **{"command-line": what}).replace("\r\n", "\n")
    with open("%s/%s-%s.txt" % (out, file, idx), "w") as g:
        g.write(text)
try:
    cmd("quit")
except SystemExit:
    pass
'

# boot_one I: boots VM I into DIR/ram-I.img and saves its monitor output.
boot_one() {
    local i="$1" ram="$out/ram-$1.img" tmp="$out/ram-$1.img.part"
    local sock="$out/.qmp-$1.sock" serial="$out/serial-$1.log" pidf="$out/.qemu-$1.pid"
    local start now elapsed qpid rc=0
    rm -f "$ram" "$tmp" "$sock" "$serial" "$pidf" "$out/done-$i" \
        "$out"/{registers,tlb,mem,mtree,boot}-"$i".txt
    start="$(date +%s.%N)"
    qemu-system-x86_64 -accel tcg -cpu "$cpu" -smp 1 -m "${mem}M" \
        -object "memory-backend-file,id=ram,size=${mem}M,mem-path=$tmp,share=on" \
        -machine pc,memory-backend=ram \
        -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 quiet" \
        -nodefaults -display none -no-reboot \
        -serial "file:$serial" -qmp "unix:$sock,server=on,wait=off" \
        -pidfile "$pidf" >"$out/qemu-$i.log" 2>&1 &
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
    if ! python3 -c "$qmp_py" "$sock" "$out" "$i" >&2; then
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
        say "VM $i: the QMP client failed"
        return 1
    fi
    wait "$qpid" || rc=$?
    ((rc == 0)) || { say "VM $i: QEMU exited with $rc after quit"; return 1; }
    rm -f "$sock" "$pidf"
    [[ "$(stat -c %s "$tmp")" == "$((mem * 1024 * 1024))" ]] || { say "VM $i: image has the wrong size"; return 1; }
    mv "$tmp" "$ram"
    {
        echo "ready_after_s=$elapsed"
        echo "booted=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "guest_uptime_at_ready_s=$(tr -d '\r' <"$serial" | sed -n 's/^pagefold-guest: \([0-9.]*\)s$/\1/p' | tail -n1)"
        echo "allocated_bytes=$(($(stat -c %b "$ram") * $(stat -c %B "$ram")))"
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
    for f in registers tlb mem mtree; do cp "$out/$f-0.txt" "$out/$f-$i.txt"; done
    cp "$out/serial-0.log" "$out/serial-$i.log"
    echo "copy_of=0" >"$out/boot-$i.txt"
    echo "$key" >"$out/done-$i"
}

is_done() { [[ -f "$out/done-$1" && "$(cat "$out/done-$1")" == "$key" && -f "$out/ram-$1.img" ]]; }

# ------------------------------------------------------------- layout --

# The GPA ranges that map the backend (file offsets), from `info mtree -f`:
# flat-view lines for region "ram" read "START-END (prio P, ram): ram @OFFSET".
write_layout() {
    {
        echo "# Guest-physical layout of ram-*.img (QEMU pc machine, -m ${mem}M)."
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
        echo "Kernel:     $kernel_version, command line 'console=ttyS0 quiet' (KASLR on)"
        echo "Initramfs:  $busybox_version; /init is in boot_guest.sh (init_script)"
        echo "QEMU:       $qemu_version, -accel tcg -cpu $cpu -smp 1 -machine pc,"
        echo "            RAM = memory-backend-file (share=on) = the image file"
        echo "Snapshot:   taken after the guest printed PAGEFOLD-GUEST-READY: QMP 'stop',"
        echo "            then info registers / tlb / mem / mtree -f, then 'quit'."
        echo "Layout:     layout.txt (GPA ranges of the image)"
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
        if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == qemu-system-x86* ]]; then
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
ensure_busybox

init_hash="$(init_script | sha256sum | cut -c1-16)"
script_hash="$(sed -n '/^qmp_py=/,/^'"'"'$/p' "$0" | sha256sum | cut -c1-16)"
key="mem=${mem}M cpu=$cpu kernel=$kernel_version busybox=$busybox_version qemu=$qemu_version init=$init_hash qmp=$script_hash"

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
        rm -f "$f" "$out/done-$n" "$out"/{registers,tlb,mem,mtree,boot}-"$n".txt "$out/serial-$n.log"
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
    ln -sf registers-0.txt "$out/registers.txt"
    ln -sf tlb-0.txt "$out/tlb.txt"
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
if [[ "$mode" == auto ]]; then
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
ln -sf registers-0.txt "$out/registers.txt"
ln -sf tlb-0.txt "$out/tlb.txt"
say "done in $(($(date +%s) - t0))s: $how"
ls -1 "$out"/ram-*.img

"""Ground truth from a stopped QEMU guest, for boot_guest.sh.

    capture.py snapshot --qmp SOCK --out DIR --idx I
        x86_64: QMP `stop`, then `info registers` / `tlb` / `mem` /
        `mtree -f` into DIR/{registers,tlb,mem,mtree}-I.txt, then `quit`.

    capture.py truth --arch aarch64|riscv64 --qmp SOCK --gdb SOCK --out DIR
                     --idx I --serial LOG --ram IMG --ram-base GPA
                     [--samples N] [--seed S]
        QMP `stop`; the paging registers from the gdbstub (target
        description read by name) into DIR/paging-I.txt and every register
        the stub reads into DIR/sysregs-I.txt; `info registers` and
        `info mtree -f` (and `info mem` where the target has it); then QEMU's
        `gva2gpa` for N sampled virtual addresses (DIR/gva2gpa-I.txt) in
        several privilege contexts, each set through the gdbstub (PSTATE on
        AArch64, the privilege mode and sstatus.SUM on RISC-V) and restored
        afterwards; then `quit`. Where the addresses come from: the
        `pagefold-hint:` lines the guest's /init printed (maps of its
        processes, kernel symbols, vmalloc areas), the registers, kernel
        pointers read out of the RAM image (which give the linear map's
        offset), random addresses in both halves, and non-canonical ones.

What QEMU 7.2's `gva2gpa` (cpu_get_phys_page_debug: a data load in the
current privilege's translation regime) checks, which a test comparing a
walker with these answers must model:
- AArch64 (target/arm/ptw.c, `in_debug`): the EL's regime, TxSZ, TBI, EPDn,
  the read permission with PSTATE.PAN, the output-address size; NOT the
  access flag (a leaf with AF clear translates; nothing is written).
- RISC-V (target/riscv/cpu_helper.c, `is_debug`): U pages only in U-mode
  and not-U pages only in S-mode, R (or X with sstatus.MXR), reserved bits;
  sstatus.SUM is taken as SET in debug walks (`sum = ... || is_debug`), so
  the `s` and `ssum` contexts answer alike; and a leaf with A clear has A SET
  in guest memory by the walk (fixed in QEMU 8.0), so the saved image has A
  set wherever QEMU translated. In M-mode no translation applies, which is
  why a stop in M-mode gives no `stop` context.

Every failure exits non-zero with a message naming what failed.
"""

import argparse
import collections
import os
import random
import re
import sys
import time

# No __pycache__ beside the scripts in the source tree.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gdb_rsp import Gdb, GdbError  # noqa: E402
from qmp import Qmp, QmpError  # noqa: E402

PAGE = 4096
MASK64 = (1 << 64) - 1


def fail(msg):
    sys.stderr.write("capture: error: %s\n" % msg)
    sys.exit(1)


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ x86 --


def snapshot(args):
    q = Qmp(args.qmp)
    q.cmd("stop")
    for what, name in (("info registers", "registers"), ("info tlb", "tlb"),
                       ("info mem", "mem"), ("info mtree -f", "mtree")):
        with open("%s/%s-%s.txt" % (args.out, name, args.idx), "w") as g:
            g.write(q.hmp(what))
    try:
        q.cmd("quit")
    except QmpError:
        pass


# ------------------------------------------------------ architectures --


class Arch:
    """What differs between the targets: register names, contexts."""

    name = ""
    # (canonical name, names the gdbstub may use), in paging-I.txt order.
    paging = ()
    optional = ()

    def contexts(self, regs):
        """[(name, {register: value})] to set before each pass."""
        raise NotImplementedError

    def kernel_context(self, contexts):
        raise NotImplementedError

    def va_bits(self, regs):
        raise NotImplementedError


class Aarch64(Arch):
    name = "aarch64"
    paging = (
        ("SCTLR_EL1", ("SCTLR_EL1", "SCTLR")),
        ("TCR_EL1", ("TCR_EL1",)),
        ("TTBR0_EL1", ("TTBR0_EL1",)),
        ("TTBR1_EL1", ("TTBR1_EL1",)),
        ("MAIR_EL1", ("MAIR_EL1",)),
        ("ID_AA64MMFR0_EL1", ("ID_AA64MMFR0_EL1",)),
        ("PSTATE", ("cpsr",)),
        ("PC", ("pc",)),
        ("SP", ("sp",)),
    )
    optional = (
        ("ID_AA64MMFR1_EL1", ("ID_AA64MMFR1_EL1",)),
        ("ID_AA64MMFR2_EL1", ("ID_AA64MMFR2_EL1",)),
        ("VBAR_EL1", ("VBAR_EL1", "VBAR")),
        ("SP_EL0", ("SP_EL0",)),
        ("SP_EL1", ("SP_EL1",)),
        ("TPIDR_EL1", ("TPIDR_EL1",)),
        ("ELR_EL1", ("ELR_EL1",)),
        ("FAR_EL1", ("FAR_EL1",)),
    )
    PAN = 1 << 22

    def contexts(self, regs):
        stop = regs["PSTATE"]
        el1 = 0x3C5  # EL1h, DAIF masked
        return [
            ("stop", {"cpsr": stop}),
            ("el1", {"cpsr": el1}),
            ("el1pan", {"cpsr": el1 | self.PAN}),
            ("el0", {"cpsr": 0x0}),  # EL0t
        ]

    def kernel_context(self, contexts):
        return "el1"

    def va_bits(self, regs):
        tcr = regs["TCR_EL1"]
        return 64 - (tcr & 0x3F), 64 - ((tcr >> 16) & 0x3F)

    def extra(self, regs):
        pstate = regs["PSTATE"]
        return ["EL %d" % ((pstate >> 2) & 3), "PAN %d" % ((pstate >> 22) & 1)]


class Riscv64(Arch):
    name = "riscv64"
    paging = (
        ("satp", ("satp",)),
        ("sstatus", ("sstatus",)),
        ("mstatus", ("mstatus",)),
        ("priv", ("priv",)),
        ("PC", ("pc",)),
        ("SP", ("sp",)),
    )
    optional = (
        ("menvcfg", ("menvcfg",)),
        ("senvcfg", ("senvcfg",)),
        ("stvec", ("stvec",)),
        ("sscratch", ("sscratch",)),
        ("tp", ("tp",)),
        ("misa", ("misa",)),
    )
    SUM = 1 << 18

    def contexts(self, regs):
        sst = regs["sstatus"]
        out = []
        if regs["priv"] in (0, 1):
            out.append(("stop", {"priv": regs["priv"], "sstatus": sst}))
        out += [
            ("s", {"priv": 1, "sstatus": sst & ~self.SUM}),
            ("ssum", {"priv": 1, "sstatus": sst | self.SUM}),
            ("u", {"priv": 0, "sstatus": sst}),
        ]
        return out

    def kernel_context(self, contexts):
        return "s"

    def va_bits(self, regs):
        mode = regs["satp"] >> 60
        bits = {8: 39, 9: 48, 10: 57}.get(mode, 39)
        return bits, bits

    def extra(self, regs):
        mode = regs["satp"] >> 60
        return ["satp_mode %s" % {0: "bare", 8: "sv39", 9: "sv48", 10: "sv57"}.get(mode, str(mode))]


ARCHES = {"aarch64": Aarch64(), "riscv64": Riscv64()}


# ---------------------------------------------------------------- hints --


class Hints:
    """What the guest's /init printed on the console."""

    def __init__(self, serial):
        self.maps = []  # (pid, start, end, perms, rest)
        self.ksyms = {}  # name -> addr
        self.vmalloc = []  # (start, end, rest)
        self.layout = []  # (name, start, end)
        self.iomem = []  # (start, end, name), physical
        self.ttbr0_pid = None
        try:
            with open(serial, "rb") as f:
                text = f.read().decode("latin-1").replace("\r", "")
        except OSError as e:
            fail("cannot read the console log %s: %s" % (serial, e))
        for line in text.split("\n"):
            i = line.find("pagefold-hint: ")
            if i < 0:
                continue
            kind, _, rest = line[i + 15:].partition(" ")
            if kind == "busy":
                self.ttbr0_pid = rest.split()[0] if rest.split() else None
            elif kind == "maps":
                m = re.match(r"(\d+) ([0-9a-f]+)-([0-9a-f]+) (\S+)(.*)", rest)
                if m:
                    self.maps.append((m.group(1), int(m.group(2), 16), int(m.group(3), 16),
                                      m.group(4), m.group(5).strip()))
            elif kind == "ksym":
                m = re.match(r"([0-9a-f]+) \S (\S+)", rest)
                if m and int(m.group(1), 16):
                    self.ksyms.setdefault(m.group(2), int(m.group(1), 16))
            elif kind == "vmalloc":
                m = re.match(r"0x([0-9a-f]+)-0x([0-9a-f]+)\s+(.*)", rest)
                if m:
                    self.vmalloc.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
            elif kind == "iomem":
                m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : (.*)", rest)
                if m:
                    self.iomem.append((int(m.group(1), 16), int(m.group(2), 16) + 1, m.group(3).strip()))
            elif kind == "layout":
                m = re.match(r"\s*(\S+)\s*:\s*0x([0-9a-f]+)\s*-\s*0x([0-9a-f]+)", rest)
                if m:
                    self.layout.append((m.group(1), int(m.group(2), 16), int(m.group(3), 16)))


# -------------------------------------------------------------- sampling --


class Sampler:
    """An ordered set of (VA, tag)."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.seen = {}

    def add(self, va, tag):
        va &= MASK64
        if va not in self.seen:
            self.seen[va] = tag

    def page(self, va, tag):
        """One address in the page of `va`, at an offset that varies."""
        base = va & ~(PAGE - 1) & MASK64
        self.add(base | (((base >> 12) * 0x238) & 0xFF8), tag)

    def sweep(self, start, end, tag, step=PAGE):
        """Every `step` from start (page-aligned) up to end (exclusive)."""
        va = start & ~(PAGE - 1)
        while va < end:
            self.page(va, tag)
            va += step

    def around(self, va, before, after, tag):
        self.sweep(va - before * PAGE, va + (after + 1) * PAGE, tag)

    def mapping(self, start, end, tag, dense=256, edge=32, inside=64):
        """A mapping [start, end): all of it if small, else its edges and
        random pages inside; plus 4 pages either side."""
        pages = (end - start) // PAGE
        if pages <= dense:
            self.sweep(start, end, tag)
        else:
            self.sweep(start, start + edge * PAGE, tag)
            self.sweep(end - edge * PAGE, end, tag)
            for _ in range(inside):
                self.page(start + self.rng.randrange(pages) * PAGE, tag)
        self.sweep(start - 4 * PAGE, start, tag + "-before")
        self.sweep(end, end + 4 * PAGE, tag + "-after")

    def random_in(self, lo, hi, n, tag):
        if hi <= lo:
            return
        for _ in range(n):
            self.add(lo + self.rng.randrange(hi - lo), tag)


class Truth:
    """gva2gpa through QMP, with the contexts set through the gdbstub."""

    def __init__(self, qmp, gdb):
        self.qmp = qmp
        self.gdb = gdb

    def set_context(self, values):
        for name, value in values.items():
            self.gdb.write_name(name, value)

    def query(self, vas):
        out = []
        texts = self.qmp.hmp_many(["gva2gpa 0x%x" % va for va in vas])
        for va, text in zip(vas, texts):
            t = text.strip()
            m = re.match(r"gpa: 0x([0-9a-f]+)$", t)
            if m:
                out.append(int(m.group(1), 16))
            elif t == "Unmapped":
                out.append(None)
            else:
                out.append("error:" + re.sub(r"\s+", "_", t)[:120])
        return out


def read_phys(ram, ram_base, pa, n):
    off = pa - ram_base
    if off < 0:
        return b""
    ram.seek(off)
    return ram.read(n)


def is_pointer(v, kernel_lo, kernel_hi):
    """A kernel-half value outside the kernel image."""
    return v >> 63 and not (kernel_lo <= v < kernel_hi)


def linear_offset(truth, ram, ram_base, mem, kernel_lo, kernel_hi, seeds, sampler):
    """The linear map's VA - PA: the value most kernel pointers agree on.
    The pointers: `seeds` (registers, words of kernel data), then the words
    of the pages the first ones point to. Returns (offset or None, number
    of pointers tried)."""
    votes = collections.Counter()
    tried = set()
    level = [v & MASK64 for v in seeds]
    for depth in range(2):
        cands = []
        for v in level:
            if is_pointer(v, kernel_lo, kernel_hi) and v not in tried:
                tried.add(v)
                cands.append(v)
        cands = cands[:4000]
        pas = truth.query(cands)
        level = []
        pages = 0
        for v, pa in zip(cands, pas):
            if not isinstance(pa, int):
                continue
            sampler.around(v, 1, 1, "kptr")
            if ram_base <= pa < ram_base + mem:
                votes[(v - pa) & MASK64] += 1
                if depth == 0 and pages < 64:
                    pages += 1
                    data = read_phys(ram, ram_base, pa & ~(PAGE - 1), PAGE)
                    level += [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - 7, 8)]
    if not votes:
        return None, len(tried)
    best, n = votes.most_common(1)[0]
    return (best if n >= 3 else None), len(tried)


def truth_main(args):
    arch = ARCHES[args.arch]
    t0 = time.time()
    q = Qmp(args.qmp)
    q.cmd("stop")
    try:
        g = Gdb(args.gdb)
    except (GdbError, OSError) as e:
        fail("gdbstub %s: %s" % (args.gdb, e))
    t_stop = time.time()

    # Registers.
    regs = {}
    names = {}
    for canon, aliases in arch.paging:
        try:
            names[canon], regs[canon] = g.read_name(*aliases)
        except GdbError as e:
            fail("paging register %s: %s" % (canon, e))
    for canon, aliases in arch.optional:
        try:
            names[canon], regs[canon] = g.read_name(*aliases)
        except GdbError:
            pass
    dump = []
    for r in g.regs:
        if r.bitsize > 64 or r.feature.endswith(("fpu", "fp", "sve", "vector")):
            continue
        v = g.read(r)
        if v is not None:
            dump.append("%s 0x%x %s" % (r.name, v, r.feature or "-"))
    write(os.path.join(args.out, "sysregs-%s.txt" % args.idx),
          "# every register QEMU's gdbstub read at the stop: NAME VALUE FEATURE\n" + "\n".join(dump) + "\n")
    lines = ["arch %s" % arch.name]
    for canon, _ in arch.paging + arch.optional:
        if canon in regs:
            lines.append("%s 0x%x" % (canon, regs[canon]))
        else:
            lines.append("%s absent" % canon)
    lines += arch.extra(regs)
    lines.append("ram_base 0x%x" % args.ram_base)
    lines.append("ram_size 0x%x" % args.mem)
    write(os.path.join(args.out, "paging-%s.txt" % args.idx),
          "# paging registers of the stopped guest (QEMU gdbstub); '<name> absent': the stub has none\n"
          + "\n".join(lines) + "\n")
    for what, name in (("info registers", "registers"), ("info mtree -f", "mtree"), ("info mem", "mem")):
        write(os.path.join(args.out, "%s-%s.txt" % (name, args.idx)), q.hmp(what))
    t_regs = time.time()

    # Samples.
    hints = Hints(args.serial)
    truth = Truth(q, g)
    s = Sampler(args.seed)
    contexts = arch.contexts(regs)
    kctx = dict(contexts)[arch.kernel_context(contexts)]
    lo_bits, hi_bits = arch.va_bits(regs)
    lo_top = 1 << lo_bits
    hi_start = (MASK64 << hi_bits) & MASK64

    try:
        ram = open(args.ram, "rb")
    except OSError as e:
        fail("cannot read the RAM image %s: %s" % (args.ram, e))

    truth.set_context(kctx)
    # The process whose tables TTBR0/satp holds (the busy one) first.
    for pid, start, end, perms, rest in sorted(hints.maps, key=lambda m: m[0] != hints.ttbr0_pid):
        tag = "user" if pid == hints.ttbr0_pid else "user-other"
        s.mapping(start, end, tag)
    ks = hints.ksyms
    # The kernel image: /proc/iomem's "Kernel code" .. "Kernel bss" (or
    # "Kernel data"), physical, moved by the image's VA - PA (from _stext).
    kernel_lo = kernel_hi = 0
    image = [(a, b) for a, b, name in hints.iomem if name.startswith("Kernel ")]
    anchor = ks.get("_stext") or ks.get("_text")
    if image and anchor:
        pa = truth.query([anchor])[0]
        if isinstance(pa, int):
            voff = (anchor - pa) & MASK64
            kernel_lo = (min(a for a, _ in image) + voff) & MASK64
            kernel_hi = (max(b for _, b in image) + voff) & MASK64
    for name, va in ks.items():
        s.around(va, 8, 8, "ksym")
    if kernel_lo and kernel_hi > kernel_lo:
        s.sweep(kernel_lo, kernel_hi, "kimage", step=64 * 1024)
        s.random_in(kernel_lo, kernel_hi, 1000, "kimage")
        s.around(kernel_hi, 16, 16, "kimage-end")
        s.around(kernel_lo, 16, 16, "kimage-start")
    for start, end, rest in hints.vmalloc:
        s.mapping(start, end, "vmalloc", dense=16, edge=4, inside=8)
    for name, start, end in hints.layout:
        s.around(start, 4, 4, "layout-" + name)
        s.around(end, 4, 4, "layout-" + name)
        s.random_in(start, end, 20, "layout-" + name)
    for canon, v in regs.items():
        if canon in ("PC", "SP", "VBAR_EL1", "SP_EL0", "SP_EL1", "ELR_EL1", "FAR_EL1", "stvec", "sscratch", "tp"):
            s.around(v, 8, 8, "reg-" + canon)

    # Kernel pointers: registers, and words at a few kernel data symbols.
    seeds = list(regs.values())
    for r in dump:
        seeds.append(int(r.split()[1], 16))
    for name in ("init_task", "init_mm", "init_cred", "init_pid_ns"):
        va = ks.get(name)
        if va is None:
            continue
        pa = truth.query([va])[0]
        if isinstance(pa, int):
            data = read_phys(ram, args.ram_base, pa, 4096 - (pa & 0xFFF))
            seeds += [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - 7, 8)]
    lin, n_cands = linear_offset(truth, ram, args.ram_base, args.mem, kernel_lo, kernel_hi, seeds, s)
    lin_text = "none found among %d kernel pointers" % n_cands
    if lin is not None:
        lin_text = "0x%x (the most common of %d kernel pointers)" % (lin, n_cands)
        lva = (args.ram_base + lin) & MASK64
        s.mapping(lva, lva + args.mem, "linear", dense=0, edge=64, inside=0)
        s.sweep(lva, lva + args.mem, "linear", step=1 << 21)
        s.random_in(lva, lva + args.mem, 1500, "linear")

    # Random addresses: both halves, the whole 64-bit space, tagged user
    # addresses (the top byte is ignored under TBI), special values.
    s.random_in(0, lo_top, 800, "rand-lo")
    s.random_in(hi_start, 1 << 64, 800, "rand-hi")
    s.random_in(0, 1 << 64, 400, "rand-any")
    s.random_in(lo_top, hi_start, 200, "noncanon")
    # Tagged addresses: the top byte changed, bit 55 (the range) kept.
    for want in ("user", "linear", "kimage"):
        some = [va for va, tag in s.seen.items() if tag == want]
        for va in some[:: max(1, len(some) // 150)]:
            s.add((va & ((1 << 56) - 1)) | (s.rng.randrange(0, 256) << 56), "tagged-" + want)
    for va in (0, 1 << 63, MASK64, lo_top - 1, lo_top, hi_start - 1, hi_start, (1 << 55), (1 << 55) - 1):
        s.add(va, "edge")
    # Fill up to the number asked for with random pages of what mapped.
    fill = [(start, end) for _, start, end, _, _ in hints.maps]
    if lin is not None:
        fill.append(((args.ram_base + lin) & MASK64, (args.ram_base + lin + args.mem) & MASK64))
    if kernel_lo and kernel_hi > kernel_lo:
        fill.append((kernel_lo, kernel_hi))
    fill += [(a, b) for a, b, _ in hints.vmalloc]
    tries = 0
    while len(s.seen) < args.samples and fill and tries < 50 * args.samples:
        tries += 1
        a, b = s.rng.choice(fill)
        if b > a:
            s.page(a + s.rng.randrange(max(1, (b - a) // PAGE)) * PAGE, "fill")
    if len(s.seen) < args.samples:
        s.random_in(0, 1 << 64, args.samples - len(s.seen), "rand-any")
    t_sample = time.time()

    # Queries, one pass per context; the stop's values restored after.
    vas = list(s.seen)
    out = ["# pagefold ground truth: QEMU's HMP 'gva2gpa VA' on the stopped guest (a data read at",
           "# the context's privilege; see DIR/README.txt). Per context, the registers set through",
           "# the gdbstub before its pass (the others as at the stop). Lines: CONTEXT VA RESULT TAG,",
           "# RESULT = the physical address, 'unmapped', or 'error:TEXT'.",
           "# linear map offset (VA - PA): %s" % lin_text]
    for name, values in contexts:
        out.append("context %s %s" % (name, " ".join("%s=0x%x" % kv for kv in values.items())))
    counts = []
    for name, values in contexts:
        truth.set_context(values)
        res = truth.query(vas)
        mapped = 0
        for va, r in zip(vas, res):
            if isinstance(r, int):
                mapped += 1
                text = "0x%x" % r
            elif r is None:
                text = "unmapped"
            else:
                text = r
            out.append("%s %016x %s %s" % (name, va, text, s.seen[va]))
        counts.append("%s: %d mapped, %d not" % (name, mapped, len(vas) - mapped))
    stop = dict(contexts).get("stop")
    if stop is not None:
        truth.set_context(stop)
    else:
        truth.set_context({k: regs[k] for k in ("priv", "sstatus") if k in regs})
    write(os.path.join(args.out, "gva2gpa-%s.txt" % args.idx), "\n".join(out) + "\n")
    t_query = time.time()
    ram.close()

    summary = [
        "addresses %d" % len(vas),
        "contexts %s" % " ".join(n for n, _ in contexts),
        "queries %d" % (len(vas) * len(contexts)),
        "linear_offset %s" % lin_text,
    ] + ["counts %s" % c for c in counts] + [
        "seconds_registers %.2f" % (t_regs - t_stop),
        "seconds_sampling %.2f" % (t_sample - t_regs),
        "seconds_queries %.2f" % (t_query - t_sample),
        "seconds_total %.2f" % (t_query - t0),
    ]
    write(os.path.join(args.out, "capture-%s.txt" % args.idx), "\n".join(summary) + "\n")
    sys.stderr.write("capture: VM %s: %s\n" % (args.idx, "; ".join(summary)))
    try:
        q.cmd("quit")
    except QmpError:
        pass
    g.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("snapshot")
    a.add_argument("--qmp", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--idx", required=True)
    b = sub.add_parser("truth")
    b.add_argument("--arch", required=True, choices=sorted(ARCHES))
    b.add_argument("--qmp", required=True)
    b.add_argument("--gdb", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--idx", required=True)
    b.add_argument("--serial", required=True)
    b.add_argument("--ram", required=True)
    b.add_argument("--ram-base", required=True, type=lambda v: int(v, 0))
    b.add_argument("--mem", required=True, type=lambda v: int(v, 0), help="RAM bytes")
    b.add_argument("--samples", type=int, default=12000)
    b.add_argument("--seed", type=int, default=17)
    args = p.parse_args()
    try:
        if args.what == "snapshot":
            snapshot(args)
        else:
            truth_main(args)
    except (QmpError, GdbError, OSError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()

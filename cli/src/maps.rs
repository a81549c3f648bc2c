//! `pagefold maps` and `pagefold translate`: the guest's page tables read
//! out of a raw RAM image with the library's walker — every mapping of an
//! address space (as text, JSON lines, or QEMU's `info tlb` lines), or the
//! translation of one virtual address (or the fault it takes) — for an
//! x86-64, AArch64 or RISC-V guest (`--arch`), from that architecture's
//! registers.

use std::{
    error::Error,
    fs::File,
    io::{self, BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, ValueEnum};
use pagefold::paging::{
    Aarch64Paging, Access, AccessKind, Arch, ArchAttributes, FaultCode, FaultReason, GuestPaging,
    Mapping, PhysImage, RiscvPaging, Translation, WalkFault, Walker, X86Mode, X86Paging,
};
use pagefold::{GuestPhysAddr, GuestVirtAddr};
use serde::Serialize;

/// Exit status of `translate` when the address does not translate.
pub(crate) const EXIT_FAULT: u8 = 3;

/// At most this many walker errors are printed one by one; the rest are
/// only counted.
const MAX_ERRORS_SHOWN: u64 = 100;

/// A hexadecimal number, with or without `0x`; `_` may separate digits.
pub(crate) fn parse_hex(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t)
        .replace('_', "");
    if digits.is_empty() {
        return Err(format!("'{s}' is not a hexadecimal number"));
    }
    u64::from_str_radix(&digits, 16)
        .map_err(|e| format!("'{s}' is not a hexadecimal number of at most 64 bits ({e})"))
}

/// The guest's architecture, for `--arch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ArchArg {
    /// x86-64 (and its 32-bit and PAE modes): --cr3, --cr4, --efer.
    #[value(name = "x86_64", alias = "x86-64")]
    X86_64,
    /// AArch64 EL1&0 stage 1: --tcr, --ttbr0, --ttbr1, --sctlr.
    Aarch64,
    /// RISC-V Sv39/Sv48/Sv57: --satp, --sum, --mxr, --adue.
    Riscv64,
}

/// The guest: its RAM image and its paging registers.
#[derive(Args, Debug, Clone)]
pub(crate) struct GuestArgs {
    /// Raw guest RAM image: byte o of the file is guest-physical address
    /// RAM_BASE + o (a QEMU memory-backend-file, a dump).
    #[arg(long, value_name = "FILE")]
    pub(crate) ram: PathBuf,
    /// Guest-physical address of the image's first byte (hex).
    #[arg(long, value_name = "GPA", value_parser = parse_hex, default_value = "0")]
    pub(crate) ram_base: u64,
    /// The guest's architecture, which says which registers follow
    /// (default: x86_64).
    #[arg(long, value_enum)]
    pub(crate) arch: Option<ArchArg>,
    /// x86: CR3 (hex).
    #[arg(long, value_parser = parse_hex, required_unless_present = "arch", required_if_eq("arch", "x86_64"))]
    pub(crate) cr3: Option<u64>,
    /// x86: CR4 (hex): PSE, PAE, LA57, PCIDE, SMEP, SMAP, PKE matter.
    #[arg(long, value_parser = parse_hex, required_unless_present = "arch", required_if_eq("arch", "x86_64"))]
    pub(crate) cr4: Option<u64>,
    /// x86: IA32_EFER (hex): LME/LMA select long mode, NXE the XD bit.
    #[arg(long, value_parser = parse_hex, required_unless_present = "arch", required_if_eq("arch", "x86_64"))]
    pub(crate) efer: Option<u64>,
    /// x86: CR0 (hex); the default is PE, WP and PG set.
    #[arg(long, value_parser = parse_hex, default_value = "80010001")]
    pub(crate) cr0: u64,
    /// x86: the CPU's physical-address width: entry bits at and above it
    /// are reserved (decimal, 32 to 52).
    #[arg(long, value_name = "BITS", default_value_t = 52)]
    pub(crate) maxphyaddr: u8,
    /// x86: the CPU has no 1 GiB pages: PS in a PDPTE is a reserved bit.
    #[arg(long)]
    pub(crate) no_1g_pages: bool,
    /// AArch64: TCR_EL1 (hex).
    #[arg(long, value_parser = parse_hex, required_if_eq("arch", "aarch64"))]
    pub(crate) tcr: Option<u64>,
    /// AArch64: TTBR0_EL1 (hex).
    #[arg(long, value_parser = parse_hex, required_if_eq("arch", "aarch64"))]
    pub(crate) ttbr0: Option<u64>,
    /// AArch64: TTBR1_EL1 (hex).
    #[arg(long, value_parser = parse_hex, required_if_eq("arch", "aarch64"))]
    pub(crate) ttbr1: Option<u64>,
    /// AArch64: SCTLR_EL1 (hex; M and WXN are read); the default is M set.
    #[arg(long, value_parser = parse_hex, default_value = "1")]
    pub(crate) sctlr: u64,
    /// AArch64: MAIR_EL1 (hex), for the attributes reported.
    #[arg(long, value_parser = parse_hex, default_value = "0")]
    pub(crate) mair: u64,
    /// AArch64: PSTATE.PAN is set.
    #[arg(long)]
    pub(crate) pan: bool,
    /// AArch64: the CPU implements FEAT_LVA (52-bit VAs with the 64 KiB
    /// granule).
    #[arg(long)]
    pub(crate) lva: bool,
    /// AArch64: the CPU implements FEAT_LPA2 (TCR_EL1.DS: 52-bit VAs and
    /// OAs with the 4 and 16 KiB granules).
    #[arg(long)]
    pub(crate) lpa2: bool,
    /// AArch64 and RISC-V: the implemented physical-address size in bits
    /// (AArch64: ID_AA64MMFR0_EL1.PARange's 32, 36, 40, 42, 44, 48 or 52,
    /// default 48; RISC-V: 32..=56, default 56).
    #[arg(long, value_name = "BITS")]
    pub(crate) pa_bits: Option<u8>,
    /// RISC-V: satp (hex): MODE, ASID, root PPN.
    #[arg(long, value_parser = parse_hex, required_if_eq("arch", "riscv64"))]
    pub(crate) satp: Option<u64>,
    /// RISC-V: sstatus.SUM is set (S-mode may read and write U pages).
    #[arg(long)]
    pub(crate) sum: bool,
    /// RISC-V: sstatus.MXR is set (loads may read executable pages).
    #[arg(long)]
    pub(crate) mxr: bool,
    /// RISC-V: Svadu is on (menvcfg.ADUE): the walk may set A and D;
    /// without it a clear A (or D on a write) is a page fault.
    #[arg(long)]
    pub(crate) adue: bool,
    /// RISC-V: Svpbmt is on (menvcfg.PBMTE).
    #[arg(long)]
    pub(crate) pbmte: bool,
    /// RISC-V: the hart implements Svnapot (64 KiB NAPOT pages).
    #[arg(long)]
    pub(crate) svnapot: bool,
}

impl GuestArgs {
    /// The architecture `--arch` names, x86-64 without one.
    pub(crate) fn arch(&self) -> ArchArg {
        self.arch.unwrap_or(ArchArg::X86_64)
    }

    /// The registers of the architecture `--arch` names (clap has checked
    /// that the ones it needs are there).
    fn paging(&self) -> Result<GuestPaging, String> {
        let need = |v: Option<u64>, name: &str| {
            v.ok_or_else(|| format!("--arch {:?} needs --{name}", self.arch()))
        };
        Ok(match self.arch() {
            ArchArg::X86_64 => {
                let (cr3, cr4, efer) = (
                    need(self.cr3, "cr3")?,
                    need(self.cr4, "cr4")?,
                    need(self.efer, "efer")?,
                );
                let mut p =
                    X86Paging::new(self.cr0, cr3, cr4, efer).with_maxphyaddr(self.maxphyaddr);
                p.gbpages = !self.no_1g_pages;
                GuestPaging::X86(p)
            }
            ArchArg::Aarch64 => GuestPaging::Aarch64(Aarch64Paging {
                tcr: need(self.tcr, "tcr")?,
                ttbr0: need(self.ttbr0, "ttbr0")?,
                ttbr1: need(self.ttbr1, "ttbr1")?,
                sctlr: self.sctlr,
                mair: self.mair,
                pan: self.pan,
                pa_bits: self.pa_bits.unwrap_or(48),
                lva: self.lva,
                lpa2: self.lpa2,
            }),
            ArchArg::Riscv64 => GuestPaging::Riscv64(RiscvPaging {
                satp: need(self.satp, "satp")?,
                sum: self.sum,
                mxr: self.mxr,
                adue: self.adue,
                pbmte: self.pbmte,
                svnapot: self.svnapot,
                pa_bits: self.pa_bits.unwrap_or(56),
            }),
        })
    }

    /// The register a listing starts from, for an error message.
    fn root_text(&self) -> String {
        match self.arch() {
            ArchArg::X86_64 => format!("CR3 {:#x}", self.cr3.unwrap_or(0)),
            ArchArg::Aarch64 => format!(
                "TTBR0_EL1 {:#x} / TTBR1_EL1 {:#x}",
                self.ttbr0.unwrap_or(0),
                self.ttbr1.unwrap_or(0)
            ),
            ArchArg::Riscv64 => format!("satp {:#x}", self.satp.unwrap_or(0)),
        }
    }
}

/// How `maps` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum MapsFormat {
    /// One line per mapping: `VA PA SIZE PERMS U/S FLAGS`.
    Text,
    /// JSON lines: one object per mapping.
    Json,
    /// QEMU 7.2's `info tlb` lines, from the leaf entry alone.
    Qemu,
}

/// A read-only mapping of the RAM image.
struct Image {
    map: memmap2::Mmap,
}

impl Image {
    fn open(args: &GuestArgs) -> Result<Self, Box<dyn Error>> {
        let path = &args.ram;
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
            .len();
        if len == 0 {
            return Err(format!("{} is empty", path.display()).into());
        }
        if args.ram_base.checked_add(len).is_none() {
            return Err(format!(
                "--ram-base {:#x} plus the image size {len:#x} is past 2^64",
                args.ram_base
            )
            .into());
        }
        // A process writing the file meanwhile (a guest still running on it)
        // changes what the walker reads; one truncating it would make reads
        // past the new end fault (SIGBUS): `pagefold maps` is for the image
        // of a stopped guest, which nothing changes while it runs.
        // SAFETY: the mapping is private to this process and only read; the
        // file keeps its length while the tool runs (above).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| format!("cannot map {}: {e}", path.display()))?;
        Ok(Image { map })
    }

    fn phys<'a>(&'a self, args: &GuestArgs) -> PhysImage<'a> {
        PhysImage::new(GuestPhysAddr(args.ram_base), &self.map)
    }
}

fn walker(args: &GuestArgs) -> Result<Walker, Box<dyn Error>> {
    Walker::new(args.paging()?).map_err(|e| format!("bad paging registers: {e}").into())
}

/// `4K`, `2M`, `4M`, `1G`, `4G`.
pub(crate) fn size_text(size: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (unit, suffix) in UNITS {
        if size >= unit && size % unit == 0 {
            return format!("{}{suffix}", size / unit);
        }
    }
    format!("{size}B")
}

fn perms_text(read: bool, write: bool, execute: bool) -> String {
    [(read, 'r'), (write, 'w'), (execute, 'x')]
        .iter()
        .map(|&(on, c)| if on { c } else { '-' })
        .collect()
}

/// Leaf flags, one column each: G global, A accessed, D dirty, T PWT,
/// C PCD, P PAT.
fn flags_text(a: &pagefold::paging::LeafAttributes) -> String {
    [
        (a.global, 'G'),
        (a.accessed, 'A'),
        (a.dirty, 'D'),
        (a.write_through, 'T'),
        (a.cache_disable, 'C'),
        (a.pat, 'P'),
    ]
    .iter()
    .map(|&(on, c)| if on { c } else { '-' })
    .collect()
}

/// What the text forms add for an architecture's own attributes: AArch64's
/// EL0 permissions (the `rwx` column is EL1's), MAIR byte, shareability
/// and contiguous hint; RISC-V's PBMT, NAPOT and RSW.
fn arch_text(a: &ArchAttributes, p: &pagefold::paging::Permissions) -> String {
    match a {
        ArchAttributes::Riscv(r) => format!(
            "{}{}{}",
            match r.pbmt {
                1 => " pbmt=nc",
                2 => " pbmt=io",
                _ => "",
            },
            if r.napot { " napot" } else { "" },
            if r.rsw != 0 {
                format!(" rsw={}", r.rsw)
            } else {
                String::new()
            }
        ),
        ArchAttributes::Aarch64(a) => format!(
            "{} attr={:#04x} sh={}{}",
            if p.user || p.user_execute {
                format!(
                    " el0={}",
                    perms_text(p.user, p.user && p.write, p.user_execute)
                )
            } else {
                String::new()
            },
            a.memory_attr,
            a.shareability,
            if a.contiguous { " cont" } else { "" }
        ),
        _ => String::new(),
    }
}

/// The text form of a mapping:
/// `ffff888000000000 0000000000000000 2M rw- s GAD---`.
pub(crate) fn text_line(m: &Mapping) -> String {
    let p = &m.permissions;
    let mut s = format!(
        "{:016x} {:016x} {} {} {} {}",
        m.va,
        m.gpa,
        size_text(m.size),
        perms_text(p.read, p.write, p.execute),
        if p.user { 'u' } else { 's' },
        flags_text(&m.attributes)
    );
    if p.key != 0 {
        s.push_str(&format!(" key={}", p.key));
    }
    s.push_str(&arch_text(&m.arch_attributes, p));
    s
}

/// QEMU 7.2's `print_pte` for the leaf of `m` (target/i386/monitor.c):
/// `%016lx: %016lx` then X G P D A C T U W from the leaf entry alone, the
/// entry masked as `info tlb` masks it in `mode`, and bit 7 (PAT in a
/// 4 KiB PTE) cleared for 4 KiB pages.
pub(crate) fn qemu_line(m: &Mapping, mode: X86Mode) -> String {
    const X4K_LONG: u64 = 0x3_ffff_ffff_f000;
    const X2M_LONG: u64 = 0x3_ffff_ffe0_0000;
    const X1G_LONG: u64 = 0x3_ffff_c000_0000;
    let small = m.level <= 1;
    let pte = if small { m.entry & !(1 << 7) } else { m.entry };
    let mask = match (mode, m.level) {
        (X86Mode::Level4 | X86Mode::Level5, 1) => X4K_LONG,
        (X86Mode::Level4 | X86Mode::Level5, 2) => X2M_LONG,
        (X86Mode::Level4 | X86Mode::Level5, _) => X1G_LONG,
        // PAE and 32-bit 4 KiB pages: ~0xfff (high bits, NX included, stay).
        (_, 1) => !0xfff,
        // PAE 2 MiB pages: QEMU masks with ~((1 << 20) - 1).
        (X86Mode::Pae, _) => !((1 << 20) - 1),
        // 32-bit 4 MiB pages: ~((1 << 21) - 1) of a 32-bit entry.
        (_, _) => !((1 << 21) - 1),
    };
    let bit = |b: u32, c: char| if pte & (1 << b) != 0 { c } else { '-' };
    format!(
        "{:016x}: {:016x} {}{}{}{}{}{}{}{}{}",
        m.va,
        pte & mask,
        bit(63, 'X'),
        bit(8, 'G'),
        bit(7, 'P'),
        bit(6, 'D'),
        bit(5, 'A'),
        bit(4, 'C'),
        bit(3, 'T'),
        bit(2, 'U'),
        bit(1, 'W'),
    )
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

#[derive(Serialize)]
struct JsonMapping {
    va: String,
    gpa: String,
    size: u64,
    level: u8,
    read: bool,
    write: bool,
    execute: bool,
    user: bool,
    user_execute: bool,
    key: u8,
    global: bool,
    accessed: bool,
    dirty: bool,
    write_through: bool,
    cache_disable: bool,
    pat: bool,
    entry: String,
}

impl From<&Mapping> for JsonMapping {
    fn from(m: &Mapping) -> Self {
        let (p, a) = (&m.permissions, &m.attributes);
        JsonMapping {
            va: hex(m.va.0),
            gpa: hex(m.gpa.0),
            size: m.size,
            level: m.level,
            read: p.read,
            write: p.write,
            execute: p.execute,
            user: p.user,
            user_execute: p.user_execute,
            key: p.key,
            global: a.global,
            accessed: a.accessed,
            dirty: a.dirty,
            write_through: a.write_through,
            cache_disable: a.cache_disable,
            pat: a.pat,
            entry: hex(m.entry),
        }
    }
}

/// A fault's reason in words.
pub(crate) fn reason_text(r: &FaultReason) -> String {
    match r {
        FaultReason::NotPresent => "not present".into(),
        FaultReason::Permission => "permission".into(),
        FaultReason::ProtectionKey { key } => format!("protection key {key}"),
        FaultReason::Reserved { bits } => format!("reserved bits {bits:#x} set"),
        FaultReason::NonCanonical => "non-canonical address".into(),
        FaultReason::AddressTooWide => "address too wide for the mode".into(),
        FaultReason::Misconfigured => "misconfigured entry".into(),
        FaultReason::Unbacked { pa } => format!("table at {pa:#x} is outside the RAM image"),
        FaultReason::TooManyEntries => "entry budget exhausted".into(),
        FaultReason::ReadOnlyTable => "read-only table".into(),
        FaultReason::Contended => "contended".into(),
    }
}

/// A short machine-friendly name of a reason (for JSON).
fn reason_name(r: &FaultReason) -> &'static str {
    match r {
        FaultReason::NotPresent => "not-present",
        FaultReason::Permission => "permission",
        FaultReason::ProtectionKey { .. } => "protection-key",
        FaultReason::Reserved { .. } => "reserved",
        FaultReason::NonCanonical => "non-canonical",
        FaultReason::AddressTooWide => "address-too-wide",
        FaultReason::Misconfigured => "misconfigured",
        FaultReason::Unbacked { .. } => "unbacked",
        FaultReason::TooManyEntries => "too-many-entries",
        FaultReason::ReadOnlyTable => "read-only-table",
        FaultReason::Contended => "contended",
    }
}

fn code_text(c: &FaultCode) -> String {
    match c {
        FaultCode::PageFault { error_code } => format!("#PF error code {error_code:#x}"),
        FaultCode::GeneralProtection => "#GP(0)".into(),
        FaultCode::EptViolation { qualification } => {
            format!("EPT violation, qualification {qualification:#x}")
        }
        FaultCode::EptMisconfig => "EPT misconfiguration".into(),
        FaultCode::NestedPageFault { exit_info1 } => {
            format!("nested page fault, EXITINFO1 {exit_info1:#x}")
        }
        FaultCode::Aarch64Abort { esr } => {
            format!("abort, ESR_EL1 {esr:#x} (FSC {:#04x})", esr & 0x3f)
        }
        FaultCode::Aarch64Stage2Abort { esr, hpfar } => format!(
            "stage-2 abort, ESR_EL2 {esr:#x} (FSC {:#04x}{}), HPFAR_EL2 {hpfar:#x}",
            esr & 0x3f,
            if esr & (1 << 7) != 0 { ", S1PTW" } else { "" }
        ),
        FaultCode::Riscv(t) => {
            let name = match t.cause {
                1 => "instruction access fault",
                5 => "load access fault",
                7 => "store/AMO access fault",
                12 => "instruction page fault",
                13 => "load page fault",
                15 => "store/AMO page fault",
                20 => "instruction guest-page fault",
                21 => "load guest-page fault",
                23 => "store/AMO guest-page fault",
                _ => "trap",
            };
            format!("{name} (scause {})", t.cause)
        }
        FaultCode::Emulation => "no architectural event (emulation failure)".into(),
    }
}

/// One line for a fault: `VA: fault at level L: REASON; entry E at A; EVENT`.
pub(crate) fn fault_text(f: &WalkFault) -> String {
    let mut s = format!(
        "{:016x}: fault at level {}: {}",
        f.va,
        f.level,
        reason_text(&f.reason)
    );
    match (f.entry, f.entry_addr) {
        (Some(e), Some(at)) => s.push_str(&format!("; entry {e:016x} at {at:#x}")),
        (None, Some(at)) => s.push_str(&format!("; entry at {at:#x}")),
        (Some(e), None) => s.push_str(&format!("; entry {e:016x}")),
        (None, None) => {}
    }
    s.push_str("; ");
    s.push_str(&code_text(&f.code));
    s
}

/// Writes one line, treating a closed pipe (`| head`) as the end.
enum Flow {
    Go,
    Stop,
}

fn emit(out: &mut impl Write, line: &str) -> io::Result<Flow> {
    match writeln!(out, "{line}") {
        Ok(()) => Ok(Flow::Go),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Flow::Stop),
        Err(e) => Err(e),
    }
}

/// `pagefold maps`.
pub(crate) fn run_maps(args: &GuestArgs, format: MapsFormat) -> Result<ExitCode, Box<dyn Error>> {
    let walker = walker(args)?;
    let image = Image::open(args)?;
    let mem = image.phys(args);
    let mode = walker.mode();
    if format == MapsFormat::Qemu && walker.arch() != Arch::X86_64 {
        return Err(format!(
            "--format qemu prints x86 `info tlb` lines; use text or json for --arch {:?}",
            args.arch()
        )
        .into());
    }
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    if format == MapsFormat::Qemu && mode == X86Mode::NoPaging {
        emit(&mut out, "PG disabled")?;
        flush(&mut out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (mut listed, mut errors) = (0u64, 0u64);
    for item in walker.mappings(&mem) {
        match item {
            Ok(m) => {
                listed += 1;
                let line = match format {
                    MapsFormat::Text => text_line(&m),
                    MapsFormat::Qemu => qemu_line(&m, mode),
                    MapsFormat::Json => serde_json::to_string(&JsonMapping::from(&m))?,
                };
                if let Flow::Stop = emit(&mut out, &line)? {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Err(f) => {
                errors += 1;
                if errors <= MAX_ERRORS_SHOWN {
                    flush(&mut out)?;
                    eprintln!("pagefold: maps: skipped {}", fault_text(&f));
                }
            }
        }
    }
    flush(&mut out)?;
    if errors > 0 {
        eprintln!(
            "pagefold: maps: {errors} entr{} could not be used{}; {listed} mappings listed",
            if errors == 1 { "y" } else { "ies" },
            if errors > MAX_ERRORS_SHOWN {
                format!(" (the first {MAX_ERRORS_SHOWN} are shown)")
            } else {
                String::new()
            }
        );
    }
    if listed == 0 {
        return Err(format!(
            "no mapping could be listed from {} (are the registers right, and --ram-base?)",
            args.root_text()
        )
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

fn flush(out: &mut impl Write) -> io::Result<()> {
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// The access `translate` checks.
pub(crate) fn access(write: bool, fetch: bool, user: bool) -> Access {
    let kind = if write {
        AccessKind::Write
    } else if fetch {
        AccessKind::Fetch
    } else {
        AccessKind::Read
    };
    let a = Access::new(kind, pagefold::paging::Privilege::Supervisor);
    if user {
        a.user()
    } else {
        a
    }
}

/// The text form of a translation:
/// `VA -> GPA SIZE PERMS U/S FLAGS level L`.
pub(crate) fn translation_text(t: &Translation) -> String {
    let p = &t.permissions;
    let mut s = format!(
        "{:016x} -> {:016x} {} {} {} {} level {}",
        t.va,
        t.gpa,
        size_text(t.page_size),
        perms_text(p.read, p.write, p.execute),
        if p.user { 'u' } else { 's' },
        flags_text(&t.attributes),
        t.level
    );
    if p.key != 0 {
        s.push_str(&format!(" key={}", p.key));
    }
    s.push_str(&arch_text(&t.arch_attributes, p));
    s
}

#[derive(Serialize)]
struct JsonTranslation {
    va: String,
    gpa: String,
    page_base: String,
    page_size: u64,
    level: u8,
    read: bool,
    write: bool,
    execute: bool,
    user: bool,
    key: u8,
    global: bool,
    accessed: bool,
    dirty: bool,
    write_through: bool,
    cache_disable: bool,
    pat: bool,
}

#[derive(Serialize)]
struct JsonFault {
    va: String,
    fault: JsonFaultBody,
}

#[derive(Serialize)]
struct JsonFaultBody {
    level: u8,
    reason: &'static str,
    detail: String,
    entry: Option<String>,
    entry_addr: Option<String>,
    /// The #PF error code, when the event is a page fault.
    error_code: Option<u32>,
    event: String,
}

/// `pagefold translate`.
pub(crate) fn run_translate(
    args: &GuestArgs,
    va: u64,
    access: Access,
    json: bool,
) -> Result<ExitCode, Box<dyn Error>> {
    let walker = walker(args)?;
    let image = Image::open(args)?;
    let mem = image.phys(args);
    let result = walker.translate(&mem, GuestVirtAddr(va), access);
    let line = match (&result, json) {
        (Ok(t), false) => translation_text(t),
        (Ok(t), true) => {
            let (p, a) = (&t.permissions, &t.attributes);
            serde_json::to_string(&JsonTranslation {
                va: hex(t.va.0),
                gpa: hex(t.gpa.0),
                page_base: hex(t.gpa.0 & !(t.page_size - 1)),
                page_size: t.page_size,
                level: t.level,
                read: p.read,
                write: p.write,
                execute: p.execute,
                user: p.user,
                key: p.key,
                global: a.global,
                accessed: a.accessed,
                dirty: a.dirty,
                write_through: a.write_through,
                cache_disable: a.cache_disable,
                pat: a.pat,
            })?
        }
        (Err(f), false) => fault_text(f),
        (Err(f), true) => serde_json::to_string(&JsonFault {
            va: hex(f.va.0),
            fault: JsonFaultBody {
                level: f.level,
                reason: reason_name(&f.reason),
                detail: reason_text(&f.reason),
                entry: f.entry.map(hex),
                entry_addr: f.entry_addr.map(|a| hex(a.0)),
                error_code: match f.code {
                    FaultCode::PageFault { error_code } => Some(error_code),
                    _ => None,
                },
                event: code_text(&f.code),
            },
        })?,
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    emit(&mut out, &line)?;
    flush(&mut out)?;
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAULT)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use pagefold::paging::{LeafAttributes, Permissions};

    fn mapping(va: u64, gpa: u64, level: u8, entry: u64) -> Mapping {
        Mapping {
            va: GuestVirtAddr(va),
            gpa: GuestPhysAddr(gpa),
            size: 1 << (12 + 9 * (u32::from(level) - 1)),
            level,
            permissions: Permissions {
                read: true,
                write: entry & 2 != 0,
                execute: entry >> 63 == 0,
                user: entry & 4 != 0,
                user_execute: false,
                key: 0,
            },
            attributes: LeafAttributes {
                accessed: entry & 0x20 != 0,
                dirty: entry & 0x40 != 0,
                global: entry & 0x100 != 0,
                ..LeafAttributes::default()
            },
            arch_attributes: pagefold::paging::ArchAttributes::None,
            entry,
        }
    }

    #[test]
    fn hex_with_and_without_prefix() {
        assert_eq!(parse_hex("0x2b04000"), Ok(0x2b0_4000));
        assert_eq!(parse_hex("2b04000"), Ok(0x2b0_4000));
        assert_eq!(
            parse_hex("0XFFFF_8880_0000_0000"),
            Ok(0xffff_8880_0000_0000)
        );
        assert_eq!(parse_hex("ffffffffffffffff"), Ok(u64::MAX));
        assert!(parse_hex("").is_err());
        assert!(parse_hex("0x").is_err());
        assert!(parse_hex("12g").is_err());
        assert!(parse_hex("1ffffffffffffffff").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(size_text(4096), "4K");
        assert_eq!(size_text(2 << 20), "2M");
        assert_eq!(size_text(4 << 20), "4M");
        assert_eq!(size_text(1 << 30), "1G");
        assert_eq!(size_text(1 << 32), "4G");
        assert_eq!(size_text(100), "100B");
    }

    #[test]
    fn text_lines() {
        // A kernel 2 MiB page: present, writable, accessed, dirty, PS,
        // global, NX.
        let m = mapping(0xffff_8880_0000_0000, 0, 2, (1 << 63) | 0x1e3);
        assert_eq!(
            text_line(&m),
            "ffff888000000000 0000000000000000 2M rw- s GAD---"
        );
        let m = mapping(0x40_0000, 0x950_e000, 1, 0x950_e025);
        assert_eq!(
            text_line(&m),
            "0000000000400000 000000000950e000 4K r-x u -A----"
        );
    }

    #[test]
    fn qemu_lines_match_info_tlb() {
        // Lines as QEMU 7.2 printed them for a Debian guest.
        let m = mapping(0x40_0000, 0x950_e000, 1, (1 << 63) | 0x950_e025);
        assert_eq!(
            qemu_line(&m, X86Mode::Level4),
            "0000000000400000: 000000000950e000 X---A--U-"
        );
        // PAT (bit 7) of a 4 KiB PTE is not shown; bits 52..62 are masked.
        let m = mapping(0x1000, 0x2000, 1, 0x7ff0_0000_0000_21a3);
        assert_eq!(
            qemu_line(&m, X86Mode::Level4),
            "0000000000001000: 0000000000002000 -G--A---W"
        );
        // A 2 MiB page shows P, and its PAT bit (12) is masked out.
        let m = mapping(0xffff_8880_0020_0000, 0x20_0000, 2, 0x20_11e3);
        assert_eq!(
            qemu_line(&m, X86Mode::Level4),
            "ffff888000200000: 0000000000200000 -GPDA---W"
        );
        // A 1 GiB page.
        let m = mapping(0xffff_8880_0000_0000, 0x4000_0000, 3, 0x4000_0087);
        assert_eq!(
            qemu_line(&m, X86Mode::Level4),
            "ffff888000000000: 0000000040000000 --P----UW"
        );
        // PAE 4 KiB: NX stays in the printed address (mask ~0xfff).
        let m = mapping(0x1000, 0x3000, 1, (1 << 63) | 0x3001);
        assert_eq!(
            qemu_line(&m, X86Mode::Pae),
            "0000000000001000: 8000000000003000 X--------"
        );
        // PAE 2 MiB: QEMU's mask keeps bit 20.
        let m = mapping(0x20_0000, 0x20_0000, 2, 0x30_0081);
        assert_eq!(
            qemu_line(&m, X86Mode::Pae),
            "0000000000200000: 0000000000300000 --P------"
        );
        // 32-bit 4 MiB: mask ~((1 << 21) - 1).
        let mut m = mapping(0x40_0000, 0x40_0000, 2, 0x40_0083);
        m.size = 4 << 20;
        assert_eq!(
            qemu_line(&m, X86Mode::Bits32),
            "0000000000400000: 0000000000400000 --P-----W"
        );
    }

    #[test]
    fn fault_lines() {
        let f = WalkFault {
            va: GuestVirtAddr(0x1234),
            gpa: None,
            access: Access::write(),
            stage: pagefold::paging::Stage::First,
            level: 2,
            entry_addr: Some(GuestPhysAddr(0x3000)),
            entry: Some(0),
            reason: FaultReason::NotPresent,
            code: FaultCode::PageFault { error_code: 2 },
        };
        assert_eq!(
            fault_text(&f),
            "0000000000001234: fault at level 2: not present; \
             entry 0000000000000000 at 0x3000; #PF error code 0x2"
        );
    }

    #[test]
    fn access_flags() {
        assert_eq!(access(false, false, false), Access::read());
        assert_eq!(access(true, false, false), Access::write());
        assert_eq!(access(false, true, true), Access::fetch().user());
    }
}

//! The guest's first level across architectures: which format walks an
//! address ([`First`], [`FirstFmt`]), what a leaf reports (permissions,
//! attributes, [`ArchAttributes`]) and the architectural event a
//! first-level fault is (an x86 #PF or #GP, an AArch64 abort's ESR). The
//! walker's stages (`walker.rs`), its cache and its listing ask this file
//! instead of matching on architectures themselves.
//!
//! [`FirstFmt`] is also a `Format` (each method forwards to the
//! architecture's), for the code that runs once per walk or per listed
//! entry; the engine's hot loop is monomorphic: `walker.rs` dispatches once
//! per walk and runs the engine on the architecture's own format.

use super::{
    aarch64::{Aarch64Attributes, Aarch64Fault, Aarch64FaultKind, Aarch64Walker, S1Format},
    engine::Stop,
    fault::{FaultCode, FaultReason},
    format::{bits, Decoded, Denied, Format},
    riscv::{self, RiscvAttributes, SvFormat},
    types::{Access, LeafAttributes, Permissions},
    x86::X86Format,
};
use crate::addr::GuestVirtAddr;

/// What a first-level leaf says beyond [`LeafAttributes`], per
/// architecture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ArchAttributes {
    /// Nothing more: x86 (every x86 attribute is in [`LeafAttributes`]) or
    /// no paging.
    #[default]
    None,
    /// An AArch64 stage-1 descriptor's attributes (MAIR byte,
    /// shareability, AP, nG, DBM, the contiguous hint).
    Aarch64(Aarch64Attributes),
    /// A RISC-V leaf PTE's attributes (PBMT, NAPOT, G, A, D, RSW).
    Riscv(RiscvAttributes),
}

/// A walker's first level, ready to translate.
// The AArch64 variant carries both ranges' masks precomputed for the lean
// walk (a few hundred bytes, once per walker); boxing it would cost the
// walker its `Copy` and a pointer chase per walk.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug)]
pub(crate) enum First {
    /// x86 without paging (CR0.PG clear): the 32-bit linear address is
    /// the guest-physical one. (AArch64 with its MMU off is
    /// [`First::Aarch64`], whose faults differ.)
    NoPaging,
    /// x86 paging in one of its modes.
    X86(X86Format),
    /// AArch64 stage 1 (EL1&0), two ranges.
    Aarch64(Aarch64Walker),
    /// RISC-V Sv39/48/57 (`fmt`), or Bare (`None`): the address is the
    /// output, below `1 << pa_bits`.
    Riscv { fmt: Option<SvFormat>, pa_bits: u8 },
}

/// The format one walk runs: the architecture's own.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FirstFmt<'a> {
    X86(&'a X86Format),
    Aarch64(&'a S1Format),
    Riscv(&'a SvFormat),
}

/// Runs `$body` with `$f` bound to the architecture's own format.
macro_rules! each_format {
    ($fmt:expr, $f:ident => $body:expr) => {
        match $fmt {
            FirstFmt::X86($f) => $body,
            FirstFmt::Aarch64($f) => $body,
            FirstFmt::Riscv($f) => $body,
        }
    };
}
pub(crate) use each_format;

impl Format for FirstFmt<'_> {
    fn top_level(&self) -> u8 {
        each_format!(self, f => f.top_level())
    }
    fn root(&self) -> u64 {
        each_format!(self, f => f.root())
    }
    fn wide(&self) -> bool {
        each_format!(self, f => f.wide())
    }
    fn check_input(&self, va: u64) -> Result<(), FaultReason> {
        each_format!(self, f => f.check_input(va))
    }
    fn index_shift(&self, level: u8) -> u32 {
        each_format!(self, f => f.index_shift(level))
    }
    fn entries(&self, level: u8) -> u64 {
        each_format!(self, f => f.entries(level))
    }
    fn entry_addr(&self, table: u64, level: u8, va: u64) -> u64 {
        each_format!(self, f => f.entry_addr(table, level, va))
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded {
        each_format!(self, f => f.decode(level, raw))
    }
    fn acc_start(&self) -> u64 {
        each_format!(self, f => f.acc_start())
    }
    fn accumulate(&self, acc: u64, level: u8, raw: u64) -> u64 {
        each_format!(self, f => f.accumulate(acc, level, raw))
    }
    fn check(&self, acc: u64, leaf: u64, access: Access, user_linear: bool) -> Result<(), Denied> {
        each_format!(self, f => f.check(acc, leaf, access, user_linear))
    }
    fn with_accessed(&self, level: u8, raw: u64, leaf: bool, write: bool) -> u64 {
        each_format!(self, f => f.with_accessed(level, raw, leaf, write))
    }
    fn permissions(&self, acc: u64, leaf: u64) -> Permissions {
        each_format!(self, f => f.permissions(acc, leaf))
    }
}

/// AArch64 leaf attributes in the architecture-neutral report: AF, the
/// DBM dirty state (writable and DBM set), nG.
#[inline(always)]
fn aarch64_leaf(a: &Aarch64Attributes) -> LeafAttributes {
    LeafAttributes {
        accessed: a.accessed,
        dirty: a.dbm && a.ap & 2 == 0,
        global: !a.not_global,
        ..LeafAttributes::default()
    }
}

/// What an AArch64 leaf `leaf` of `fmt`'s range, reached with `acc`,
/// reports ([`First::report`]'s answer for an AArch64 walker `a`).
#[inline(always)]
pub(crate) fn aarch64_report(
    a: &Aarch64Walker,
    fmt: &S1Format,
    acc: u64,
    leaf: u64,
) -> (Permissions, LeafAttributes, ArchAttributes) {
    let attrs = a.attributes_in(fmt, leaf);
    (
        fmt.permissions(acc, leaf),
        aarch64_leaf(&attrs),
        ArchAttributes::Aarch64(attrs),
    )
}

/// What a RISC-V leaf `leaf` of `fmt`, reached with `acc`, reports
/// ([`First::report`]'s answer).
#[inline(always)]
pub(crate) fn riscv_report(
    fmt: &SvFormat,
    acc: u64,
    leaf: u64,
) -> (Permissions, LeafAttributes, ArchAttributes) {
    let attrs = riscv::attributes(leaf);
    let neutral = LeafAttributes {
        accessed: attrs.accessed,
        dirty: attrs.dirty,
        global: attrs.global,
        ..LeafAttributes::default()
    };
    (
        fmt.permissions(acc, leaf),
        neutral,
        ArchAttributes::Riscv(attrs),
    )
}

/// The abort an AArch64 stage-1 fault of `kind` at architectural `level`
/// is: its ESR_EL1 value, or an emulation failure for a kind with no
/// fault status code.
pub(crate) fn aarch64_code(kind: Aarch64FaultKind, level: i8, access: Access) -> FaultCode {
    let f = Aarch64Fault {
        va: GuestVirtAddr(0),
        access,
        kind,
        level,
        entry_addr: None,
        entry: None,
        ttbr: None,
    };
    f.esr_el1()
        .map_or(FaultCode::Emulation, |esr| FaultCode::Aarch64Abort { esr })
}

impl First {
    /// The format that walks `va` once its range checks passed (AArch64:
    /// the range bit 55 selects); `None` without paging.
    #[inline]
    pub(crate) fn format_of(&self, va: u64) -> Option<FirstFmt<'_>> {
        match self {
            First::NoPaging => None,
            First::X86(f) => Some(FirstFmt::X86(f)),
            First::Aarch64(a) if a.mmu_on() => Some(FirstFmt::Aarch64(a.range_format(va))),
            First::Aarch64(_) => None,
            First::Riscv { fmt, .. } => fmt.as_ref().map(FirstFmt::Riscv),
        }
    }

    /// The output of `va` where nothing translates it (x86 without
    /// paging, RISC-V Bare; AArch64 with stage 1 off: `va<51:0>`, the top
    /// byte that TBI ignores dropped), once `Walker::first_root` has
    /// checked it.
    #[inline]
    pub(crate) fn untranslated(&self, va: u64) -> u64 {
        match self {
            First::Aarch64(_) => va & bits(0, 51),
            _ => va,
        }
    }

    /// What a leaf `leaf` at `level`, reached with `acc`, reports for
    /// `va`.
    #[inline]
    pub(crate) fn report(
        &self,
        va: u64,
        acc: u64,
        leaf: u64,
        level: u8,
    ) -> (Permissions, LeafAttributes, ArchAttributes) {
        let Some(fmt) = self.format_of(va) else {
            return (
                Permissions::no_paging(),
                LeafAttributes::default(),
                ArchAttributes::None,
            );
        };
        match (self, fmt) {
            (First::X86(f), _) => (
                f.permissions(acc, leaf),
                f.attributes(level, leaf),
                ArchAttributes::None,
            ),
            (First::Aarch64(a), FirstFmt::Aarch64(f)) => aarch64_report(a, f, acc, leaf),
            (_, FirstFmt::Riscv(f)) => riscv_report(f, acc, leaf),
            // `format_of` gives each architecture its own format.
            _ => (
                fmt.permissions(acc, leaf),
                LeafAttributes::default(),
                ArchAttributes::None,
            ),
        }
    }

    /// The architectural event for a first-level stop `s` in `fmt`'s walk
    /// (`None`: before any format, an input check) of `va`; `virt`: the
    /// guest runs under a second level (a RISC-V VS stage).
    pub(crate) fn fault_code(
        &self,
        fmt: Option<FirstFmt<'_>>,
        s: &Stop,
        va: u64,
        access: Access,
        virt: bool,
    ) -> FaultCode {
        if matches!(
            s.reason,
            FaultReason::Unbacked { .. }
                | FaultReason::ReadOnlyTable
                | FaultReason::Contended
                | FaultReason::Misconfigured
                | FaultReason::TooManyEntries
        ) {
            return FaultCode::Emulation;
        }
        match (self, fmt) {
            (First::X86(_) | First::NoPaging, _) if s.reason == FaultReason::NonCanonical => {
                FaultCode::GeneralProtection
            }
            (First::NoPaging, _) if s.reason == FaultReason::AddressTooWide => {
                FaultCode::GeneralProtection
            }
            (First::NoPaging, _) => FaultCode::Emulation,
            (First::X86(f), _) => FaultCode::PageFault {
                error_code: f.error_code(s.reason, access),
            },
            (First::Aarch64(a), Some(FirstFmt::Aarch64(f))) => {
                let (kind, level) = a.stop_fault(f, s.reason, s.level, s.entry);
                aarch64_code(kind, level, access)
            }
            // Input checks, at level 0: the range, the root, the PA size
            // with the MMU off.
            (First::Aarch64(_), _) => {
                let kind = match s.reason {
                    FaultReason::Reserved { .. } | FaultReason::AddressTooWide => {
                        Aarch64FaultKind::AddressSize
                    }
                    _ => Aarch64FaultKind::Translation,
                };
                aarch64_code(kind, 0, access)
            }
            (First::Riscv { fmt: None, .. }, _) => {
                FaultCode::Riscv(riscv::bare_access_fault(va, access.kind, virt))
            }
            (First::Riscv { .. }, _) => riscv::first_stage_trap(s, va, access.kind, virt)
                .map_or(FaultCode::Emulation, FaultCode::Riscv),
        }
    }
}

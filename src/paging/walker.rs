//! `Walker`: one guest address space (the guest's paging registers, and
//! optionally a second level) and the walk that translates in it, as named
//! stages with typed hand-offs: the root ([`Walker::first_root`]), the
//! guest's levels ([`Walker::walk_levels`], permissions checked at the
//! leaf), the leaf's report ([`Walker::first_leaf`]), the second level
//! ([`Walker::translate_second`]) and the [`Translation`]
//! ([`Walker::build_translation`]). [`Walker::translate`] runs them with
//! nothing cached; a walk cache (`cached.rs`) runs the same stages around
//! its own lookups and fills. The walk never calls a cache: it is handed a
//! start and a second-level memo, and hands back what it walked. Faults
//! come back as [`WalkFault`] with the architectural event filled in for
//! the stage that faulted.

use super::{
    aarch64::{
        stage2::{Aarch64Stage2, S2Format},
        Aarch64FaultKind, Aarch64Paging, Aarch64PagingError, Aarch64Walker,
    },
    engine::{self, DirectPort, Fail, Start, Stop, Walked},
    ept::{EptConfig, EptFormat, NptConfig},
    fault::{FaultReason, Stage, WalkFault},
    first::{self, each_format, ArchAttributes, First, FirstFmt},
    format::Format,
    lean,
    memory::PhysMemory,
    riscv::{RiscvGStage, RiscvPaging, RiscvPagingError, SvFormat},
    second::{self, FaultSite, Memo, NestedPort, Second, SecondTranslation},
    types::{Access, Arch, LeafAttributes, Permissions, SecondOut, PAGE_SHIFT_U8},
    x86::{
        X86Format, X86Long, X86Mode, X86Paging, X86PagingError, CR0_WP, CR4_PKE, CR4_PKS, CR4_PSE,
        CR4_SMAP, CR4_SMEP, EFER_NXE,
    },
};
use crate::addr::{GuestPhysAddr, GuestVirtAddr};

/// The guest's first-level paging registers, per architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestPaging {
    /// x86 paging in any mode the registers select.
    X86(X86Paging),
    /// AArch64 stage 1 of the EL1&0 regime (both TTBR ranges).
    Aarch64(Aarch64Paging),
    /// RISC-V Sv39, Sv48 or Sv57 (or Bare) from `satp`/`vsatp`.
    Riscv64(RiscvPaging),
}

impl From<X86Paging> for GuestPaging {
    fn from(p: X86Paging) -> Self {
        GuestPaging::X86(p)
    }
}

impl From<Aarch64Paging> for GuestPaging {
    fn from(p: Aarch64Paging) -> Self {
        GuestPaging::Aarch64(p)
    }
}

impl From<RiscvPaging> for GuestPaging {
    fn from(p: RiscvPaging) -> Self {
        GuestPaging::Riscv64(p)
    }
}

/// The second level, translating guest-physical addresses to the memory the
/// walker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecondLevel {
    /// Intel EPT.
    Ept(EptConfig),
    /// AMD nested paging.
    Npt(NptConfig),
    /// The RISC-V G stage (`hgatp`), under a RISC-V guest's VS stage.
    Riscv(RiscvGStage),
    /// AArch64 stage 2 (VTCR_EL2, VTTBR_EL2), under an AArch64 guest's
    /// stage 1.
    Aarch64(Aarch64Stage2),
}

impl SecondLevel {
    /// The architecture whose guests this second level serves, and its
    /// name for messages.
    fn arch(&self) -> (Arch, &'static str) {
        match self {
            SecondLevel::Ept(_) => (Arch::X86_64, "EPT"),
            SecondLevel::Npt(_) => (Arch::X86_64, "NPT"),
            SecondLevel::Riscv(_) => (Arch::Riscv64, "RISC-V G-stage"),
            SecondLevel::Aarch64(_) => (Arch::Aarch64, "AArch64 stage-2"),
        }
    }
}

// Defined with the plain types, so formats below the walker (AArch64's
// walker) take it too.
pub use super::types::WalkOptions;

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The address translated (linear; without paging it is also the
    /// guest-physical address).
    pub va: GuestVirtAddr,
    /// The guest-physical address (first-level output).
    pub gpa: GuestPhysAddr,
    /// The address in the walker's memory: the second level's output (a
    /// guest-physical address of the VM whose memory the walker reads, L1's
    /// for a nested guest), or `gpa` without one.
    pub pa: GuestPhysAddr,
    /// Size of the guest's page (the whole linear space without paging is
    /// reported as 4 KiB pages).
    pub page_size: u64,
    /// Level of the guest's leaf entry, counted up from 1 (the last-level
    /// table) on every architecture (AArch64's level 3 is 1 here); 0
    /// without paging.
    pub level: u8,
    /// What the guest's tables allow.
    pub permissions: Permissions,
    /// The guest's leaf attributes.
    pub attributes: LeafAttributes,
    /// What the leaf says beyond `attributes`, per architecture.
    pub arch_attributes: ArchAttributes,
    /// The second level's part, if there is one.
    pub second: Option<SecondTranslation>,
    /// Memory references the walk made (entries read and updated, both
    /// levels); 0 for a translation answered from the cache.
    pub memory_refs: u32,
}

impl Translation {
    /// Bytes from `va` to the end of the page it is in, taking the smaller
    /// of the two levels' pages: how far `pa` stays contiguous.
    pub fn contiguous_bytes(&self) -> u64 {
        let size = match self.second {
            Some(s) => s.page_size.min(self.page_size),
            None => self.page_size,
        };
        size - (self.va.0 & (size - 1))
    }
}

/// One guest address space, ready to translate.
#[derive(Clone, Copy, Debug)]
pub struct Walker {
    first: First,
    second: Option<Second>,
    /// This address space, exactly: the first level's roots and format
    /// settings (four words), then the second level's root and settings
    /// (zeros without one). A walk cache numbers the keys it sees.
    space_key: SpaceKey,
    /// The second level alone, for its cached translations.
    second_key: SpaceKey,
    /// x86's PCID, AArch64's ASID.
    pcid: u16,
    /// The settings permission checks read but the space tag leaves out,
    /// exactly: x86's CR0.WP, SMEP, SMAP, PKE, PKS (bits 0..5), PKRU
    /// (32..64), PKRS (64..96); AArch64's WXN and PAN (bits 0, 1) with the
    /// architecture in bits 120.. A cache numbers the ones it has seen.
    check_config: u128,
}

/// An address space's exact key in a walk cache: four words of the first
/// level, four of the second.
pub(crate) type SpaceKey = [u64; 8];

/// Errors building a walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkerError {
    /// The x86 registers select no valid mode.
    #[error(transparent)]
    X86(#[from] X86PagingError),
    /// The AArch64 registers describe no defined walk.
    #[error(transparent)]
    Aarch64(#[from] Aarch64PagingError),
    /// The RISC-V registers select no valid scheme.
    #[error(transparent)]
    Riscv(#[from] RiscvPagingError),
    /// The second level belongs to another architecture than the guest's
    /// first level.
    #[error("a {second} second level cannot translate for a {first:?} guest")]
    SecondLevelArch {
        /// The guest's architecture.
        first: Arch,
        /// The second level given.
        second: &'static str,
    },
    /// The EPTP's walk length is neither 4 nor 5 levels.
    #[error("EPTP {eptp:#x} has walk length {} (only 4 and 5 levels exist)", ((eptp >> 3) & 7) + 1)]
    EptWalkLength {
        /// The EPTP.
        eptp: u64,
    },
}

/// The public tag of an address-space key ([`Walker::space`]): a hash, for
/// naming spaces to invalidate; a cache itself compares exact keys.
pub(crate) fn space_tag(key: &SpaceKey) -> u64 {
    key.iter().fold(0x5041_4745_u64, |h, &w| {
        (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
    })
}

/// Everything in the guest's registers that changes what an entry means,
/// exactly (what is allowed is checked again on every cache hit).
fn first_key(regs: &X86Paging, mode: X86Mode, root: u64) -> SpaceKey {
    [
        root,
        mode as u64
            | u64::from(regs.cr4 & CR4_PSE != 0) << 3
            | u64::from(regs.efer & EFER_NXE != 0) << 4
            | u64::from(regs.gbpages) << 5
            | u64::from(regs.maxphyaddr) << 8
            | u64::from(regs.pcid()) << 16,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// The settings permission checks read (`Walker::check_config`).
fn check_config_of(regs: &X86Paging) -> u128 {
    let flag = |on: bool, bit: u32| u128::from(on) << bit;
    flag(regs.cr0 & CR0_WP != 0, 0)
        | flag(regs.cr4 & CR4_SMEP != 0, 1)
        | flag(regs.cr4 & CR4_SMAP != 0, 2)
        | flag(regs.cr4 & CR4_PKE != 0, 3)
        | flag(regs.cr4 & CR4_PKS != 0, 4)
        | u128::from(regs.pkru) << 32
        | u128::from(regs.pkrs) << 64
}

/// The second level a configuration describes, its root and its settings
/// (the second half of a space key); `None` for one that translates
/// nothing (a Bare `hgatp`).
fn second_of(second: SecondLevel) -> Result<Option<(Second, u64, u64, u64)>, WalkerError> {
    Ok(Some(match second {
        SecondLevel::Ept(cfg) => (
            Second::Ept(EptFormat::new(&cfg).ok_or(WalkerError::EptWalkLength { eptp: cfg.eptp })?),
            cfg.eptp,
            1 | u64::from(cfg.execute_only) << 2
                | u64::from(cfg.mode_based_execute) << 3
                | u64::from(cfg.maxphyaddr) << 8,
            0,
        ),
        SecondLevel::Npt(cfg) => (
            Second::Npt(X86Format::nested(
                cfg.ncr3,
                cfg.five_level,
                cfg.nxe,
                cfg.maxphyaddr,
            )),
            cfg.ncr3,
            2 | u64::from(cfg.five_level) << 2
                | u64::from(cfg.nxe) << 3
                | u64::from(cfg.maxphyaddr) << 8,
            0,
        ),
        SecondLevel::Riscv(cfg) => {
            let Some(f) = SvFormat::g_stage(&cfg)? else {
                return Ok(None);
            };
            let flag = |on: bool, bit: u32| u64::from(on) << bit;
            (
                Second::Riscv(f),
                cfg.hgatp,
                3 | flag(cfg.adue, 2)
                    | flag(cfg.pbmte, 3)
                    | flag(cfg.svnapot, 4)
                    | flag(cfg.mxr, 5)
                    | u64::from(cfg.pa_bits) << 8,
                0,
            )
        }
        SecondLevel::Aarch64(cfg) => {
            let flag = |on: bool, bit: u32| u64::from(on) << bit;
            (
                Second::Aarch64(S2Format::new(&cfg)?),
                cfg.vttbr,
                4 | flag(cfg.xnx, 2)
                    | flag(cfg.lpa2, 3)
                    | flag(cfg.ttst, 4)
                    | u64::from(cfg.pa_bits) << 8,
                cfg.vtcr,
            )
        }
    }))
}

/// The translation a first-level lean walk `l` of `va` answers, with no
/// second level (what `Walker::build_translation` makes of its leaf).
#[inline(always)]
fn lean_translation(
    va: u64,
    l: &lean::LeanOut,
    permissions: Permissions,
    attributes: LeafAttributes,
    arch_attributes: ArchAttributes,
) -> Translation {
    let gpa = l.base | (va & ((1u64 << l.shift) - 1));
    Translation {
        va: GuestVirtAddr(va),
        gpa: GuestPhysAddr(gpa),
        pa: GuestPhysAddr(gpa),
        page_size: 1 << l.shift,
        level: l.level,
        permissions,
        attributes,
        arch_attributes,
        second: None,
        memory_refs: l.refs,
    }
}

/// One translation asked of the walk: the address, the access to check,
/// and whether to set accessed/dirty flags as hardware does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    pub(crate) va: u64,
    pub(crate) access: Access,
    pub(crate) set_ad: bool,
}

/// Where the guest's walk begins (stage one's hand-off): the format and its
/// root.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FirstRoot<'a> {
    pub(crate) fmt: FirstFmt<'a>,
    pub(crate) start: Start,
}

/// What the guest's leaf says (stage three's hand-off): the first level's
/// output, ready for the second level and for a cache entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FirstLeaf {
    /// The guest-physical address of the access.
    pub(crate) gpa: u64,
    /// log2 of the guest's page size.
    pub(crate) shift: u8,
    /// The leaf's level (0 without paging).
    pub(crate) level: u8,
    pub(crate) permissions: Permissions,
    pub(crate) attributes: LeafAttributes,
    pub(crate) arch: ArchAttributes,
    /// The format's accumulated permissions and the leaf entry.
    pub(crate) acc: u64,
    pub(crate) leaf: u64,
}

impl Walker {
    /// A walker for the guest's paging registers, with no second level.
    pub fn new(paging: impl Into<GuestPaging>) -> Result<Self, WalkerError> {
        match paging.into() {
            GuestPaging::X86(regs) => {
                let mode = regs.mode()?;
                let first = match mode {
                    X86Mode::NoPaging => First::NoPaging,
                    m => First::X86(X86Format::first_level(&regs, m)),
                };
                let root = match &first {
                    First::X86(f) => f.root(),
                    _ => 0,
                };
                Ok(Walker {
                    first,
                    second: None,
                    space_key: first_key(&regs, mode, root),
                    second_key: [0; 8],
                    pcid: regs.pcid(),
                    check_config: check_config_of(&regs),
                })
            }
            GuestPaging::Aarch64(regs) => {
                let a = Aarch64Walker::new(regs)?;
                let [w0, w1, w2, w3] = a.key_words();
                Ok(Walker {
                    first: First::Aarch64(a),
                    second: None,
                    space_key: [w0, w1, w2, w3, 0, 0, 0, 0],
                    second_key: [0; 8],
                    pcid: a.asid(),
                    check_config: a.check_bits() | 1 << 120,
                })
            }
            GuestPaging::Riscv64(regs) => {
                let fmt = SvFormat::first_stage(&regs)?;
                let flag = |on: bool, bit: u32| u64::from(on) << bit;
                let shape = flag(regs.adue, 0)
                    | flag(regs.pbmte, 1)
                    | flag(regs.svnapot, 2)
                    | u64::from(regs.pa_bits) << 8;
                Ok(Walker {
                    first: First::Riscv {
                        fmt,
                        pa_bits: regs.pa_bits,
                    },
                    second: None,
                    space_key: [regs.satp, shape, 0, 2 << 62, 0, 0, 0, 0],
                    second_key: [0; 8],
                    pcid: regs.asid(),
                    check_config: u128::from(regs.sum) | u128::from(regs.mxr) << 1 | 2 << 120,
                })
            }
        }
    }

    /// The guest's architecture.
    pub fn arch(&self) -> Arch {
        match self.first {
            First::NoPaging | First::X86(_) => Arch::X86_64,
            First::Aarch64(_) => Arch::Aarch64,
            First::Riscv { .. } => Arch::Riscv64,
        }
    }

    /// The same guest with a second level under it: every guest-physical
    /// address, page-table pointers included, is translated through it. A
    /// Bare `hgatp` translates nothing and leaves the walker as it was.
    pub fn with_second_level(mut self, second: SecondLevel) -> Result<Self, WalkerError> {
        let (arch, name) = second.arch();
        if self.arch() != arch {
            return Err(WalkerError::SecondLevelArch {
                first: self.arch(),
                second: name,
            });
        }
        let Some((s, root, bits, extra)) = second_of(second)? else {
            return Ok(self);
        };
        self.second = Some(s);
        let words = [root, bits, extra, 0];
        self.space_key[4..].copy_from_slice(&words);
        self.second_key = [0, 0, 0, 0, root, bits, extra, 0];
        Ok(self)
    }

    /// The guest's x86 paging mode ([`X86Mode::NoPaging`] for a guest of
    /// another architecture: see [`Walker::arch`]).
    pub fn mode(&self) -> X86Mode {
        match &self.first {
            First::X86(f) => f.mode(),
            _ => X86Mode::NoPaging,
        }
    }

    /// Whether a second level is configured.
    pub fn has_second_level(&self) -> bool {
        self.second.is_some()
    }

    /// This address space's tag in a `WalkCache` (CR3, PCID, mode and
    /// second level together): what `WalkCache::invalidate_space` takes.
    pub fn space(&self) -> u64 {
        space_tag(&self.space_key)
    }

    /// The PCID (0 without CR4.PCIDE); for AArch64 the current ASID: what
    /// `WalkCache::invalidate_pcid` takes.
    pub fn pcid(&self) -> u16 {
        self.pcid
    }

    /// The exact key of this address space, for a cache to number.
    #[inline(always)]
    pub(crate) fn space_key(&self) -> &SpaceKey {
        &self.space_key
    }

    /// The exact key of the second level alone, for a cache to number.
    #[inline(always)]
    pub(crate) fn second_key(&self) -> &SpaceKey {
        &self.second_key
    }

    /// The exact permission-check settings, for a cache to number.
    #[inline(always)]
    pub(crate) fn check_config(&self) -> u128 {
        self.check_config
    }

    /// The x86 format, for the x86-only fast paths.
    pub(crate) fn x86_format(&self) -> Option<&X86Format> {
        match &self.first {
            First::X86(f) => Some(f),
            _ => None,
        }
    }

    /// The first level, for the listing.
    pub(crate) fn first(&self) -> &First {
        &self.first
    }

    /// Whether a translation of `va` may be cached (not an AArch64 tagged
    /// address).
    #[inline(always)]
    pub(crate) fn cacheable(&self, va: u64) -> bool {
        match &self.first {
            First::Aarch64(a) => a.cacheable(va),
            _ => true,
        }
    }

    /// Translates `va` for `access`, changing nothing in memory.
    #[inline]
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: GuestVirtAddr,
        access: Access,
    ) -> Result<Translation, WalkFault> {
        self.translate_uncached(mem, va.0, access, WalkOptions::default())
    }

    /// Translates `va` for `access` with `options` and no cache: the lean
    /// walk where it answers, else every stage.
    #[inline(always)]
    pub(crate) fn translate_uncached<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
        options: WalkOptions,
    ) -> Result<Translation, WalkFault> {
        // A walk with nothing to remember, update or translate again (no
        // cache, no A/D, no second level) in a 64-bit guest: the lean walk
        // straight into the answer.
        if self.second.is_none() && !options.set_accessed_dirty {
            if let Some(t) = self.translate_lean(mem, va, access) {
                return Ok(t);
            }
        }
        self.translate_full(mem, va, access, options.set_accessed_dirty)
    }

    /// What x86's lean walk did not answer: the other architectures' lean
    /// walk where it answers, else every stage. Out of line, so x86's
    /// inlined lean walk stays as it was.
    #[inline(never)]
    fn translate_full<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
        set_ad: bool,
    ) -> Result<Translation, WalkFault> {
        self.translate_walk(mem, va, access, set_ad)
    }

    /// The lean walk of a 4/5-level guest, straight into a translation;
    /// `None` sends the caller down the full path.
    #[inline(always)]
    fn translate_lean<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Option<Translation> {
        let First::X86(fmt) = &self.first else {
            return self.translate_lean_other(mem, va, access);
        };
        let l = X86Long::of(fmt)?.walk_root(mem, va, access)?;
        let gpa = l.base | (va & ((1u64 << l.shift) - 1));
        Some(Translation {
            va: GuestVirtAddr(va),
            gpa: GuestPhysAddr(gpa),
            pa: GuestPhysAddr(gpa),
            page_size: 1 << l.shift,
            level: l.level,
            permissions: fmt.permissions(l.acc, l.leaf),
            attributes: fmt.attributes(l.level, l.leaf),
            arch_attributes: ArchAttributes::None,
            second: None,
            memory_refs: l.refs,
        })
    }

    /// The lean walk of an AArch64 or RISC-V guest, straight into a
    /// translation (`None` for x86, whose lean walk is
    /// [`Walker::translate_lean`], and wherever the full path must run).
    /// The walk runs out of line ([`Walker::lean_walk_other`]); the report
    /// is made here, as x86's is.
    #[inline(always)]
    fn translate_lean_other<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Option<Translation> {
        let l = self.lean_walk_other(mem, va, access)?;
        // `First::report`, with the format known.
        let (permissions, attributes, arch) = match &self.first {
            First::Aarch64(a) => first::aarch64_report(a, a.range_format(va), l.acc, l.leaf),
            First::Riscv { fmt: Some(fmt), .. } => first::riscv_report(fmt, l.acc, l.leaf),
            _ => return None,
        };
        Some(lean_translation(va, &l, permissions, attributes, arch))
    }

    /// The lean walk of an AArch64 guest (after the range checks of
    /// [`Walker::first_root`]: `None` where they fault or the MMU is off)
    /// or of a RISC-V guest (after its input check), from the root, in
    /// the format's own lean walk; `None` for the others.
    #[inline(never)]
    fn lean_walk_other<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
    ) -> Option<lean::LeanOut> {
        match &self.first {
            First::Aarch64(a) => {
                if !a.mmu_on() {
                    return None;
                }
                let (_, fmt) = a.select(va, access).ok()?;
                lean::walk_root(fmt, mem, va, access)
            }
            First::Riscv { fmt: Some(fmt), .. } => {
                fmt.check_input(va).ok()?;
                lean::walk_root(fmt, mem, va, access)
            }
            _ => None,
        }
    }

    /// Every stage of an uncached walk, in order. Kept out of line so the
    /// lean answer stays a few instructions.
    #[inline(never)]
    fn translate_walk<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        va: u64,
        access: Access,
        set_ad: bool,
    ) -> Result<Translation, WalkFault> {
        let req = Request { va, access, set_ad };
        let mut refs = 0;
        let walked = match self.first_root(va, access)? {
            None => None,
            Some(root) => Some(self.walk_levels(&root, mem, req, None, &mut refs)?),
        };
        let leaf = self.first_leaf(va, walked.as_ref());
        let second = self.translate_second(mem, req, &leaf, None, &mut refs)?;
        Ok(self.build_translation(va, &leaf, second.as_ref(), refs))
    }

    /// Stage one, the root: checks `va` (canonical form, width; AArch64:
    /// its range for `access`) and says where the guest's walk begins;
    /// `None` without paging (the address is the guest-physical one).
    #[inline]
    pub(crate) fn first_root(
        &self,
        va: u64,
        access: Access,
    ) -> Result<Option<FirstRoot<'_>>, WalkFault> {
        let at_input = |reason| Stop {
            level: 0,
            entry_addr: None,
            entry: None,
            reason,
            acc: 0,
        };
        let fmt = match &self.first {
            First::NoPaging if va > u64::from(u32::MAX) => {
                return Err(self.fault_first(
                    va,
                    access,
                    at_input(FaultReason::AddressTooWide),
                    None,
                ))
            }
            First::NoPaging => return Ok(None),
            First::X86(fmt) => FirstFmt::X86(fmt),
            First::Aarch64(a) if !a.mmu_on() => {
                // Stage 1 off: the output is the address (its top byte
                // dropped under TBI), which must fit the PA size (an
                // address size fault at level 0).
                if a.mmu_off_output(va, access).is_none() {
                    let s = at_input(FaultReason::AddressTooWide);
                    return Err(self.fault_first(va, access, s, None));
                }
                return Ok(None);
            }
            First::Riscv { fmt: None, pa_bits } => {
                if va >> pa_bits != 0 {
                    let s = at_input(FaultReason::AddressTooWide);
                    return Err(self.fault_first(va, access, s, None));
                }
                return Ok(None);
            }
            First::Riscv { fmt: Some(fmt), .. } => FirstFmt::Riscv(fmt),
            First::Aarch64(a) => match a.select(va, access) {
                Ok((_, fmt)) => FirstFmt::Aarch64(fmt),
                Err((kind, _)) => {
                    let reason = match kind {
                        Aarch64FaultKind::AddressSize => FaultReason::Reserved { bits: 0 },
                        _ => FaultReason::NonCanonical,
                    };
                    return Err(self.fault_first(va, access, at_input(reason), None));
                }
            },
        };
        match fmt.check_input(va) {
            Err(reason) => Err(self.fault_first(va, access, at_input(reason), None)),
            Ok(()) => Ok(Some(FirstRoot {
                fmt,
                start: second::root_start(&fmt),
            })),
        }
    }

    /// Stage two, the guest's levels: walks `req.va` from `root.start`
    /// (the root, or a table a cache kept) down to the leaf, checking the
    /// access there, through the second level when there is one (reusing
    /// and filling `memo`). Adds the memory references made to `refs`.
    #[inline]
    pub(crate) fn walk_levels<M: PhysMemory + ?Sized>(
        &self,
        root: &FirstRoot<'_>,
        mem: &M,
        req: Request,
        memo: Option<Memo<'_>>,
        refs: &mut u32,
    ) -> Result<Walked, WalkFault> {
        let start = root.start;
        let r = match root.fmt {
            FirstFmt::X86(fmt) => match X86Long::of(fmt) {
                // A 64-bit guest: the lean walk of its own, then the
                // engine.
                Some(long) => {
                    if self.second.is_none() && !req.set_ad {
                        if let Some((w, n)) =
                            lean::walk_recorded(&long, mem, req.va, req.access, start)
                        {
                            *refs += n;
                            return Ok(w);
                        }
                    }
                    self.walk_format(fmt, false, start, mem, req, memo, refs)
                }
                None => self.walk_format(fmt, true, start, mem, req, memo, refs),
            },
            FirstFmt::Aarch64(fmt) => self.walk_format(fmt, true, start, mem, req, memo, refs),
            FirstFmt::Riscv(fmt) => self.walk_format(fmt, true, start, mem, req, memo, refs),
        };
        r.map_err(|f| match f {
            Fail::Stop(s) => self.fault_first(req.va, req.access, s, Some(root.fmt)),
            Fail::Port(w) => w,
        })
    }

    /// The guest's levels in the architecture's own format `fmt` (the
    /// engine monomorphic): the lean walk first when `lean` says it may
    /// answer, else the engine, directly or through the second level.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn walk_format<F: Format, M: PhysMemory + ?Sized>(
        &self,
        fmt: &F,
        try_lean: bool,
        start: Start,
        mem: &M,
        req: Request,
        memo: Option<Memo<'_>>,
        refs: &mut u32,
    ) -> Result<Walked, Fail> {
        let Request { va, access, set_ad } = req;
        match &self.second {
            None => {
                if try_lean && !set_ad {
                    if let Some((w, n)) = lean::walk_recorded(fmt, mem, va, access, start) {
                        *refs += n;
                        return Ok(w);
                    }
                }
                // The lean walk stopped (a fault ahead, or not its case):
                // the full engine walks from the root, so a fault it
                // reports names the level that really denied, whatever the
                // cache held.
                let start = if set_ad {
                    start
                } else {
                    second::root_start(fmt)
                };
                let mut port = DirectPort { mem, refs: 0 };
                let r = engine::walk(fmt, &mut port, va, access, false, set_ad, start);
                *refs += port.refs;
                r
            }
            Some(second) => {
                let mut port = NestedPort {
                    second,
                    mem,
                    site: self.site(va, access, None),
                    set_ad,
                    refs: 0,
                    memo,
                };
                let r = engine::walk(fmt, &mut port, va, access, false, set_ad, start);
                *refs += port.refs;
                r
            }
        }
    }

    /// Stage three, the leaf: the first level's output for `va`, from the
    /// walk (`None` without paging).
    #[inline]
    pub(crate) fn first_leaf(&self, va: u64, walked: Option<&Walked>) -> FirstLeaf {
        match walked {
            Some(w) => {
                let (permissions, attributes, arch) =
                    self.first.report(va, w.acc, w.leaf, w.leaf_level);
                FirstLeaf {
                    gpa: w.base | (va & ((1u64 << w.shift) - 1)),
                    shift: w.shift,
                    level: w.leaf_level,
                    permissions,
                    attributes,
                    arch,
                    acc: w.acc,
                    leaf: w.leaf,
                }
            }
            None => FirstLeaf {
                gpa: self.first.untranslated(va),
                shift: PAGE_SHIFT_U8,
                level: 0,
                permissions: Permissions::no_paging(),
                attributes: LeafAttributes::default(),
                arch: ArchAttributes::None,
                acc: 0,
                leaf: 0,
            },
        }
    }

    /// Stage four, the second level: translates the leaf's guest-physical
    /// address for the access (`None` without a second level), reusing and
    /// filling `memo`. Adds the memory references made to `refs`.
    #[inline]
    pub(crate) fn translate_second<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        req: Request,
        leaf: &FirstLeaf,
        memo: Option<Memo<'_>>,
        refs: &mut u32,
    ) -> Result<Option<SecondOut>, WalkFault> {
        let Some(second) = &self.second else {
            return Ok(None);
        };
        let site = self.site(req.va, req.access, None);
        let (kind, user) = (req.access.kind, leaf.permissions.user);
        second
            .walk(mem, leaf.gpa, kind, user, req.set_ad, site, memo, refs)
            .map(Some)
    }

    /// Stage five, the answer: the translation of `va` from the first
    /// level's leaf and the second level's output.
    #[inline]
    pub(crate) fn build_translation(
        &self,
        va: u64,
        leaf: &FirstLeaf,
        second: Option<&SecondOut>,
        refs: u32,
    ) -> Translation {
        let (pa, info) = match (second, &self.second) {
            (Some(s), Some(level)) => (second::output(s, leaf.gpa), Some(level.info(s))),
            _ => (leaf.gpa, None),
        };
        Translation {
            va: GuestVirtAddr(va),
            gpa: GuestPhysAddr(leaf.gpa),
            pa: GuestPhysAddr(pa),
            page_size: 1 << leaf.shift,
            level: leaf.level,
            permissions: leaf.permissions,
            attributes: leaf.attributes,
            arch_attributes: leaf.arch,
            second: info,
            memory_refs: refs,
        }
    }

    /// The first level's report of cached rights for `va`: its
    /// permissions and its leaf's attributes.
    #[inline(always)]
    pub(crate) fn first_report(
        &self,
        va: u64,
        acc: u64,
        leaf: u64,
        level: u8,
    ) -> (Permissions, LeafAttributes, ArchAttributes) {
        self.first.report(va, acc, leaf, level)
    }

    /// The second level's report of cached rights (`None` without one).
    #[inline(always)]
    pub(crate) fn second_report(&self, s: &SecondOut) -> Option<SecondTranslation> {
        self.second.as_ref().map(|second| second.info(s))
    }

    /// Whether both levels' cached rights allow `access`, with this
    /// walker's check settings (`has_second`: the rights of a second level
    /// are known).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn allows(
        &self,
        va: u64,
        acc1: u64,
        leaf1: u64,
        acc2: u64,
        leaf2: u64,
        has_second: bool,
        access: Access,
    ) -> bool {
        let (first_ok, user) = match self.first.format_of(va) {
            Some(fmt) => each_format!(fmt, f => (
                f.check(acc1, leaf1, access, false).is_ok(),
                f.permissions(acc1, leaf1).user,
            )),
            None => (true, true),
        };
        let second_ok = match (&self.second, has_second) {
            (None, _) => true,
            (Some(_), false) => false,
            (Some(s), true) => s.allows(acc2, leaf2, access.kind, access.privilege, user),
        };
        first_ok && second_ok
    }

    /// A fault site of this walk.
    #[inline]
    fn site(&self, va: u64, access: Access, guest_table: Option<u8>) -> FaultSite {
        FaultSite {
            va,
            access,
            guest_table,
            pae: self.mode() == X86Mode::Pae,
        }
    }

    /// A first-level stop in `fmt`'s walk (`None`: an input check) as the
    /// fault the guest would see.
    fn fault_first(
        &self,
        va: u64,
        access: Access,
        s: Stop,
        fmt: Option<FirstFmt<'_>>,
    ) -> WalkFault {
        WalkFault {
            va: GuestVirtAddr(va),
            gpa: None,
            access,
            stage: Stage::First,
            level: s.level,
            entry_addr: s.entry_addr.map(GuestPhysAddr),
            entry: s.entry,
            reason: s.reason,
            code: self
                .first
                .fault_code(fmt, &s, va, access, self.second.is_some()),
        }
    }

    /// Translates a guest-physical address through the second level (the
    /// identity without one): what reading a guest page table costs.
    pub(crate) fn guest_table_to_pa<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        gpa: u64,
        va: u64,
        level: u8,
    ) -> Result<u64, WalkFault> {
        let Some(second) = &self.second else {
            return Ok(gpa);
        };
        let mut refs = 0;
        let kind = second.table_access_kind();
        let site = self.site(va, Access::read(), Some(level));
        let s = second.walk(mem, gpa, kind, false, false, site, None, &mut refs)?;
        Ok(second::output(&s, gpa))
    }
}

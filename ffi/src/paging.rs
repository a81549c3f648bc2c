//! Guest page-table walks: `pf_walker`, `pf_walk_cache` and their exports.
//!
//! A `pf_walker` is one guest address space (x86 paging registers with an
//! optional EPT or NPT below them, or AArch64 stage-1 registers); it is
//! immutable, so any number of threads may
//! use one at once. A `pf_walk_cache` is a software TLB for one vCPU: it is
//! used by one thread at a time (the caller serializes, as with a vCPU).

// The types carry their C names, so the header and the Rust agree.
#![allow(non_camel_case_types)]

use std::ffi::{c_int, c_void};

use pagefold::paging::{
    Aarch64Paging, Aarch64Stage2, Access, AccessKind, ArchAttributes, EptConfig, FaultCode,
    FaultReason, Mapping, NptConfig, Privilege, RiscvGStage, RiscvPaging, SecondLevel, Stage,
    Translation, WalkCache, WalkFault, WalkOptions, Walker, WalkerError, X86Paging,
};
use pagefold::{GuestPhysAddr, GuestVirtAddr};

use crate::{
    args::{self, SizePrefixed},
    memory::{memory, pf_guest_memory},
    status::{pf_status, Error},
};

/// One guest address space: made by `pf_walker_new`, released by
/// `pf_walker_free`. Immutable and thread-safe.
pub struct pf_walker {
    walker: Walker,
}

/// A walk cache (software TLB and paging-structure cache) for one vCPU:
/// made by `pf_walk_cache_new`, released by `pf_walk_cache_free`. Not
/// thread-safe: one thread at a time.
pub struct pf_walk_cache {
    cache: WalkCache,
}

/// `pf_x86_paging.flags`: the CPU has no 1 GiB pages (PS in a PDPTE is a
/// reserved bit).
pub const PF_X86_NO_1G_PAGES: u32 = 1 << 0;

/// The guest's x86 paging registers. Size-prefixed: set `struct_size` to
/// `sizeof(pf_x86_paging)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_x86_paging {
    /// `sizeof(pf_x86_paging)` as the caller was compiled with.
    pub struct_size: usize,
    /// CR0 (PE, WP, PG).
    pub cr0: u64,
    /// CR3: the guest-physical address of the root table, and the PCID
    /// with CR4.PCIDE.
    pub cr3: u64,
    /// CR4 (PSE, PAE, PGE, LA57, PCIDE, SMEP, SMAP, PKE, PKS).
    pub cr4: u64,
    /// IA32_EFER (LME, LMA, NXE).
    pub efer: u64,
    /// PKRU (protection keys for user pages).
    pub pkru: u32,
    /// IA32_PKRS (protection keys for supervisor pages).
    pub pkrs: u32,
    /// MAXPHYADDR (32..=52); 0 means 52.
    pub maxphyaddr: u32,
    /// `PF_X86_*` flags.
    pub flags: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_x86_paging {
    const NAME: &'static str = "pf_x86_paging";
}

/// `pf_aarch64_paging.flags`: PSTATE.PAN is set (EL1 data accesses to
/// EL0-accessible pages fault).
pub const PF_AARCH64_PAN: u32 = 1 << 0;
/// `pf_aarch64_paging.flags`: the CPU implements FEAT_LVA (52-bit VAs with
/// the 64 KiB granule).
pub const PF_AARCH64_LVA: u32 = 1 << 1;
/// `pf_aarch64_paging.flags`: the CPU implements FEAT_LPA2 (TCR_EL1.DS:
/// 52-bit VAs and OAs with the 4 and 16 KiB granules).
pub const PF_AARCH64_LPA2: u32 = 1 << 2;

/// The guest's AArch64 EL1&0 stage-1 registers. Size-prefixed: set
/// `struct_size` to `sizeof(pf_aarch64_paging)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_aarch64_paging {
    /// `sizeof(pf_aarch64_paging)` as the caller was compiled with.
    pub struct_size: usize,
    /// TCR_EL1.
    pub tcr: u64,
    /// TTBR0_EL1 (the lower range's root and ASID).
    pub ttbr0: u64,
    /// TTBR1_EL1 (the upper range's root and ASID).
    pub ttbr1: u64,
    /// SCTLR_EL1 (M and WXN are read).
    pub sctlr: u64,
    /// MAIR_EL1 (for the attributes reported).
    pub mair: u64,
    /// The implemented physical-address size in bits
    /// (ID_AA64MMFR0_EL1.PARange: 32, 36, 40, 42, 44, 48, 52); 0 means 48.
    pub pa_bits: u32,
    /// `PF_AARCH64_*` flags.
    pub flags: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_aarch64_paging {
    const NAME: &'static str = "pf_aarch64_paging";
}

/// `pf_riscv_paging.flags` / `pf_riscv_gstage.flags`: MXR (loads may read
/// executable pages; for the VS stage, `vsstatus.MXR | sstatus.MXR`).
pub const PF_RISCV_MXR: u32 = 1 << 0;
/// `pf_riscv_paging.flags`: SUM (S-mode loads and stores may use U pages).
pub const PF_RISCV_SUM: u32 = 1 << 1;
/// Flags: Svadu in force (`menvcfg`/`henvcfg.ADUE`): the walk sets A and D.
pub const PF_RISCV_ADUE: u32 = 1 << 2;
/// Flags: Svpbmt in force (`menvcfg`/`henvcfg.PBMTE`).
pub const PF_RISCV_PBMTE: u32 = 1 << 3;
/// Flags: Svnapot implemented (64 KiB NAPOT pages).
pub const PF_RISCV_SVNAPOT: u32 = 1 << 4;

/// A RISC-V guest's first stage: `satp` (or `vsatp`) and the status and
/// extension bits the walk reads. Size-prefixed: set `struct_size` to
/// `sizeof(pf_riscv_paging)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_riscv_paging {
    /// `sizeof(pf_riscv_paging)` as the caller was compiled with.
    pub struct_size: usize,
    /// `satp`/`vsatp`: MODE (Bare, Sv39, Sv48, Sv57), ASID, root PPN.
    pub satp: u64,
    /// `PF_RISCV_*` flags.
    pub flags: u32,
    /// The physical-address width in bits (32..=56); 0 means 56.
    pub pa_bits: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_riscv_paging {
    const NAME: &'static str = "pf_riscv_paging";
}

/// A RISC-V G stage: `hgatp` and the bits the walk reads. Size-prefixed:
/// set `struct_size` to `sizeof(pf_riscv_gstage)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_riscv_gstage {
    /// `sizeof(pf_riscv_gstage)` as the caller was compiled with.
    pub struct_size: usize,
    /// `hgatp`: MODE (Bare, Sv39x4, Sv48x4, Sv57x4), VMID, root PPN.
    pub hgatp: u64,
    /// `PF_RISCV_*` flags but `PF_RISCV_SUM` (`PF_RISCV_MXR` is the
    /// HS-level `sstatus.MXR`).
    pub flags: u32,
    /// The physical-address width in bits (32..=56); 0 means 56.
    pub pa_bits: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_riscv_gstage {
    const NAME: &'static str = "pf_riscv_gstage";
}

/// `pf_aarch64_stage2.flags`: the CPU implements FEAT_XNX (stage-2 execute
/// permission split by EL).
pub const PF_AARCH64_S2_XNX: u32 = 1 << 0;
/// `pf_aarch64_stage2.flags`: FEAT_LPA2 (VTCR_EL2.DS may be set).
pub const PF_AARCH64_S2_LPA2: u32 = 1 << 1;
/// `pf_aarch64_stage2.flags`: FEAT_TTST (small translation tables: T0SZ
/// up to 48).
pub const PF_AARCH64_S2_TTST: u32 = 1 << 2;

/// An AArch64 stage 2 under the guest's stage 1. Size-prefixed: set
/// `struct_size` to `sizeof(pf_aarch64_stage2)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_aarch64_stage2 {
    /// `sizeof(pf_aarch64_stage2)` as the caller was compiled with.
    pub struct_size: usize,
    /// VTCR_EL2.
    pub vtcr: u64,
    /// VTTBR_EL2 (the stage-2 root and VMID).
    pub vttbr: u64,
    /// The implemented physical-address size in bits; 0 means 48.
    pub pa_bits: u32,
    /// `PF_AARCH64_S2_*` flags.
    pub flags: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_aarch64_stage2 {
    const NAME: &'static str = "pf_aarch64_stage2";
}

/// `pf_second_level.kind`: Intel EPT (`root` is the EPTP).
pub const PF_SECOND_LEVEL_EPT: u32 = 1;
/// `pf_second_level.kind`: AMD nested paging (`root` is N_CR3).
pub const PF_SECOND_LEVEL_NPT: u32 = 2;
/// `pf_second_level.flags` (EPT): execute-only entries are supported.
pub const PF_EPT_EXECUTE_ONLY: u32 = 1 << 0;
/// `pf_second_level.flags` (EPT): mode-based execute control.
pub const PF_EPT_MODE_BASED_EXECUTE: u32 = 1 << 1;
/// `pf_second_level.flags` (NPT): 5-level nested paging.
pub const PF_NPT_FIVE_LEVEL: u32 = 1 << 2;
/// `pf_second_level.flags` (NPT): host EFER.NXE (the XD bit is honoured).
pub const PF_NPT_NXE: u32 = 1 << 3;

/// A second level under the guest's paging. Size-prefixed: set
/// `struct_size` to `sizeof(pf_second_level)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pf_second_level {
    /// `sizeof(pf_second_level)` as the caller was compiled with.
    pub struct_size: usize,
    /// `PF_SECOND_LEVEL_EPT` or `PF_SECOND_LEVEL_NPT`.
    pub kind: u32,
    /// `PF_EPT_*` / `PF_NPT_*` flags.
    pub flags: u32,
    /// The EPTP (EPT) or N_CR3 (NPT): register values, whose bits 51:12
    /// are the guest-physical address of the root table in the memory the
    /// walker reads.
    pub root: u64,
    /// MAXPHYADDR (32..=52); 0 means 52.
    pub maxphyaddr: u32,
    /// Zero; reserved.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_second_level {
    const NAME: &'static str = "pf_second_level";
}

/// Access flag: a data write (default: a data read).
pub const PF_ACCESS_WRITE: u32 = 1 << 0;
/// Access flag: an instruction fetch.
pub const PF_ACCESS_FETCH: u32 = 1 << 1;
/// Access flag: from user mode (CPL 3).
pub const PF_ACCESS_USER: u32 = 1 << 2;
/// Access flag: an implicit supervisor access (SMAP applies whatever AC).
pub const PF_ACCESS_IMPLICIT: u32 = 1 << 3;
/// Access flag: EFLAGS.AC is set.
pub const PF_ACCESS_AC: u32 = 1 << 4;
/// Walk flag: set accessed/dirty flags as hardware does.
pub const PF_WALK_SET_ACCESSED_DIRTY: u32 = 1 << 5;

/// Permission bits of `pf_translation.permissions` / `pf_mapping.permissions`.
pub const PF_PERM_READ: u32 = 1 << 0;
/// Writable at every level.
pub const PF_PERM_WRITE: u32 = 1 << 1;
/// Executable.
pub const PF_PERM_EXECUTE: u32 = 1 << 2;
/// A user page.
pub const PF_PERM_USER: u32 = 1 << 3;
/// Executable from user mode.
pub const PF_PERM_USER_EXECUTE: u32 = 1 << 4;

/// Leaf attribute bits of `pf_translation.attributes` / `pf_mapping.attributes`.
pub const PF_ATTR_ACCESSED: u32 = 1 << 0;
/// Dirty.
pub const PF_ATTR_DIRTY: u32 = 1 << 1;
/// Global.
pub const PF_ATTR_GLOBAL: u32 = 1 << 2;
/// PWT.
pub const PF_ATTR_WRITE_THROUGH: u32 = 1 << 3;
/// PCD.
pub const PF_ATTR_CACHE_DISABLE: u32 = 1 << 4;
/// PAT bit.
pub const PF_ATTR_PAT: u32 = 1 << 5;

/// A translation. Size-prefixed out-struct: set `struct_size` to
/// `sizeof(pf_translation)` before the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pf_translation {
    /// In: `sizeof(pf_translation)` as the caller was compiled with.
    pub struct_size: usize,
    /// The guest-virtual address translated.
    pub va: u64,
    /// The guest-physical address (the guest's own tables' output).
    pub gpa: u64,
    /// A guest-physical address of the memory `mem` holds (the second
    /// level's output, L1's for a nested guest; `gpa` without one).
    pub pa: u64,
    /// The guest page's size.
    pub page_size: u64,
    /// The second-level page's size (0 without a second level).
    pub second_page_size: u64,
    /// `PF_PERM_*` of the guest's tables.
    pub permissions: u32,
    /// `PF_ATTR_*` of the guest's leaf.
    pub attributes: u32,
    /// Level of the guest's leaf (0 without paging).
    pub level: u32,
    /// Memory references the walk made (0 for a cache hit).
    pub memory_refs: u32,
    /// The architecture's own leaf attributes: for AArch64, bits 7:0 the
    /// MAIR_EL1 byte the descriptor selects, 10:8 AttrIndx, 12:11
    /// shareability, 14:13 `AP[2:1]`, 15 nG, 16 DBM, 17 the contiguous
    /// hint, 18 NS; for RISC-V, bits 1:0 PBMT, 2 N (NAPOT), 3 G, 4 A, 5 D,
    /// 7:6 RSW; 0 for x86.
    pub arch_attributes: u64,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_translation {
    const NAME: &'static str = "pf_translation";
}

/// `pf_walk_fault.code_kind`: an x86 #PF; `code` is its error code.
pub const PF_FAULT_PAGE_FAULT: u32 = 1;
/// `pf_walk_fault.code_kind`: #GP(0) (a non-canonical address).
pub const PF_FAULT_GENERAL_PROTECTION: u32 = 2;
/// `pf_walk_fault.code_kind`: EPT violation; `code` is the exit
/// qualification.
pub const PF_FAULT_EPT_VIOLATION: u32 = 3;
/// `pf_walk_fault.code_kind`: EPT misconfiguration.
pub const PF_FAULT_EPT_MISCONFIG: u32 = 4;
/// `pf_walk_fault.code_kind`: AMD #VMEXIT(NPF); `code` is EXITINFO1.
pub const PF_FAULT_NESTED_PAGE_FAULT: u32 = 5;
/// `pf_walk_fault.code_kind`: no architectural event (memory not backed);
/// an emulation failure for the VMM.
pub const PF_FAULT_EMULATION: u32 = 6;
/// `pf_walk_fault.code_kind`: an AArch64 instruction or data abort; `code`
/// is its ESR_EL1 (the fault status code with the lookup level in bits
/// 5:0); FAR_EL1 is `va`.
pub const PF_FAULT_AARCH64_ABORT: u32 = 7;
/// `pf_walk_fault.code_kind`: a RISC-V trap; `code` is the exception code
/// (12/13/15 page fault, 20/21/23 guest-page fault, 1/5/7 access fault),
/// `stval` is `va`, and `htval`, `htinst`, `gva` are filled.
pub const PF_FAULT_RISCV_TRAP: u32 = 8;
/// `pf_walk_fault.code_kind`: an AArch64 stage-2 abort taken to EL2;
/// `code` is ESR_EL2 (S1PTW in bit 7 for a fault on a stage-1 table
/// access), `hpfar` HPFAR_EL2, `gpa` the faulting IPA, `va` FAR_EL2.
pub const PF_FAULT_AARCH64_STAGE2_ABORT: u32 = 9;

/// `pf_walk_fault.reason` values.
pub const PF_REASON_NOT_PRESENT: u32 = 1;
/// Permission (R/W, U/S, XD, SMEP, SMAP; EPT R/W/X).
pub const PF_REASON_PERMISSION: u32 = 2;
/// Protection key.
pub const PF_REASON_PROTECTION_KEY: u32 = 3;
/// Reserved bits set.
pub const PF_REASON_RESERVED: u32 = 4;
/// Non-canonical address.
pub const PF_REASON_NON_CANONICAL: u32 = 5;
/// Address wider than the mode translates.
pub const PF_REASON_ADDRESS_TOO_WIDE: u32 = 6;
/// EPT misconfiguration.
pub const PF_REASON_MISCONFIGURED: u32 = 7;
/// A table or page outside guest memory.
pub const PF_REASON_UNBACKED: u32 = 8;
/// Accessed/dirty update on read-only memory.
pub const PF_REASON_READ_ONLY_TABLE: u32 = 9;
/// Accessed/dirty update kept losing races.
pub const PF_REASON_CONTENDED: u32 = 10;
/// Listing visited its entry budget.
pub const PF_REASON_TOO_MANY_ENTRIES: u32 = 11;

/// Why a walk failed. Size-prefixed out-struct: set `struct_size` to
/// `sizeof(pf_walk_fault)` before the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pf_walk_fault {
    /// In: `sizeof(pf_walk_fault)` as the caller was compiled with.
    pub struct_size: usize,
    /// The guest-virtual address being translated.
    pub va: u64,
    /// For a second-level fault: the guest-physical address it translated.
    pub gpa: u64,
    /// The entry's address in the memory `mem` holds (0 when `has_entry`
    /// is 0).
    pub entry_addr: u64,
    /// The entry's value.
    pub entry: u64,
    /// `code_kind`'s value: #PF error code, EPT qualification, EXITINFO1.
    pub code: u64,
    /// For `PF_REASON_RESERVED`: the offending bits; for
    /// `PF_REASON_UNBACKED`: the guest-physical address, in the memory
    /// `mem` holds, that nothing backs; for `PF_REASON_PROTECTION_KEY`: the
    /// key.
    pub detail: u64,
    /// `PF_FAULT_*`.
    pub code_kind: u32,
    /// `PF_REASON_*`.
    pub reason: u32,
    /// 1 for the guest's tables, 2 for the second level.
    pub stage: u32,
    /// Second level: the guest table level being read, or 0 for the final
    /// address.
    pub guest_table_level: u32,
    /// The faulting entry's level (0: none).
    pub level: u32,
    /// 1 when `entry_addr`/`entry` are set.
    pub has_entry: u32,
    /// `PF_FAULT_RISCV_TRAP`: `htval` (the guest-physical address >> 2 of
    /// a guest-page fault, 0 otherwise). 0 for other kinds.
    pub htval: u64,
    /// `PF_FAULT_RISCV_TRAP`: `htinst` (the pseudoinstruction of a
    /// guest-page fault on an implicit VS-stage page-table access, 0
    /// otherwise). 0 for other kinds.
    pub htinst: u64,
    /// `PF_FAULT_AARCH64_STAGE2_ABORT`: HPFAR_EL2 (the faulting IPA's
    /// page). 0 for other kinds.
    pub hpfar: u64,
    /// `PF_FAULT_RISCV_TRAP`: `hstatus.GVA` (1: `va` is a guest virtual
    /// address). 0 for other kinds.
    pub gva: u32,
    /// Zero.
    pub reserved: u32,
}

// SAFETY: `#[repr(C)]`, `struct_size: usize` first, integers only.
unsafe impl SizePrefixed for pf_walk_fault {
    const NAME: &'static str = "pf_walk_fault";
}

/// One mapping, as `pf_walker_mappings` hands it to its callback.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pf_mapping {
    /// First guest-virtual address.
    pub va: u64,
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The leaf entry.
    pub entry: u64,
    /// `PF_PERM_*`.
    pub permissions: u32,
    /// `PF_ATTR_*`.
    pub attributes: u32,
    /// Level of the leaf.
    pub level: u32,
    /// Protection key (0 without keys).
    pub key: u32,
    /// The architecture's own leaf attributes, as
    /// `pf_translation.arch_attributes`.
    pub arch_attributes: u64,
}

/// One physically contiguous piece of a virtual range
/// (`pf_walker_translate_range`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct pf_segment {
    /// First guest-virtual address.
    pub va: u64,
    /// Its guest-physical address.
    pub gpa: u64,
    /// Its guest-physical address in the memory `mem` holds (the second
    /// level's output; `gpa` without one).
    pub pa: u64,
    /// Bytes.
    pub len: u64,
}

/// Called once per segment; return 0 to go on, anything else to stop.
pub type pf_segment_fn =
    Option<unsafe extern "C" fn(segment: *const pf_segment, user: *mut c_void) -> c_int>;

/// Called once per mapping; return 0 to go on, anything else to stop.
pub type pf_mapping_fn =
    Option<unsafe extern "C" fn(mapping: *const pf_mapping, user: *mut c_void) -> c_int>;

impl From<WalkerError> for Error {
    fn from(e: WalkerError) -> Self {
        Error::invalid(e)
    }
}

fn access_of(flags: u32) -> Result<(Access, WalkOptions), Error> {
    let known = PF_ACCESS_WRITE
        | PF_ACCESS_FETCH
        | PF_ACCESS_USER
        | PF_ACCESS_IMPLICIT
        | PF_ACCESS_AC
        | PF_WALK_SET_ACCESSED_DIRTY;
    if flags & !known != 0 {
        return Err(Error::invalid(format!(
            "unknown access flags {:#x}",
            flags & !known
        )));
    }
    let kind = match (flags & PF_ACCESS_WRITE != 0, flags & PF_ACCESS_FETCH != 0) {
        (false, false) => AccessKind::Read,
        (true, false) => AccessKind::Write,
        (false, true) => AccessKind::Fetch,
        (true, true) => {
            return Err(Error::invalid(
                "PF_ACCESS_WRITE and PF_ACCESS_FETCH are exclusive",
            ))
        }
    };
    let privilege = match (flags & PF_ACCESS_USER != 0, flags & PF_ACCESS_IMPLICIT != 0) {
        (false, false) => Privilege::Supervisor,
        (true, false) => Privilege::User,
        (false, true) => Privilege::SupervisorImplicit,
        (true, true) => {
            return Err(Error::invalid(
                "PF_ACCESS_USER and PF_ACCESS_IMPLICIT are exclusive",
            ))
        }
    };
    Ok((
        Access::new(kind, privilege).with_ac(flags & PF_ACCESS_AC != 0),
        WalkOptions {
            set_accessed_dirty: flags & PF_WALK_SET_ACCESSED_DIRTY != 0,
        },
    ))
}

/// `flag` when `on`, else 0.
fn bit(on: bool, flag: u32) -> u32 {
    if on {
        flag
    } else {
        0
    }
}

fn perm_bits(p: &pagefold::paging::Permissions) -> u32 {
    bit(p.read, PF_PERM_READ)
        | bit(p.write, PF_PERM_WRITE)
        | bit(p.execute, PF_PERM_EXECUTE)
        | bit(p.user, PF_PERM_USER)
        | bit(p.user_execute, PF_PERM_USER_EXECUTE)
}

fn attr_bits(a: &pagefold::paging::LeafAttributes) -> u32 {
    bit(a.accessed, PF_ATTR_ACCESSED)
        | bit(a.dirty, PF_ATTR_DIRTY)
        | bit(a.global, PF_ATTR_GLOBAL)
        | bit(a.write_through, PF_ATTR_WRITE_THROUGH)
        | bit(a.cache_disable, PF_ATTR_CACHE_DISABLE)
        | bit(a.pat, PF_ATTR_PAT)
}

fn translation_out(t: &Translation) -> pf_translation {
    pf_translation {
        struct_size: std::mem::size_of::<pf_translation>(),
        va: t.va.raw(),
        gpa: t.gpa.raw(),
        pa: t.pa.raw(),
        page_size: t.page_size,
        second_page_size: t.second.map_or(0, |s| s.page_size),
        permissions: perm_bits(&t.permissions),
        attributes: attr_bits(&t.attributes),
        level: u32::from(t.level),
        memory_refs: t.memory_refs,
        arch_attributes: arch_bits(&t.arch_attributes),
    }
}

/// `pf_translation.arch_attributes` and `pf_mapping.arch_attributes`.
fn arch_bits(a: &ArchAttributes) -> u64 {
    match a {
        ArchAttributes::Riscv(r) => {
            u64::from(r.pbmt)
                | u64::from(r.napot) << 2
                | u64::from(r.global) << 3
                | u64::from(r.accessed) << 4
                | u64::from(r.dirty) << 5
                | u64::from(r.rsw) << 6
        }
        ArchAttributes::Aarch64(a) => {
            u64::from(a.memory_attr)
                | u64::from(a.attr_index) << 8
                | u64::from(a.shareability) << 11
                | u64::from(a.ap) << 13
                | u64::from(a.not_global) << 15
                | u64::from(a.dbm) << 16
                | u64::from(a.contiguous) << 17
                | u64::from(a.non_secure) << 18
        }
        _ => 0,
    }
}

fn fault_value(f: &WalkFault) -> pf_walk_fault {
    let riscv = match f.code {
        FaultCode::Riscv(t) => Some(t),
        _ => None,
    };
    let (code_kind, code) = match f.code {
        FaultCode::PageFault { error_code } => (PF_FAULT_PAGE_FAULT, u64::from(error_code)),
        FaultCode::GeneralProtection => (PF_FAULT_GENERAL_PROTECTION, 0),
        FaultCode::EptViolation { qualification } => (PF_FAULT_EPT_VIOLATION, qualification),
        FaultCode::EptMisconfig => (PF_FAULT_EPT_MISCONFIG, 0),
        FaultCode::NestedPageFault { exit_info1 } => (PF_FAULT_NESTED_PAGE_FAULT, exit_info1),
        FaultCode::Aarch64Abort { esr } => (PF_FAULT_AARCH64_ABORT, esr),
        FaultCode::Riscv(t) => (PF_FAULT_RISCV_TRAP, u64::from(t.cause)),
        FaultCode::Aarch64Stage2Abort { esr, .. } => (PF_FAULT_AARCH64_STAGE2_ABORT, esr),
        FaultCode::Emulation => (PF_FAULT_EMULATION, 0),
    };
    let (reason, detail) = match f.reason {
        FaultReason::NotPresent => (PF_REASON_NOT_PRESENT, 0),
        FaultReason::Permission => (PF_REASON_PERMISSION, 0),
        FaultReason::ProtectionKey { key } => (PF_REASON_PROTECTION_KEY, u64::from(key)),
        FaultReason::Reserved { bits } => (PF_REASON_RESERVED, bits),
        FaultReason::NonCanonical => (PF_REASON_NON_CANONICAL, 0),
        FaultReason::AddressTooWide => (PF_REASON_ADDRESS_TOO_WIDE, 0),
        FaultReason::Misconfigured => (PF_REASON_MISCONFIGURED, 0),
        FaultReason::Unbacked { pa } => (PF_REASON_UNBACKED, pa.raw()),
        FaultReason::ReadOnlyTable => (PF_REASON_READ_ONLY_TABLE, 0),
        FaultReason::Contended => (PF_REASON_CONTENDED, 0),
        FaultReason::TooManyEntries => (PF_REASON_TOO_MANY_ENTRIES, 0),
    };
    let (stage, guest_table_level) = match f.stage {
        Stage::First => (1, 0),
        Stage::Second { guest_table } => (2, guest_table.map_or(0, u32::from)),
    };
    pf_walk_fault {
        struct_size: std::mem::size_of::<pf_walk_fault>(),
        va: f.va.raw(),
        gpa: f.gpa.map_or(0, GuestPhysAddr::raw),
        entry_addr: f.entry_addr.map_or(0, GuestPhysAddr::raw),
        entry: f.entry.unwrap_or(0),
        code,
        detail,
        code_kind,
        reason,
        stage,
        guest_table_level,
        level: u32::from(f.level),
        has_entry: u32::from(f.entry.is_some()),
        htval: riscv.map_or(0, |t| t.htval),
        htinst: riscv.map_or(0, |t| t.htinst),
        hpfar: match f.code {
            FaultCode::Aarch64Stage2Abort { hpfar, .. } => hpfar,
            _ => 0,
        },
        gva: u32::from(riscv.is_some_and(|t| t.gva)),
        reserved: 0,
    }
}

/// Checks the caller's `fault_out` (NULL allowed) before a walk, so a
/// too-small struct is refused before anything happens, not when the walk
/// faults (a review found it refused only then, after a partial read or
/// accessed/dirty updates, and with the wrong status).
///
/// # Safety
///
/// `fault_out` is NULL or valid for reads and writes of its `struct_size`
/// bytes.
unsafe fn fault_slot<'a>(
    fault_out: *mut pf_walk_fault,
) -> Result<Option<args::SizedOut<'a, pf_walk_fault>>, Error> {
    if fault_out.is_null() {
        return Ok(None);
    }
    // SAFETY: not NULL, and valid as the caller guarantees.
    Ok(Some(unsafe { args::sized_out(fault_out, "fault_out") }?))
}

/// The `PF_ERR_FAULT` error for `f`, its description written to the slot
/// `fault_slot` checked before the walk.
fn report_fault(f: &WalkFault, slot: Option<args::SizedOut<'_, pf_walk_fault>>) -> Error {
    if let Some(out) = slot {
        out.write(fault_value(f));
    }
    Error::new(pf_status::PF_ERR_FAULT, f.to_string())
}

/// Borrows a walker handle.
///
/// # Safety
///
/// `w` is NULL or a live `pf_walker` handle for `'a`.
unsafe fn walker<'a>(w: *const pf_walker) -> Result<&'a Walker, Error> {
    // SAFETY: forwarded from this function's contract.
    Ok(&unsafe { args::handle(w, "walker") }?.walker)
}

/// Borrows an optional cache handle mutably.
///
/// # Safety
///
/// `c` is NULL or a live `pf_walk_cache` that no other thread uses for
/// `'a`.
unsafe fn cache<'a>(c: *mut pf_walk_cache) -> Option<&'a mut WalkCache> {
    // SAFETY: NULL gives None; otherwise the caller guarantees a live,
    // exclusively used handle (handles come from `Box::into_raw`, aligned).
    unsafe { c.as_mut() }.map(|c| &mut c.cache)
}

/// Creates a walker for the guest registers `paging` with the optional
/// second level `second` (NULL: none) and stores it in `*out_walker`.
///
/// Errors: `PF_ERR_NULL_POINTER` (`paging`, `out_walker`),
/// `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_INVALID_ARGUMENT` (registers no x86
/// CPU holds: a reserved bit of CR0, CR4 or EFER, which the message names
/// with the bits, or a combination a MOV to CR0/CR4 or a WRMSR refuses;
/// MAXPHYADDR outside 32..=52, an EPTP walk length other than 4 or 5, an
/// unknown kind or flag).
///
/// # Safety
///
/// - `paging` is NULL or points to a `pf_x86_paging` whose `struct_size`
///   bytes are readable; `second` likewise for `pf_second_level`.
/// - `out_walker` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_new(
    paging: *const pf_x86_paging,
    second: *const pf_second_level,
    out_walker: *mut *mut pf_walker,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or readable for `struct_size` bytes (contract).
        let p = unsafe { args::read_sized(paging, "paging") }?;
        // SAFETY: NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_walker, "out_walker") }?;
        if p.flags & !PF_X86_NO_1G_PAGES != 0 {
            return Err(Error::invalid(format!("unknown pf_x86_paging flags {:#x}", p.flags)));
        }
        let maxphy = |m: u32| -> Result<u8, Error> {
            if m == 0 {
                return Ok(52);
            }
            u8::try_from(m)
                .ok()
                .filter(|b| (32..=52).contains(b))
                .ok_or_else(|| Error::invalid(format!("MAXPHYADDR {m} is outside 32..=52")))
        };
        let mut regs = X86Paging::new(p.cr0, p.cr3, p.cr4, p.efer).with_maxphyaddr(maxphy(p.maxphyaddr)?);
        regs.gbpages = p.flags & PF_X86_NO_1G_PAGES == 0;
        regs.pkru = p.pkru;
        regs.pkrs = p.pkrs;
        let mut w = Walker::new(regs)?;
        if !second.is_null() {
            // SAFETY: not NULL; readable for `struct_size` bytes (contract).
            let s = unsafe { args::read_sized(second, "second") }?;
            if s.reserved != 0 {
                return Err(Error::invalid("pf_second_level.reserved must be 0"));
            }
            let level = match s.kind {
                PF_SECOND_LEVEL_EPT => {
                    if s.flags & !(PF_EPT_EXECUTE_ONLY | PF_EPT_MODE_BASED_EXECUTE) != 0 {
                        return Err(Error::invalid(format!("flags {:#x} are not EPT flags", s.flags)));
                    }
                    SecondLevel::Ept(EptConfig {
                        eptp: s.root,
                        execute_only: s.flags & PF_EPT_EXECUTE_ONLY != 0,
                        mode_based_execute: s.flags & PF_EPT_MODE_BASED_EXECUTE != 0,
                        maxphyaddr: maxphy(s.maxphyaddr)?,
                    })
                }
                PF_SECOND_LEVEL_NPT => {
                    if s.flags & !(PF_NPT_FIVE_LEVEL | PF_NPT_NXE) != 0 {
                        return Err(Error::invalid(format!("flags {:#x} are not NPT flags", s.flags)));
                    }
                    SecondLevel::Npt(NptConfig {
                        ncr3: s.root,
                        five_level: s.flags & PF_NPT_FIVE_LEVEL != 0,
                        nxe: s.flags & PF_NPT_NXE != 0,
                        maxphyaddr: maxphy(s.maxphyaddr)?,
                    })
                }
                k => return Err(Error::invalid(format!("unknown second-level kind {k}"))),
            };
            w = w.with_second_level(level)?;
        }
        out.write(Box::into_raw(Box::new(pf_walker { walker: w })));
        Ok(())
    }
}

/// Makes a walker for an AArch64 guest's EL1&0 stage 1 from its
/// registers, with a stage 2 below it when `second` is not NULL (every
/// stage-1 table access is then translated through stage 2: the nested
/// walk).
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_INVALID_ARGUMENT` (registers whose walk the architecture leaves
/// undefined: a RES0 bit of TCR_EL1, a reserved granule, a TxSZ out of
/// range, a misaligned table base, which the message names; an
/// unsupported PA size; an unknown flag).
///
/// # Safety
///
/// - `paging` is NULL or points to a `pf_aarch64_paging` whose
///   `struct_size` bytes are readable; `second` is NULL or likewise a
///   `pf_aarch64_stage2`.
/// - `out_walker` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_new_aarch64(
    paging: *const pf_aarch64_paging,
    second: *const pf_aarch64_stage2,
    out_walker: *mut *mut pf_walker,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or readable for `struct_size` bytes (contract).
        let p = unsafe { args::read_sized(paging, "paging") }?;
        // SAFETY: NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_walker, "out_walker") }?;
        if p.flags & !(PF_AARCH64_PAN | PF_AARCH64_LVA | PF_AARCH64_LPA2) != 0 {
            return Err(Error::invalid(format!("unknown pf_aarch64_paging flags {:#x}", p.flags)));
        }
        let pa_size = |b: u32| match b {
            0 => Ok(48),
            b => u8::try_from(b).map_err(|_| Error::invalid(format!("pa_bits {b} is not a PA size"))),
        };
        let pa_bits = pa_size(p.pa_bits)?;
        let mut w = Walker::new(Aarch64Paging {
            tcr: p.tcr,
            ttbr0: p.ttbr0,
            ttbr1: p.ttbr1,
            sctlr: p.sctlr,
            mair: p.mair,
            pan: p.flags & PF_AARCH64_PAN != 0,
            pa_bits,
            lva: p.flags & PF_AARCH64_LVA != 0,
            lpa2: p.flags & PF_AARCH64_LPA2 != 0,
        })?;
        if !second.is_null() {
            // SAFETY: not NULL; readable for `struct_size` bytes (contract).
            let s2 = unsafe { args::read_sized(second, "second") }?;
            const ALL: u32 = PF_AARCH64_S2_XNX | PF_AARCH64_S2_LPA2 | PF_AARCH64_S2_TTST;
            if s2.flags & !ALL != 0 {
                return Err(Error::invalid(format!("unknown pf_aarch64_stage2 flags {:#x}", s2.flags)));
            }
            w = w.with_second_level(SecondLevel::Aarch64(Aarch64Stage2 {
                vtcr: s2.vtcr,
                vttbr: s2.vttbr,
                pa_bits: pa_size(s2.pa_bits)?,
                xnx: s2.flags & PF_AARCH64_S2_XNX != 0,
                lpa2: s2.flags & PF_AARCH64_S2_LPA2 != 0,
                ttst: s2.flags & PF_AARCH64_S2_TTST != 0,
            }))?;
        }
        out.write(Box::into_raw(Box::new(pf_walker { walker: w })));
        Ok(())
    }
}

/// A physical-address width from the C ABI (0: the default).
fn riscv_pa_bits(b: u32) -> Result<u8, Error> {
    match b {
        0 => Ok(56),
        b => u8::try_from(b).map_err(|_| Error::invalid(format!("pa_bits {b} is outside 32..=56"))),
    }
}

/// Makes a walker for a RISC-V guest's first stage from `satp` (or
/// `vsatp`), with the G stage `hgatp` below it when `second` is not NULL.
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_STRUCT_TOO_SMALL`,
/// `PF_ERR_INVALID_ARGUMENT` (a reserved MODE, a root above the
/// physical-address width, hgatp bits that must be zero, a width outside
/// 32..=56, an unknown flag; the message names the register and field).
///
/// # Safety
///
/// - `paging` is NULL or points to a `pf_riscv_paging` whose
///   `struct_size` bytes are readable; `second` is NULL or likewise a
///   `pf_riscv_gstage`.
/// - `out_walker` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_new_riscv64(
    paging: *const pf_riscv_paging,
    second: *const pf_riscv_gstage,
    out_walker: *mut *mut pf_walker,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or readable for `struct_size` bytes (contract).
        let p = unsafe { args::read_sized(paging, "paging") }?;
        // SAFETY: NULL or writable for a pointer (contract).
        let out = unsafe { args::out(out_walker, "out_walker") }?;
        const ALL: u32 = PF_RISCV_MXR | PF_RISCV_SUM | PF_RISCV_ADUE | PF_RISCV_PBMTE | PF_RISCV_SVNAPOT;
        if p.flags & !ALL != 0 {
            return Err(Error::invalid(format!("unknown pf_riscv_paging flags {:#x}", p.flags)));
        }
        let on = |flags: u32, f: u32| flags & f != 0;
        let mut w = Walker::new(RiscvPaging {
            satp: p.satp,
            sum: on(p.flags, PF_RISCV_SUM),
            mxr: on(p.flags, PF_RISCV_MXR),
            adue: on(p.flags, PF_RISCV_ADUE),
            pbmte: on(p.flags, PF_RISCV_PBMTE),
            svnapot: on(p.flags, PF_RISCV_SVNAPOT),
            pa_bits: riscv_pa_bits(p.pa_bits)?,
        })?;
        if !second.is_null() {
            // SAFETY: not NULL; readable for `struct_size` bytes (contract).
            let g = unsafe { args::read_sized(second, "second") }?;
            if g.flags & !(ALL & !PF_RISCV_SUM) != 0 {
                return Err(Error::invalid(format!("unknown pf_riscv_gstage flags {:#x}", g.flags)));
            }
            w = w.with_second_level(SecondLevel::Riscv(RiscvGStage {
                hgatp: g.hgatp,
                mxr: on(g.flags, PF_RISCV_MXR),
                adue: on(g.flags, PF_RISCV_ADUE),
                pbmte: on(g.flags, PF_RISCV_PBMTE),
                svnapot: on(g.flags, PF_RISCV_SVNAPOT),
                pa_bits: riscv_pa_bits(g.pa_bits)?,
            }))?;
        }
        out.write(Box::into_raw(Box::new(pf_walker { walker: w })));
        Ok(())
    }
}

/// Releases a walker. NULL is allowed.
///
/// # Safety
///
/// `walker` is NULL or a handle from `pf_walker_new` that has not been
/// freed, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_free(walker: *mut pf_walker) {
    ffi_boundary! { returns ();
        if !walker.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_walker_new`, not freed, not
            // in use (contract).
            drop(unsafe { Box::from_raw(walker) });
        }
    }
}

/// Stores the walker's address-space tag (what `pf_walk_cache_invalidate_space`
/// takes) in `*out_space`.
///
/// # Safety
///
/// `walker` is NULL or a live handle; `out_space` is NULL or valid for a
/// write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_space(
    walker: *const pf_walker,
    out_space: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: NULL or writable (contract).
        unsafe { args::out(out_space, "out_space") }?.write(w.space());
        Ok(())
    }
}

/// Translates the guest-virtual address `va` for the access `flags`
/// (`PF_ACCESS_*`, plus `PF_WALK_SET_ACCESSED_DIRTY` to update
/// accessed/dirty flags as hardware does) in guest memory `mem`, through
/// `cache` when not NULL, and stores the result in `*out`.
///
/// Errors: `PF_ERR_FAULT` when the walk faults: the details (stage, level,
/// entry, reason, #PF error code / EPT qualification / NPT EXITINFO1) go to
/// `*fault_out` when it is not NULL; `PF_ERR_NULL_POINTER`,
/// `PF_ERR_STRUCT_TOO_SMALL`, `PF_ERR_INVALID_ARGUMENT` (unknown or
/// conflicting flags).
///
/// # Safety
///
/// - `walker` and `mem` are NULL or live handles.
/// - `cache` is NULL or a live `pf_walk_cache` no other thread uses during
///   the call.
/// - `out` is NULL or valid for reads and writes of its `struct_size`
///   bytes; `fault_out` likewise, or NULL.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_translate(
    walker: *const pf_walker,
    mem: *const pf_guest_memory,
    va: u64,
    flags: u32,
    cache: *mut pf_walk_cache,
    out: *mut pf_translation,
    fault_out: *mut pf_walk_fault,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: `fault_out` is NULL or valid (contract).
        let fault_slot = unsafe { fault_slot(fault_out) }?;
        // SAFETY: NULL or live (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: NULL or valid for its declared size (contract).
        let out = unsafe { args::sized_out(out, "out") }?;
        let (access, options) = access_of(flags)?;
        // SAFETY: NULL or live and used by this thread only (contract).
        let cache = unsafe { self::cache(cache) };
        match w.translate_with(&**mem, GuestVirtAddr(va), access, options, cache) {
            Ok(t) => {
                out.write(translation_out(&t));
                Ok(())
            }
            Err(f) => Err(report_fault(&f, fault_slot)),
        }
    }
}

/// As `pf_walker_translate`, storing only the guest-physical address in
/// the memory `mem` holds (`pf_translation.pa`) in `*out_pa`: a walk-cache
/// hit builds no `pf_translation`, so it costs a fraction of one. Same flags, same
/// faults, same cache behaviour. ABI 0.8.
///
/// Errors: as `pf_walker_translate`.
///
/// # Safety
///
/// As `pf_walker_translate`; `out_pa` is NULL or valid for a write of one
/// `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_translate_pa(
    walker: *const pf_walker,
    mem: *const pf_guest_memory,
    va: u64,
    flags: u32,
    cache: *mut pf_walk_cache,
    out_pa: *mut u64,
    fault_out: *mut pf_walk_fault,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: `fault_out` is NULL or valid (contract).
        let fault_slot = unsafe { fault_slot(fault_out) }?;
        // SAFETY: NULL or live (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: NULL or writable (contract).
        let out = unsafe { args::out(out_pa, "out_pa") }?;
        let (access, options) = access_of(flags)?;
        // SAFETY: NULL or live and used by this thread only (contract).
        let cache = unsafe { self::cache(cache) };
        match w.translate_pa(&**mem, GuestVirtAddr(va), access, options, cache) {
            Ok(pa) => {
                out.write(pa.raw());
                Ok(())
            }
            Err(f) => Err(report_fault(&f, fault_slot)),
        }
    }
}

/// Reads `len` bytes at guest-virtual `va` into `buf` (page by page, across
/// page boundaries), as the access `flags` says (its kind is a read).
///
/// Errors: `PF_ERR_FAULT` (details in `*fault_out`; `fault_out->detail`
/// for `PF_REASON_UNBACKED` is the guest-physical address; the bytes
/// before the faulting page were read), `PF_ERR_NULL_POINTER`,
/// `PF_ERR_INVALID_ARGUMENT`, `PF_ERR_STRUCT_TOO_SMALL`.
///
/// # Safety
///
/// As `pf_walker_translate`; `buf` is valid for writes of `len` bytes (NULL
/// allowed when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn pf_walker_read_virt(
    walker: *const pf_walker,
    mem: *const pf_guest_memory,
    va: u64,
    buf: *mut c_void,
    len: usize,
    flags: u32,
    cache: *mut pf_walk_cache,
    fault_out: *mut pf_walk_fault,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: `fault_out` is NULL or valid (contract).
        let fault_slot = unsafe { fault_slot(fault_out) }?;
        // SAFETY: NULL or live (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: valid for writes of `len` bytes (contract).
        let buf = unsafe { args::bytes_mut(buf, len, "buf") }?;
        let (access, options) = access_of(flags & !PF_ACCESS_WRITE & !PF_ACCESS_FETCH)?;
        // SAFETY: NULL or live and used by this thread only (contract).
        let cache = unsafe { self::cache(cache) };
        w.read_virt(&**mem, GuestVirtAddr(va), buf, access, options, cache)
            .map_err(|e| report_fault(&e.fault, fault_slot))
    }
}

/// Writes `len` bytes from `data` at guest-virtual `va`, as the access
/// `flags` says (its kind is a write). Every page is translated before any
/// byte moves: a fault writes nothing (for writes up to 1 MiB).
///
/// Errors: as `pf_walker_read_virt`.
///
/// # Safety
///
/// As `pf_walker_translate`; `data` is valid for reads of `len` bytes (NULL
/// allowed when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn pf_walker_write_virt(
    walker: *const pf_walker,
    mem: *const pf_guest_memory,
    va: u64,
    data: *const c_void,
    len: usize,
    flags: u32,
    cache: *mut pf_walk_cache,
    fault_out: *mut pf_walk_fault,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: `fault_out` is NULL or valid (contract).
        let fault_slot = unsafe { fault_slot(fault_out) }?;
        // SAFETY: NULL or live (contract).
        let mem = unsafe { memory(mem) }?;
        // SAFETY: valid for reads of `len` bytes (contract).
        let data = unsafe { args::bytes(data, len, "data") }?;
        let (access, options) = access_of(flags & !PF_ACCESS_FETCH)?;
        // SAFETY: NULL or live and used by this thread only (contract).
        let cache = unsafe { self::cache(cache) };
        w.write_virt(&**mem, GuestVirtAddr(va), data, access, options, cache)
            .map_err(|e| report_fault(&e.fault, fault_slot))
    }
}

/// Calls `callback(mapping, user)` for every mapping of the address space in
/// virtual-address order (as QEMU's `info tlb`), reading at most `budget`
/// entries (0: the default, 2^24). Entries that cannot be used (reserved
/// bits, a table outside memory) are skipped and counted in
/// `*out_skipped` (NULL allowed). Stops early when the callback returns
/// nonzero. The callback must not unwind.
///
/// Errors: `PF_ERR_NULL_POINTER` (`walker`, `mem`, `callback`).
///
/// # Safety
///
/// `walker` and `mem` are NULL or live handles; `callback` is safe to call
/// with a pointer to a `pf_mapping` valid during the call and `user`;
/// `out_skipped` is NULL or valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_mappings(
    walker: *const pf_walker,
    mem: *const pf_guest_memory,
    budget: u64,
    callback: pf_mapping_fn,
    user: *mut c_void,
    out_skipped: *mut u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: NULL or live (contract).
        let mem = unsafe { memory(mem) }?;
        let callback = callback.ok_or_else(|| Error::null("callback"))?;
        let budget = if budget == 0 { pagefold::paging::DEFAULT_ENTRY_BUDGET } else { budget };
        let mut skipped = 0u64;
        for m in w.mappings_with_budget(&**mem, budget) {
            match m {
                Ok(m) => {
                    let c = mapping_out(&m);
                    // SAFETY: the callback is callable with a pointer valid
                    // for the call and `user` (contract).
                    if unsafe { callback(&c, user) } != 0 {
                        break;
                    }
                }
                Err(_) => skipped += 1,
            }
        }
        if !out_skipped.is_null() {
            // SAFETY: not NULL; writable (contract).
            unsafe { args::out(out_skipped, "out_skipped") }?.write(skipped);
        }
        Ok(())
    }
}

/// Calls `callback(segment, user)` for each physically contiguous segment
/// of guest-virtual `[va, va + len)` as the access `flags` says (`PF_WALK_SET_ACCESSED_DIRTY`
/// is not accepted: ranges are translated without updates), in order: what
/// a device model needs for a DMA buffer. Stops early when the callback
/// returns nonzero. The callback must not unwind.
///
/// Errors: `PF_ERR_FAULT` when a page of the range faults (the segments
/// before it were delivered; details in `*fault_out`, NULL allowed),
/// `PF_ERR_NULL_POINTER`, `PF_ERR_INVALID_ARGUMENT` (flags),
/// `PF_ERR_STRUCT_TOO_SMALL` (`fault_out`, checked before the walk).
///
/// # Safety
///
/// As `pf_walker_translate`; `callback` is safe to call with a pointer to a
/// `pf_segment` valid during the call and `user`.
#[no_mangle]
pub unsafe extern "C" fn pf_walker_translate_range(
    walker: *const pf_walker,
    mem: *const pf_guest_memory,
    va: u64,
    len: u64,
    flags: u32,
    callback: pf_segment_fn,
    user: *mut c_void,
    fault_out: *mut pf_walk_fault,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live (contract).
        let w = unsafe { self::walker(walker) }?;
        // SAFETY: `fault_out` is NULL or valid (contract).
        let fault_slot = unsafe { fault_slot(fault_out) }?;
        // SAFETY: NULL or live (contract).
        let mem = unsafe { memory(mem) }?;
        let callback = callback.ok_or_else(|| Error::null("callback"))?;
        if flags & PF_WALK_SET_ACCESSED_DIRTY != 0 {
            return Err(Error::invalid("ranges are translated without accessed/dirty updates"));
        }
        let (access, _) = access_of(flags)?;
        for seg in w.translate_range(&**mem, GuestVirtAddr(va), len, access) {
            match seg {
                Ok(s) => {
                    let c = pf_segment {
                        va: s.va.raw(),
                        gpa: s.gpa.raw(),
                        pa: s.pa.raw(),
                        len: s.len,
                    };
                    // SAFETY: callable with a pointer valid for the call and
                    // `user` (contract).
                    if unsafe { callback(&c, user) } != 0 {
                        break;
                    }
                }
                Err(f) => return Err(report_fault(&f, fault_slot)),
            }
        }
        Ok(())
    }
}

fn mapping_out(m: &Mapping) -> pf_mapping {
    pf_mapping {
        va: m.va.raw(),
        gpa: m.gpa.raw(),
        size: m.size,
        entry: m.entry,
        permissions: perm_bits(&m.permissions),
        attributes: attr_bits(&m.attributes),
        level: u32::from(m.level),
        key: u32::from(m.permissions.key),
        arch_attributes: arch_bits(&m.arch_attributes),
    }
}

/// Creates an empty walk cache and stores it in `*out_cache`.
///
/// # Safety
///
/// `out_cache` is NULL or valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn pf_walk_cache_new(out_cache: *mut *mut pf_walk_cache) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or writable (contract).
        let out = unsafe { args::out(out_cache, "out_cache") }?;
        out.write(Box::into_raw(Box::new(pf_walk_cache { cache: WalkCache::new() })));
        Ok(())
    }
}

/// Releases a walk cache. NULL is allowed.
///
/// # Safety
///
/// `cache` is NULL or a handle from `pf_walk_cache_new` that has not been
/// freed, and no other call uses it during or after this one.
#[no_mangle]
pub unsafe extern "C" fn pf_walk_cache_free(cache: *mut pf_walk_cache) {
    ffi_boundary! { returns ();
        if !cache.is_null() {
            // SAFETY: from `Box::into_raw` in `pf_walk_cache_new`, not freed,
            // not in use (contract).
            drop(unsafe { Box::from_raw(cache) });
        }
    }
}

/// `pf_walk_cache_invalidate` scope: everything.
pub const PF_INVALIDATE_ALL: u32 = 0;
/// Scope: what covers guest-virtual `va` in address space `space` (INVLPG).
pub const PF_INVALIDATE_PAGE: u32 = 1;
/// Scope: address space `space` (MOV CR3).
pub const PF_INVALIDATE_SPACE: u32 = 2;
/// Scope: PCID `va` (INVPCID single-context; global pages stay).
pub const PF_INVALIDATE_PCID: u32 = 3;
/// Scope: the second level (INVEPT).
pub const PF_INVALIDATE_SECOND_LEVEL: u32 = 4;

/// Invalidates part of a walk cache: `scope` is a `PF_INVALIDATE_*`;
/// `space` comes from `pf_walker_space`; `va` is a guest-virtual address
/// (or, for `PF_INVALIDATE_PCID`, the PCID).
///
/// Errors: `PF_ERR_NULL_POINTER`, `PF_ERR_INVALID_ARGUMENT` (unknown scope,
/// a PCID above 4095).
///
/// # Safety
///
/// `cache` is NULL or a live handle no other thread uses during the call.
#[no_mangle]
pub unsafe extern "C" fn pf_walk_cache_invalidate(
    cache: *mut pf_walk_cache,
    scope: u32,
    space: u64,
    va: u64,
) -> pf_status {
    ffi_boundary! {
        // SAFETY: NULL or live and used by this thread only (contract).
        let c = unsafe { self::cache(cache) }.ok_or_else(|| Error::null("cache"))?;
        match scope {
            PF_INVALIDATE_ALL => c.invalidate_all(),
            PF_INVALIDATE_PAGE => c.invalidate_page(space, GuestVirtAddr(va)),
            PF_INVALIDATE_SPACE => c.invalidate_space(space),
            PF_INVALIDATE_PCID => {
                let pcid = u16::try_from(va)
                    .ok()
                    .filter(|p| *p < 4096)
                    .ok_or_else(|| Error::invalid(format!("PCID {va} is above 4095")))?;
                c.invalidate_pcid(pcid);
            }
            PF_INVALIDATE_SECOND_LEVEL => c.invalidate_second_level(),
            s => return Err(Error::invalid(format!("unknown invalidation scope {s}"))),
        }
        Ok(())
    }
}

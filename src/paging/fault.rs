//! `WalkFault`: why a translation failed — which stage, which level, which
//! entry, the reason — and the architectural event a VMM would raise for it
//! (an x86 page-fault error code, an EPT-violation exit qualification, an
//! NPT `EXITINFO1`, an AArch64 abort's ESR, a RISC-V trap).

use super::types::Access;
use crate::addr::{GuestPhysAddr, GuestVirtAddr};

/// Which translation stage faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The guest's own page tables (guest-virtual to guest-physical).
    First,
    /// The second level (EPT or NPT), translating a guest-physical address.
    Second {
        /// `Some(level)`: the address was the guest's level-`level` table
        /// (a page-table read during the first-level walk); `None`: it was
        /// the final guest-physical address of the access.
        guest_table: Option<u8>,
    },
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// The entry at `level` is not present.
    NotPresent,
    /// The access is not allowed by the combined permissions; `level` is the
    /// first (rootmost) level whose entry denies it.
    Permission,
    /// A protection-key check denied a data access (x86 PKU/PKS).
    ProtectionKey {
        /// The page's key.
        key: u8,
    },
    /// Bits that must be zero are set in a present entry.
    Reserved {
        /// The offending bits.
        bits: u64,
    },
    /// An x86-64 address whose upper bits are not a sign extension.
    NonCanonical,
    /// The address is wider than the mode translates (above 4 GiB in 32-bit
    /// and PAE paging, above the guest-physical width in the second level).
    AddressTooWide,
    /// An EPT entry with a meaning the hardware refuses (write without
    /// read, execute-only without support, a reserved memory type).
    Misconfigured,
    /// A table (or, for `read_virt`/`write_virt`, the page) lies at a
    /// physical address no memory backs: a hole or past the end.
    Unbacked {
        /// The address that could not be read, in the memory the walker
        /// reads.
        pa: GuestPhysAddr,
    },
    /// Listing mappings visited its budget of entries (tables that point at
    /// each other can describe more mappings than any listing should walk).
    TooManyEntries,
    /// An accessed/dirty update was asked for but the memory is read-only.
    ReadOnlyTable,
    /// An accessed/dirty update kept losing races with concurrent writers of
    /// the entry; the walk gave up after a bounded number of retries.
    Contended,
}

/// The architectural event for a fault, as a VMM injects or reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultCode {
    /// An x86 page fault (#PF) for the guest, with its error code: bit 0 P
    /// (protection, not absence), 1 W/R, 2 U/S, 3 RSVD, 4 I/D, 5 PK.
    PageFault {
        /// The error code pushed on the guest's stack.
        error_code: u32,
    },
    /// A general-protection fault (#GP(0)): a non-canonical address.
    GeneralProtection,
    /// An EPT violation VM exit, with the exit qualification (bits 0–2 the
    /// access, 3–5 the permissions the EPT entries allowed, 7 linear
    /// address valid, 8 final translation vs. guest page-table access).
    EptViolation {
        /// The exit qualification.
        qualification: u64,
    },
    /// An EPT misconfiguration VM exit.
    EptMisconfig,
    /// An AMD nested page fault (#VMEXIT(NPF)) with `EXITINFO1`: the #PF
    /// error-code bits, plus bit 32 (final translation) or bit 33 (guest
    /// page-table access).
    NestedPageFault {
        /// `EXITINFO1`.
        exit_info1: u64,
    },
    /// An AArch64 synchronous abort (instruction or data abort) for the
    /// guest: `esr` is the ESR_EL1 value of the abort taken to EL1 (its EC,
    /// IL, WnR and the fault status code with the lookup level); FAR_EL1 is
    /// the faulting virtual address ([`WalkFault::va`]).
    Aarch64Abort {
        /// ESR_EL1.
        esr: u64,
    },
    /// An AArch64 stage-2 abort, taken to EL2: `esr` is ESR_EL2 (EC 0x20
    /// or 0x24 from a lower EL, S1PTW for a fault on a stage-1 table
    /// access, WnR, the fault status code with the stage-2 level), `hpfar`
    /// is HPFAR_EL2 (the faulting IPA's page, [`WalkFault::gpa`]); FAR_EL2
    /// is [`WalkFault::va`].
    Aarch64Stage2Abort {
        /// ESR_EL2.
        esr: u64,
        /// HPFAR_EL2.
        hpfar: u64,
    },
    /// A RISC-V trap: a page fault (12, 13, 15) of either stage, a
    /// guest-page fault (20, 21, 23) of the G stage with `htval` and
    /// `htinst`, or an access fault (1, 5, 7) for an address beyond the
    /// physical-address width.
    Riscv(RiscvTrap),
    /// No architectural event: the walk needed memory that nothing backs,
    /// or an accessed/dirty update could not be made. A VMM treats this as
    /// an emulation failure.
    Emulation,
}

/// The trap a RISC-V hart takes for a failed translation: what a VMM
/// writes into `scause`/`stval` (or `vscause`/`vstval` for a trap it
/// delegates to the guest) and, for a trap into HS-mode, `htval`,
/// `htinst` and `hstatus.GVA`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RiscvTrap {
    /// The exception code (`scause` without the interrupt bit): one of the
    /// constants below.
    pub cause: u8,
    /// `stval`: the faulting virtual address (guest-virtual for a guest).
    pub tval: u64,
    /// `htval` (`mtval2`): the faulting guest-physical address shifted
    /// right by 2 for a guest-page fault (that of the VS-stage PTE for a
    /// fault on an implicit page-table access); 0 for every other trap.
    pub htval: u64,
    /// `htinst` (`mtinst`): for a guest-page fault on an implicit access of
    /// a VS-stage page table, [`RiscvTrap::PSEUDO_READ`] or
    /// [`RiscvTrap::PSEUDO_WRITE`]; else 0 (no information: the trapping
    /// instruction is not known here).
    pub htinst: u64,
    /// `hstatus.GVA` for a trap into HS-mode: `tval` is a guest virtual
    /// address (a VS-stage or G-stage fault).
    pub gva: bool,
}

impl RiscvTrap {
    /// Instruction access fault.
    pub const INSTRUCTION_ACCESS_FAULT: u8 = 1;
    /// Load access fault.
    pub const LOAD_ACCESS_FAULT: u8 = 5;
    /// Store/AMO access fault.
    pub const STORE_ACCESS_FAULT: u8 = 7;
    /// Instruction page fault.
    pub const INSTRUCTION_PAGE_FAULT: u8 = 12;
    /// Load page fault.
    pub const LOAD_PAGE_FAULT: u8 = 13;
    /// Store/AMO page fault.
    pub const STORE_PAGE_FAULT: u8 = 15;
    /// Instruction guest-page fault.
    pub const INSTRUCTION_GUEST_PAGE_FAULT: u8 = 20;
    /// Load guest-page fault.
    pub const LOAD_GUEST_PAGE_FAULT: u8 = 21;
    /// Store/AMO guest-page fault.
    pub const STORE_GUEST_PAGE_FAULT: u8 = 23;
    /// `htinst` for a guest-page fault on a 64-bit read of a VS-stage PTE
    /// (RV64).
    pub const PSEUDO_READ: u64 = 0x0000_3000;
    /// `htinst` for a guest-page fault on a 64-bit write of a VS-stage PTE
    /// (an A/D update, RV64).
    pub const PSEUDO_WRITE: u64 = 0x0000_3020;

    /// Whether this is a page fault (12, 13, 15).
    pub const fn is_page_fault(&self) -> bool {
        matches!(self.cause, 12 | 13 | 15)
    }

    /// Whether this is a guest-page fault (20, 21, 23).
    pub const fn is_guest_page_fault(&self) -> bool {
        matches!(self.cause, 20 | 21 | 23)
    }

    /// Whether this is an access fault (1, 5, 7).
    pub const fn is_access_fault(&self) -> bool {
        matches!(self.cause, 1 | 5 | 7)
    }
}

/// A failed translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} fault at level {level} ({reason:?}) translating {va:#x}{}{}",
    match stage { Stage::First => "guest page-table", Stage::Second { .. } => "second-level" },
    match gpa { Some(g) => format!(" (guest-physical {g:#x})"), None => String::new() },
    match entry { Some(e) => format!(", entry {e:#x}"), None => String::new() }
)]
pub struct WalkFault {
    /// The address being translated (guest-virtual, or guest-physical when
    /// there is no first level).
    pub va: GuestVirtAddr,
    /// For a second-level fault: the guest-physical address it was
    /// translating.
    pub gpa: Option<GuestPhysAddr>,
    /// The access that faulted.
    pub access: Access,
    /// First or second level.
    pub stage: Stage,
    /// The level of the entry that faulted (1 = the last-level table); 0
    /// when no entry is involved (a non-canonical address).
    pub level: u8,
    /// The physical address of that entry, if one was read.
    pub entry_addr: Option<GuestPhysAddr>,
    /// The entry's value, if one was read.
    pub entry: Option<u64>,
    /// Why.
    pub reason: FaultReason,
    /// The event a VMM would raise.
    pub code: FaultCode,
}

/// x86 page-fault error-code bits.
pub(crate) mod pf {
    pub(crate) const PRESENT: u32 = 1 << 0;
    pub(crate) const WRITE: u32 = 1 << 1;
    pub(crate) const USER: u32 = 1 << 2;
    pub(crate) const RSVD: u32 = 1 << 3;
    pub(crate) const FETCH: u32 = 1 << 4;
    pub(crate) const PK: u32 = 1 << 5;
}

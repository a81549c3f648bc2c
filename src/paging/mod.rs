//! Guest page-table walkers: guest-virtual to guest-physical (x86 in every
//! paging mode), guest-physical to the memory the walker reads (Intel EPT,
//! AMD NPT), both together as hardware's two-dimensional walk, and a walk
//! cache (translations and upper-level entries) with explicit invalidation.
//!
//! The walk engine (`engine.rs`) knows nothing about x86: a paging format
//! (one implementation of the crate-private `Format` trait) says how wide an
//! entry is, which virtual-address bits index each level, what an entry
//! means (not present, reserved bits set, next table, leaf page) and how
//! permissions combine and are checked. x86 ([`x86`]) and EPT ([`ept`]) are
//! the formats today; AArch64 stage 1/2 and RISC-V Sv39/48/57 and G-stage
//! are further implementations of the same trait, with no change to the
//! engine.
//!
//! Guest page tables are untrusted input. A walk touches at most one entry
//! per level (five levels at most, each through at most five second-level
//! references), so its work is bounded whatever the tables hold; a table
//! outside guest memory, reserved bits, a misconfigured EPT entry or a
//! non-canonical address is a typed [`WalkFault`], never a panic. Listing
//! every mapping of an address space ([`Walker::mappings`]) is bounded by
//! an entry budget, because tables may point at each other in cycles.
//!
//! ```
//! use pagefold::{GuestMemory, GuestPhysAddr};
//! use pagefold::paging::{Access, Walker, X86Paging};
//!
//! // A 4-level table set mapping the 4 KiB page at 0x40_0000 to 0x5000.
//! let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)])?;
//! let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
//! mem.write_obj(GuestPhysAddr(pml4), pdpt | 0x3)?; // present, writable
//! mem.write_obj(GuestPhysAddr(pdpt), pd | 0x3)?;
//! mem.write_obj(GuestPhysAddr(pd + 2 * 8), pt | 0x3)?; // PD index 2 = 4 MiB
//! mem.write_obj(GuestPhysAddr(pt), 0x5000u64 | 0x3)?;
//!
//! let walker = Walker::new(X86Paging::long_mode(pml4))?;
//! let t = walker.translate(&mem, 0x40_0123, Access::read())?;
//! assert_eq!(t.gpa, 0x5123);
//! assert_eq!(t.memory_refs, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cache;
mod engine;
pub mod ept;
mod fault;
mod format;
mod lean;
mod mappings;
mod memory;
mod range;
mod virt;
mod walker;
pub mod x86;

pub use cache::{CacheStats, TableWatch, WalkCache};
pub use ept::{EptConfig, NptConfig};
pub use fault::{FaultCode, FaultReason, Stage, WalkFault};
pub use mappings::{Mapping, Mappings, DEFAULT_ENTRY_BUDGET};
pub(crate) use memory::EntryWindow;
pub use memory::{PhysImage, PhysMemory};
pub use range::{RangeSegments, Segment};
pub use virt::VirtError;
pub use walker::{
    BoundCache, GuestPaging, LeafAttributes, Permissions, SecondLevel, SecondTranslation,
    Translation, WalkOptions, Walker, WalkerError,
};
pub use x86::{X86Mode, X86Paging, X86PagingError, X86Register};

/// What an access does with the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Who makes an access, as the permission checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// CPL 3.
    User,
    /// CPL 0–2, an explicit access.
    Supervisor,
    /// A supervisor access the processor makes on its own (descriptor
    /// tables, the task-state segment): SMAP applies whatever EFLAGS.AC
    /// says.
    SupervisorImplicit,
}

/// One access to check: kind, privilege and EFLAGS.AC (for SMAP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// User or supervisor.
    pub privilege: Privilege,
    /// EFLAGS.AC at the time of the access: with CR4.SMAP, an explicit
    /// supervisor data access to a user page is allowed only when set.
    pub ac: bool,
}

impl Access {
    /// A supervisor data read: what a debugger or an introspection tool asks.
    pub const fn read() -> Self {
        Self::new(AccessKind::Read, Privilege::Supervisor)
    }

    /// A supervisor data write.
    pub const fn write() -> Self {
        Self::new(AccessKind::Write, Privilege::Supervisor)
    }

    /// A supervisor instruction fetch.
    pub const fn fetch() -> Self {
        Self::new(AccessKind::Fetch, Privilege::Supervisor)
    }

    /// An access of `kind` at `privilege`, with EFLAGS.AC clear.
    pub const fn new(kind: AccessKind, privilege: Privilege) -> Self {
        Access {
            kind,
            privilege,
            ac: false,
        }
    }

    /// The same access made from user mode (CPL 3).
    pub const fn user(self) -> Self {
        Access {
            privilege: Privilege::User,
            ..self
        }
    }

    /// The same access with EFLAGS.AC as given.
    pub const fn with_ac(self, ac: bool) -> Self {
        Access { ac, ..self }
    }

    /// `true` for a write.
    pub const fn is_write(self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }

    /// `true` for an instruction fetch.
    pub const fn is_fetch(self) -> bool {
        matches!(self.kind, AccessKind::Fetch)
    }

    /// `true` for a CPL-3 access.
    pub const fn is_user(self) -> bool {
        matches!(self.privilege, Privilege::User)
    }

    /// Every access that permission checks tell apart, in `index` order:
    /// three kinds by user, supervisor with AC clear, supervisor with AC
    /// set, and implicit supervisor (AC matters only to explicit
    /// supervisor accesses).
    #[cfg(test)]
    pub(crate) const ALL: [Access; 12] = {
        let kinds = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch];
        let mut all = [Access::read(); 12];
        let mut i = 0;
        while i < 12 {
            let (privilege, ac) = match i % 4 {
                0 => (Privilege::User, false),
                1 => (Privilege::Supervisor, false),
                2 => (Privilege::Supervisor, true),
                _ => (Privilege::SupervisorImplicit, false),
            };
            all[i] = Access {
                kind: kinds[i / 4],
                privilege,
                ac,
            };
            i += 1;
        }
        all
    };

    /// A dense number for this access, 0..12, equal for accesses no
    /// permission check tells apart.
    #[inline(always)]
    pub(crate) const fn index(self) -> u32 {
        let k = match self.kind {
            AccessKind::Read => 0,
            AccessKind::Write => 1,
            AccessKind::Fetch => 2,
        };
        let p = match (self.privilege, self.ac) {
            (Privilege::User, _) => 0,
            (Privilege::Supervisor, false) => 1,
            (Privilege::Supervisor, true) => 2,
            (Privilege::SupervisorImplicit, _) => 3,
        };
        k * 4 + p
    }
}

#[cfg(test)]
mod tests {
    use super::Access;

    #[test]
    fn access_indices_are_dense_and_match_the_table() {
        for (i, a) in Access::ALL.iter().enumerate() {
            assert_eq!(a.index() as usize, i);
        }
    }
}

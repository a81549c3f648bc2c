//! The plain types every file of `paging` shares, and nothing else: the
//! access a walk checks ([`Access`]) and its options ([`WalkOptions`]),
//! what a translation allows
//! ([`Permissions`]) and what its leaf says ([`LeafAttributes`]), and the
//! second level's raw output ([`SecondOut`]) that walks produce and caches
//! keep. It imports nothing from `paging`, so every other file may import
//! it; it must never grow behaviour that needs a format or memory.

use crate::addr::PAGE_SHIFT;

/// log2 of a 4 KiB page, as walks record page sizes (`u8`).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const PAGE_SHIFT_U8: u8 = PAGE_SHIFT as u8;

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

/// The instruction-set architecture whose page tables a walker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86 (32-bit, PAE, 4- and 5-level paging).
    X86_64,
    /// AArch64 (VMSAv8-64).
    Aarch64,
    /// RISC-V 64 (Sv39, Sv48, Sv57).
    Riscv64,
}

/// Options of one walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WalkOptions {
    /// Set accessed flags on the entries used and the dirty flag on the leaf
    /// of a write, by compare-exchange, as hardware does (both levels;
    /// AArch64: the access flag, and `AP[2]` cleared for a DBM write). Off,
    /// the walk writes nothing: what a debugger wants.
    pub set_accessed_dirty: bool,
}

/// What a translation allows, combined over every level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Data reads (always, for x86; EPT's R).
    pub read: bool,
    /// Data writes (R/W at every level; EPT's W).
    pub write: bool,
    /// Instruction fetches (no XD at any level with NXE; EPT's X, or
    /// supervisor-mode execute with mode-based execute control).
    pub execute: bool,
    /// A user page (U/S at every level). Always set for EPT.
    pub user: bool,
    /// User-mode fetches (x86: user and execute; EPT with mode-based
    /// execute control: bit 10).
    pub user_execute: bool,
    /// The protection key (x86 with CR4.PKE or PKS), else 0.
    pub key: u8,
}

/// Attributes of a leaf entry (what the entry says, not what was checked).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LeafAttributes {
    /// Accessed flag.
    pub accessed: bool,
    /// Dirty flag.
    pub dirty: bool,
    /// x86 global flag.
    pub global: bool,
    /// x86 PWT.
    pub write_through: bool,
    /// x86 PCD.
    pub cache_disable: bool,
    /// x86 PAT bit (bit 7 in a PTE, bit 12 in a large page).
    pub pat: bool,
    /// EPT memory type (bits 5:3).
    pub memory_type: Option<u8>,
    /// EPT ignore-PAT (bit 6).
    pub ignore_pat: bool,
}

/// Second-level result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SecondOut {
    pub(crate) base: u64,
    pub(crate) shift: u8,
    pub(crate) level: u8,
    pub(crate) acc: u64,
    pub(crate) leaf: u64,
    /// The walk set the accessed flags.
    pub(crate) accessed: bool,
    /// The leaf's dirty flag is known to be set.
    pub(crate) dirty: bool,
}

impl Permissions {
    /// What the whole linear space allows without paging: everything.
    pub(crate) const fn no_paging() -> Self {
        Permissions {
            read: true,
            write: true,
            execute: true,
            user: true,
            user_execute: true,
            key: 0,
        }
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

//! Second-level formats: Intel EPT (4 and 5 levels; read/write/execute,
//! execute-only, mode-based execute control, 2 MiB and 1 GiB pages,
//! accessed/dirty flags when the EPTP enables them, memory-type bits kept)
//! and the configuration of AMD NPT (the x86-64 format under a nested CR3,
//! in `x86`).
//!
//! Reference: Intel SDM vol. 3C §29.3 (EPT), table 28-7 (EPT-violation exit
//! qualification); AMD APM vol. 2 §15.25.

use super::{
    fault::FaultReason,
    format::{bits, Decoded, Denied, Format},
    types::{Access, AccessKind, LeafAttributes, Permissions, PAGE_SHIFT_U8},
};
use crate::addr::{GuestPhysAddr, PAGE_SHIFT};

/// Intel EPT, as an EPTP and the processor's EPT capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EptConfig {
    /// The EPT pointer: bits 2:0 memory type of the tables, 5:3 walk length
    /// minus one (3 = 4 levels, 4 = 5 levels), 6 accessed/dirty enable,
    /// 51:12 the root table.
    pub eptp: u64,
    /// Whether execute-only entries (X=1, R=0, W=0) are allowed
    /// (IA32_VMX_EPT_VPID_CAP bit 0); without it they are misconfigured.
    pub execute_only: bool,
    /// Mode-based execute control: bit 2 allows supervisor-mode fetches,
    /// bit 10 user-mode fetches.
    pub mode_based_execute: bool,
    /// The processor's physical-address width; entry bits at and above it
    /// are reserved.
    pub maxphyaddr: u8,
}

impl EptConfig {
    /// A 4-level EPT rooted at `root` (an address in the walker's memory:
    /// guest-physical for the VM that holds the tables), write-back, accessed/dirty flags
    /// enabled when `ad` is set; execute-only supported, no mode-based
    /// execute control, MAXPHYADDR 52.
    pub const fn four_level(root: GuestPhysAddr, ad: bool) -> Self {
        EptConfig {
            eptp: (root.0 & !0xfff) | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 },
            execute_only: true,
            mode_based_execute: false,
            maxphyaddr: 52,
        }
    }

    /// A 5-level EPT rooted at `root`, otherwise as [`Self::four_level`].
    pub const fn five_level(root: GuestPhysAddr, ad: bool) -> Self {
        EptConfig {
            eptp: (root.0 & !0xfff) | 6 | (4 << 3) | if ad { 1 << 6 } else { 0 },
            execute_only: true,
            mode_based_execute: false,
            maxphyaddr: 52,
        }
    }

    /// Whether the EPTP enables accessed and dirty flags.
    pub const fn accessed_dirty(&self) -> bool {
        self.eptp & (1 << 6) != 0
    }

    /// Walk length from the EPTP: `Some(4)` or `Some(5)`; `None` for any
    /// other value (an invalid EPTP).
    pub const fn levels(&self) -> Option<u8> {
        match (self.eptp >> 3) & 7 {
            3 => Some(4),
            4 => Some(5),
            _ => None,
        }
    }
}

/// AMD nested paging: the nested CR3 and the host paging features in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NptConfig {
    /// N_CR3 as the VMCB holds it: the nested page tables' root (an address
    /// in the walker's memory) in bits 51:12.
    pub ncr3: u64,
    /// 5-level nested paging.
    pub five_level: bool,
    /// Host EFER.NXE: the XD bit is honoured (else reserved).
    pub nxe: bool,
    /// The processor's physical-address width.
    pub maxphyaddr: u8,
}

impl NptConfig {
    /// 4-level nested paging under the N_CR3 value `ncr3` (a register
    /// value, as [`NptConfig::ncr3`]), with NXE and MAXPHYADDR 52.
    pub const fn four_level(ncr3: u64) -> Self {
        NptConfig {
            ncr3,
            five_level: false,
            nxe: true,
            maxphyaddr: 52,
        }
    }
}

/// EPT entry bits.
const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const X: u64 = 1 << 2;
const IPAT: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const A: u64 = 1 << 8;
const D: u64 = 1 << 9;
const XU: u64 = 1 << 10;

// Accumulated permissions: the AND of R, W, X and XU over the entries used,
// the first level that cleared each, and the leaf's level.
const ACC_R: u64 = 1 << 0;
const ACC_W: u64 = 1 << 1;
const ACC_X: u64 = 1 << 2;
const ACC_XU: u64 = 1 << 3;
const ACC_FIRST: [u32; 4] = [8, 12, 16, 20];
const ACC_LEAF: u32 = 24;

/// The EPT format.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EptFormat {
    levels: u8,
    root: u64,
    maxphy: u32,
    ad: bool,
    execute_only: bool,
    mbec: bool,
}

impl EptFormat {
    /// The format an EPTP describes, or `None` for an EPTP with an invalid
    /// walk length.
    pub(crate) fn new(cfg: &EptConfig) -> Option<Self> {
        let maxphy = u32::from(cfg.maxphyaddr.clamp(32, 52));
        Some(EptFormat {
            levels: cfg.levels()?,
            root: cfg.eptp & bits(12, maxphy - 1),
            maxphy,
            ad: cfg.accessed_dirty(),
            execute_only: cfg.execute_only,
            mbec: cfg.mode_based_execute,
        })
    }

    /// Whether accessed/dirty flags are on: guest page-table accesses then
    /// count as writes.
    pub(crate) fn ad(&self) -> bool {
        self.ad
    }

    /// Bits 3–6 of an EPT-violation qualification: what the entries walked
    /// so far allowed.
    pub(crate) fn qualification_perms(&self, acc: u64) -> u64 {
        ((acc & (ACC_R | ACC_W | ACC_X)) << 3) | if self.mbec { (acc & ACC_XU) << 3 } else { 0 }
    }

    /// Leaf attributes of `leaf` at `level`.
    pub(crate) fn attributes(&self, _level: u8, leaf: u64) -> LeafAttributes {
        LeafAttributes {
            accessed: leaf & A != 0,
            dirty: leaf & D != 0,
            global: false,
            write_through: false,
            cache_disable: false,
            pat: false,
            memory_type: Some(((leaf >> 3) & 7) as u8),
            ignore_pat: leaf & IPAT != 0,
        }
    }

    fn present(&self, raw: u64) -> bool {
        raw & (R | W | X) != 0 || (self.mbec && raw & XU != 0)
    }
}

impl Format for EptFormat {
    #[inline]
    fn top_level(&self) -> u8 {
        self.levels
    }

    #[inline]
    fn root(&self) -> u64 {
        self.root
    }

    #[inline]
    fn wide(&self) -> bool {
        true
    }

    #[inline]
    fn check_input(&self, gpa: u64) -> Result<(), FaultReason> {
        let width = PAGE_SHIFT + 9 * u32::from(self.levels);
        if gpa >> width != 0 {
            Err(FaultReason::AddressTooWide)
        } else {
            Ok(())
        }
    }

    fn entries(&self, _level: u8) -> u64 {
        512
    }

    #[inline]
    fn index_shift(&self, level: u8) -> u32 {
        PAGE_SHIFT + 9 * (u32::from(level) - 1)
    }

    #[inline]
    fn entry_addr(&self, table: u64, level: u8, gpa: u64) -> u64 {
        table + ((gpa >> (PAGE_SHIFT + 9 * (u32::from(level) - 1))) & 0x1ff) * 8
    }

    #[inline]
    fn decode(&self, level: u8, raw: u64) -> Decoded {
        if !self.present(raw) {
            return Decoded::NotPresent;
        }
        // Write without read, and execute-only where unsupported, are
        // misconfigurations, as are reserved bits (EPT reports them as a
        // misconfiguration, not a violation).
        if raw & (R | W) == W {
            return Decoded::Misconfigured;
        }
        // Without execute-only support, an entry that executes but does not
        // read is misconfigured; with mode-based execute that includes
        // user-mode execute (bit 10) without read (SDM 29.3.3.1).
        if !self.execute_only && raw & R == 0 && (raw & X != 0 || (self.mbec && raw & XU != 0)) {
            return Decoded::Misconfigured;
        }
        let phys = bits(self.maxphy, 51);
        let mask = bits(12, self.maxphy - 1);
        let leaf = level == 1 || (matches!(level, 2 | 3) && raw & PS != 0);
        if leaf {
            let reserved = phys
                | match level {
                    3 => bits(12, 29),
                    2 => bits(12, 20),
                    _ => 0,
                };
            if raw & reserved != 0 {
                return Decoded::Misconfigured;
            }
            // Memory types 2, 3 and 7 are reserved.
            if matches!((raw >> 3) & 7, 2 | 3 | 7) {
                return Decoded::Misconfigured;
            }
            let shift = PAGE_SHIFT_U8 + 9 * (level - 1);
            Decoded::Leaf {
                base: raw & mask & !bits(0, u32::from(shift) - 1),
                shift,
            }
        } else {
            // Non-leaf entries: bits 7:3 are reserved (PS at the top levels
            // included).
            if raw & (phys | bits(3, 7)) != 0 {
                return Decoded::Misconfigured;
            }
            Decoded::Table(raw & mask)
        }
    }

    #[inline]
    fn acc_start(&self) -> u64 {
        ACC_R | ACC_W | ACC_X | ACC_XU
    }

    #[inline]
    fn accumulate(&self, mut acc: u64, level: u8, raw: u64) -> u64 {
        acc = (acc & !(0xf << ACC_LEAF)) | (u64::from(level) << ACC_LEAF);
        for (k, bit) in [R, W, X, XU].into_iter().enumerate() {
            let flag = 1u64 << k;
            if raw & bit == 0 && acc & flag != 0 {
                acc &= !flag;
                if (acc >> ACC_FIRST[k]) & 0xf == 0 {
                    acc |= u64::from(level) << ACC_FIRST[k];
                }
            }
        }
        acc
    }

    #[inline]
    fn check(&self, acc: u64, _leaf: u64, access: Access, user_linear: bool) -> Result<(), Denied> {
        let k = match access.kind {
            AccessKind::Read => 0,
            AccessKind::Write => 1,
            AccessKind::Fetch if self.mbec && user_linear => 3,
            AccessKind::Fetch => 2,
        };
        if acc & (1 << k) != 0 {
            Ok(())
        } else {
            Err(Denied {
                level: ((acc >> ACC_FIRST[k]) & 0xf) as u8,
                reason: FaultReason::Permission,
            })
        }
    }

    #[inline]
    fn with_accessed(&self, _level: u8, raw: u64, leaf: bool, write: bool) -> u64 {
        if !self.ad {
            return raw;
        }
        let mut new = raw | A;
        if leaf && write {
            new |= D;
        }
        new
    }

    fn permissions(&self, acc: u64, _leaf: u64) -> Permissions {
        let xu = if self.mbec {
            acc & ACC_XU != 0
        } else {
            acc & ACC_X != 0
        };
        Permissions {
            read: acc & ACC_R != 0,
            write: acc & ACC_W != 0,
            execute: acc & ACC_X != 0,
            user: true,
            user_execute: xu,
            key: 0,
        }
    }
}

//! The x86 paging registers: CR0, CR3, CR4 and IA32_EFER as a guest holds
//! them ([`X86Paging`]), the paging mode they select ([`X86Mode`]), and
//! which values a processor can hold: the bits each register defines
//! (every other bit is reserved) and the combinations that a MOV to CR0/CR4
//! or a WRMSR to EFER refuses with #GP. A register set that breaks one did
//! not come from a CPU (a typo, a misparsed dump, the wrong field of a
//! saved state), and reading it anyway would pick a paging mode at random —
//! all-ones registers read as 5-level paging — so [`check`] refuses it with
//! the register and the bits named. It knows nothing of entry formats
//! (`x86.rs`, which imports it).
//!
//! References: Intel SDM vol. 3A §2.2.1 (IA32_EFER), §2.5 (CR0, CR4), §4.1.1
//! (paging modes), §4.10.1 (PCIDs), vol. 2B "MOV—Move to/from Control
//! Registers" (its #GP list); AMD APM vol. 2 §3.1.1 (CR0), §3.1.3 (CR4),
//! §3.1.7 (EFER).

/// CR0.PE: protection enabled.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE: 4 MiB pages in 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE: physical address extension (PAE and 4/5-level paging).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE: global pages.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.PCIDE: process-context identifiers in CR3 bits 11:0.
pub const CR4_PCIDE: u64 = 1 << 17;
/// CR4.SMEP: supervisor-mode execution prevention.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE: protection keys for user pages.
pub const CR4_PKE: u64 = 1 << 22;
/// CR4.PKS: protection keys for supervisor pages.
pub const CR4_PKS: u64 = 1 << 24;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: execute-disable bit enabled.
pub const EFER_NXE: u64 = 1 << 11;

/// The paging mode the control registers select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum X86Mode {
    /// CR0.PG = 0: linear addresses are physical (real mode, or protected
    /// mode without paging).
    NoPaging,
    /// 32-bit paging: two levels of 4-byte entries, 4 KiB and (with
    /// CR4.PSE) 4 MiB pages.
    Bits32,
    /// PAE paging: a 4-entry PDPT, then two levels of 8-byte entries; 4 KiB
    /// and 2 MiB pages.
    Pae,
    /// IA-32e 4-level paging: 48-bit linear addresses; 4 KiB, 2 MiB, 1 GiB.
    Level4,
    /// IA-32e 5-level paging (CR4.LA57): 57-bit linear addresses.
    Level5,
}

impl X86Mode {
    /// Number of table levels (0 without paging).
    pub const fn levels(self) -> u8 {
        match self {
            X86Mode::NoPaging => 0,
            X86Mode::Bits32 => 2,
            X86Mode::Pae => 3,
            X86Mode::Level4 => 4,
            X86Mode::Level5 => 5,
        }
    }
}

/// A paging register, as an error names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum X86Register {
    /// CR0.
    Cr0,
    /// CR4.
    Cr4,
    /// IA32_EFER.
    Efer,
}

impl std::fmt::Display for X86Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            X86Register::Cr0 => "CR0",
            X86Register::Cr4 => "CR4",
            X86Register::Efer => "EFER",
        })
    }
}

/// Register values no x86 processor holds: reserved bits, or combinations
/// a MOV to CR0/CR4 or a WRMSR to EFER refuses (each variant names its
/// rule; this file cites the manuals).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum X86PagingError {
    /// A bit the register does not define is set.
    #[error("{register} has reserved bits set: {bits:#x} ({register} = {value:#x})")]
    ReservedBits {
        /// The register.
        register: X86Register,
        /// The reserved bits that are set.
        bits: u64,
        /// The register's value.
        value: u64,
    },
    /// CR0.PG without CR0.PE.
    #[error("CR0.PG is set without CR0.PE (cr0 = {cr0:#x})")]
    PagingWithoutProtection {
        /// CR0.
        cr0: u64,
    },
    /// CR0.NW (not write-through) without CR0.CD (cache disable).
    #[error("CR0.NW is set without CR0.CD (cr0 = {cr0:#x})")]
    NotWriteThroughWithoutCacheDisable {
        /// CR0.
        cr0: u64,
    },
    /// EFER.LMA without both EFER.LME and CR0.PG, which are what make the
    /// processor set it.
    #[error(
        "EFER.LMA is set but EFER.LME and CR0.PG are not both set \
         (cr0 = {cr0:#x}, efer = {efer:#x})"
    )]
    LongModeActiveWithoutEnable {
        /// CR0.
        cr0: u64,
        /// IA32_EFER.
        efer: u64,
    },
    /// Long mode (CR0.PG with EFER.LME) without CR4.PAE.
    #[error("long mode is active but CR4.PAE is clear (cr4 = {cr4:#x})")]
    LongModeWithoutPae {
        /// CR4.
        cr4: u64,
    },
    /// CR4.PCIDE outside long mode (PCIDs exist in IA-32e mode only).
    #[error("CR4.PCIDE is set outside long mode (cr4 = {cr4:#x}, efer = {efer:#x})")]
    PcidOutsideLongMode {
        /// CR4.
        cr4: u64,
        /// IA32_EFER.
        efer: u64,
    },
    /// CR4.CET without CR0.WP.
    #[error("CR4.CET is set without CR0.WP (cr0 = {cr0:#x}, cr4 = {cr4:#x})")]
    CetWithoutWriteProtect {
        /// CR0.
        cr0: u64,
        /// CR4.
        cr4: u64,
    },
    /// MAXPHYADDR outside 32..=52.
    #[error("MAXPHYADDR {bits} is outside 32..=52")]
    PhysicalWidth {
        /// The width given.
        bits: u8,
    },
}

/// The guest registers that decide how it translates addresses, plus the
/// CPU facts the checks need (MAXPHYADDR, 1 GiB page support, PKRU/PKRS).
/// Values no processor holds (reserved bits of CR0, CR4 or EFER, or a
/// combination hardware refuses) are refused by [`X86Paging::mode`], and so
/// by `Walker::new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct X86Paging {
    /// CR0 (PE, WP, PG matter).
    pub cr0: u64,
    /// CR3: the root table, and the PCID with CR4.PCIDE.
    pub cr3: u64,
    /// CR4 (PSE, PAE, PGE, LA57, PCIDE, SMEP, SMAP, PKE, PKS matter).
    pub cr4: u64,
    /// IA32_EFER (LME, LMA, NXE matter).
    pub efer: u64,
    /// The processor's physical-address width (CPUID 0x8000_0008 EAX bits 7:0):
    /// entry bits at and above it are reserved. 52 unless set.
    pub maxphyaddr: u8,
    /// Whether 1 GiB pages exist (CPUID 0x8000_0001 EDX bit 26); without
    /// them, PS in a PDPTE is a reserved bit. `true` unless set.
    pub gbpages: bool,
    /// PKRU, for protection keys on user pages (CR4.PKE).
    pub pkru: u32,
    /// IA32_PKRS, for protection keys on supervisor pages (CR4.PKS).
    pub pkrs: u32,
}

impl X86Paging {
    /// The registers as given, with MAXPHYADDR 52, 1 GiB pages supported,
    /// and PKRU/PKRS zero.
    pub const fn new(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Self {
        X86Paging {
            cr0,
            cr3,
            cr4,
            efer,
            maxphyaddr: 52,
            gbpages: true,
            pkru: 0,
            pkrs: 0,
        }
    }

    /// A typical 64-bit kernel's setting: 4-level paging rooted at `cr3`,
    /// CR0.WP and EFER.NXE set.
    pub const fn long_mode(cr3: u64) -> Self {
        Self::new(
            CR0_PE | CR0_WP | CR0_PG,
            cr3,
            CR4_PAE,
            EFER_LME | EFER_LMA | EFER_NXE,
        )
    }

    /// The same registers with MAXPHYADDR `bits`.
    pub const fn with_maxphyaddr(self, bits: u8) -> Self {
        X86Paging {
            maxphyaddr: bits,
            ..self
        }
    }

    /// The paging mode the registers select, or why no processor would
    /// hold them: a reserved bit of CR0, CR4 or EFER, or a combination a
    /// MOV to a control register or a WRMSR to EFER refuses.
    pub fn mode(&self) -> Result<X86Mode, X86PagingError> {
        if !(32..=52).contains(&self.maxphyaddr) {
            return Err(X86PagingError::PhysicalWidth {
                bits: self.maxphyaddr,
            });
        }
        check(self)?;
        if self.cr0 & CR0_PG == 0 {
            return Ok(X86Mode::NoPaging);
        }
        // `check` refused long mode without PAE.
        Ok(match (self.cr4 & CR4_PAE != 0, self.ia32e()) {
            (false, _) => X86Mode::Bits32,
            (true, false) => X86Mode::Pae,
            (true, true) if self.cr4 & CR4_LA57 != 0 => X86Mode::Level5,
            (true, true) => X86Mode::Level4,
        })
    }

    /// Whether the registers select IA-32e paging: CR0.PG with EFER.LME.
    /// Setting PG with LME is what sets LMA; a register set that carries
    /// LME but was saved before LMA was set counts as long mode too.
    fn ia32e(&self) -> bool {
        self.cr0 & CR0_PG != 0 && self.efer & (EFER_LMA | EFER_LME) != 0
    }

    /// The PCID in effect (CR3 bits 11:0 with CR4.PCIDE in long mode), else 0.
    pub const fn pcid(&self) -> u16 {
        if self.cr4 & CR4_PCIDE != 0 {
            (self.cr3 & 0xfff) as u16
        } else {
            0
        }
    }
}

/// CR0.NW: not write-through.
const CR0_NW: u64 = 1 << 29;
/// CR0.CD: cache disable.
const CR0_CD: u64 = 1 << 30;
/// CR4.CET: control-flow enforcement.
const CR4_CET: u64 = 1 << 23;

/// The mask with each bit in `bits` set.
const fn mask(bits: &[u32]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < bits.len() {
        m |= 1 << bits[i];
        i += 1;
    }
    m
}

/// CR0's defined bits: PE, MP, EM, TS, ET, NE (0–5), WP (16), AM (18), NW
/// (29), CD (30), PG (31). Bits 63:32 are a #GP on MOV to CR0 (SDM §2.5).
/// A MOV leaves the reserved bits of 31:0 as they were (AMD APM §3.1.1), so
/// they read as 0 on every processor: a CR0 holding one was not read from a
/// CPU either.
const CR0_DEFINED: u64 = mask(&[0, 1, 2, 3, 4, 5, 16, 18, 29, 30, 31]);

/// CR4's defined bits, the union of Intel's and AMD's, so that a register
/// set from either passes whichever the host is: VME, PVI, TSD, DE, PSE,
/// PAE, MCE, PGE, PCE, OSFXSR, OSXMMEXCPT, UMIP, LA57, VMXE, SMXE (0–14),
/// FSGSBASE (16), PCIDE (17), OSXSAVE (18), KL (19), SMEP (20), SMAP (21),
/// PKE (22), CET (23), PKS (24), UINTR (25), LASS (27), LAM_SUP (28) and
/// FRED (32, which Linux sets where the CPU has it). Bits 15, 26, 29–31
/// and 33–63 are reserved: a MOV to CR4 setting one is a #GP (SDM vol. 2B,
/// MOV to CR4). A bit a newer processor defines is refused here until it
/// is added to this list.
const CR4_DEFINED: u64 = mask(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 32,
]);

/// EFER's defined bits, Intel's and AMD's: SCE (0), LME (8), LMA (10), NXE
/// (11), and AMD's SVME (12), LMSLE (13), FFXSR (14), TCE (15), MCOMMIT
/// (17), INTWB (18), UAIE (20) and AIBRSE (21, Automatic IBRS, which Linux
/// sets on Zen 4). A WRMSR setting any other bit is a #GP (SDM §2.2.1, AMD
/// APM §3.1.7). (Bits 1–4 meant something on the K6 alone, which has no
/// long mode.)
const EFER_DEFINED: u64 = mask(&[0, 8, 10, 11, 12, 13, 14, 15, 17, 18, 20, 21]);

/// Whether the registers can be a processor's, as a MOV to CR0/CR4 and a
/// WRMSR to EFER would let them be. The first rule broken is the error.
fn check(regs: &X86Paging) -> Result<(), X86PagingError> {
    for (register, value, defined) in [
        (X86Register::Cr0, regs.cr0, CR0_DEFINED),
        (X86Register::Cr4, regs.cr4, CR4_DEFINED),
        (X86Register::Efer, regs.efer, EFER_DEFINED),
    ] {
        if value & !defined != 0 {
            return Err(X86PagingError::ReservedBits {
                register,
                bits: value & !defined,
                value,
            });
        }
    }
    let (cr0, cr4, efer) = (regs.cr0, regs.cr4, regs.efer);
    let paging = cr0 & CR0_PG != 0;
    // MOV to CR0: "setting the PG flag when the PE flag is clear" and
    // "setting the NW flag when the CD flag is clear" are #GP.
    if paging && cr0 & CR0_PE == 0 {
        return Err(X86PagingError::PagingWithoutProtection { cr0 });
    }
    if cr0 & CR0_NW != 0 && cr0 & CR0_CD == 0 {
        return Err(X86PagingError::NotWriteThroughWithoutCacheDisable { cr0 });
    }
    // LMA is no setting but the processor's report that LME and PG are
    // both set (SDM §2.2.1; a WRMSR cannot change it). KVM's
    // KVM_SET_SREGS refuses it otherwise too.
    if efer & EFER_LMA != 0 && !(paging && efer & EFER_LME != 0) {
        return Err(X86PagingError::LongModeActiveWithoutEnable { cr0, efer });
    }
    let long = regs.ia32e();
    // MOV to CR0 setting PG with LME and PAE clear, and MOV to CR4
    // clearing PAE in IA-32e mode, are #GP.
    if long && cr4 & CR4_PAE == 0 {
        return Err(X86PagingError::LongModeWithoutPae { cr4 });
    }
    // PCIDs exist in IA-32e mode only (SDM §4.10.1): setting PCIDE outside
    // it, or clearing PG while it is set, is a #GP. It matters to a walk:
    // outside long mode CR3 bits 11:5 are address bits, not a PCID.
    if cr4 & CR4_PCIDE != 0 && !long {
        return Err(X86PagingError::PcidOutsideLongMode { cr4, efer });
    }
    // CET needs supervisor write protection (SDM §2.5: CR4.CET can be set
    // only while CR0.WP is set, and WP cannot be cleared under it), which
    // decides what a supervisor write to a read-only page does.
    if cr4 & CR4_CET != 0 && cr0 & CR0_WP == 0 {
        return Err(X86PagingError::CetWithoutWriteProtect { cr0, cr4 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bit lists and the reserved masks written out agree (CR0's is
    /// the one hypervisor headers carry), so a typo in a list shows.
    #[test]
    fn reserved_masks() {
        assert_eq!(!CR0_DEFINED, 0xffff_ffff_1ffa_ffc0);
        assert_eq!(!CR4_DEFINED, 0xffff_fffe_e400_8000);
        assert_eq!(!EFER_DEFINED, 0xffff_ffff_ffc9_02fe);
    }
}

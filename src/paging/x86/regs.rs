//! Which values of CR0, CR4 and IA32_EFER a processor can hold: the bits
//! each register defines (every other bit is reserved) and the combinations
//! that a MOV to CR0/CR4 or a WRMSR to EFER refuses with #GP. A register set
//! that breaks one did not come from a CPU (a typo, a misparsed dump, the
//! wrong field of a saved state), and reading it anyway would pick a paging
//! mode at random — all-ones registers read as 5-level paging — so
//! [`check`] refuses it with the register and the bits named.
//!
//! This module only says yes or no; which mode a valid set selects is
//! [`X86Paging::mode`]'s business.
//!
//! References: Intel SDM vol. 3A §2.2.1 (IA32_EFER), §2.5 (CR0, CR4), §4.1.1
//! (paging modes), §4.10.1 (PCIDs), vol. 2B "MOV—Move to/from Control
//! Registers" (its #GP list); AMD APM vol. 2 §3.1.1 (CR0), §3.1.3 (CR4),
//! §3.1.7 (EFER).

use super::{
    X86Paging, X86PagingError, X86Register, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PCIDE, EFER_LMA,
    EFER_LME,
};

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
pub(super) fn check(regs: &X86Paging) -> Result<(), X86PagingError> {
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

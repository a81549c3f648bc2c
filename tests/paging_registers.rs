//! The paging registers against the manuals: a CR0, CR4 or IA32_EFER value
//! no processor holds (a reserved bit set, or a combination a MOV to a
//! control register or a WRMSR refuses with #GP) is a typed error naming
//! the register and the bits, not a walker in whatever mode the bits
//! happen to select (all-ones registers used to read as 5-level paging).
//! Every value a real guest holds is still accepted.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use pagefold::paging::{
    x86::{CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PCIDE, EFER_LMA, EFER_LME, EFER_NXE},
    Walker, WalkerError, X86Mode, X86Paging, X86PagingError, X86Register,
};

const ONES: u64 = u64::MAX;
const CR3: u64 = 0x1000;

/// A 64-bit kernel's registers with one of them replaced.
fn long(cr0: Option<u64>, cr4: Option<u64>, efer: Option<u64>) -> X86Paging {
    let base = X86Paging::long_mode(CR3);
    X86Paging::new(
        cr0.unwrap_or(base.cr0),
        CR3,
        cr4.unwrap_or(base.cr4),
        efer.unwrap_or(base.efer),
    )
}

/// Why `Walker::new` refuses `regs`, with its message.
fn refused(regs: X86Paging) -> (X86PagingError, String) {
    match Walker::new(regs) {
        Err(WalkerError::X86(e)) => (e, WalkerError::X86(e).to_string()),
        Err(e) => panic!("{regs:x?}: refused for the wrong reason: {e}"),
        Ok(w) => panic!("{regs:x?}: accepted, as {:?}", w.mode()),
    }
}

fn reserved(regs: X86Paging) -> (X86Register, u64) {
    match refused(regs) {
        (X86PagingError::ReservedBits { register, bits, .. }, _) => (register, bits),
        (e, _) => panic!("{regs:x?}: refused, but not for reserved bits: {e}"),
    }
}

#[test]
fn all_ones_registers_name_the_register_and_bits() {
    let (e, msg) = refused(long(Some(ONES), None, None));
    assert_eq!(
        e,
        X86PagingError::ReservedBits {
            register: X86Register::Cr0,
            bits: 0xffff_ffff_1ffa_ffc0,
            value: ONES,
        }
    );
    assert!(
        msg.contains("CR0 has reserved bits set: 0xffffffff1ffaffc0"),
        "{msg}"
    );

    let (e, msg) = refused(long(None, Some(ONES), None));
    assert_eq!(
        e,
        X86PagingError::ReservedBits {
            register: X86Register::Cr4,
            bits: 0xffff_fffe_e400_8000,
            value: ONES,
        }
    );
    assert!(
        msg.contains("CR4 has reserved bits set: 0xfffffffee4008000"),
        "{msg}"
    );

    let (e, msg) = refused(long(None, None, Some(ONES)));
    assert_eq!(
        e,
        X86PagingError::ReservedBits {
            register: X86Register::Efer,
            bits: 0xffff_ffff_ffc9_02fe,
            value: ONES,
        }
    );
    assert!(
        msg.contains("EFER has reserved bits set: 0xffffffffffc902fe"),
        "{msg}"
    );

    // All three: the first register is named.
    assert_eq!(
        reserved(X86Paging::new(ONES, ONES, ONES, ONES)).0,
        X86Register::Cr0
    );
    // Without paging too: the bits are wrong whatever the mode.
    assert_eq!(
        reserved(X86Paging::new(0, 0, 0, ONES)),
        (X86Register::Efer, 0xffff_ffff_ffc9_02fe)
    );
}

#[test]
fn one_reserved_bit_is_refused() {
    let cases: &[(X86Register, u32)] = &[
        // CR0: 63:32 (#GP), and 6..=15, 17, 19..=28 (never read back set).
        (X86Register::Cr0, 63),
        (X86Register::Cr0, 32),
        (X86Register::Cr0, 6),
        (X86Register::Cr0, 15),
        (X86Register::Cr0, 17),
        (X86Register::Cr0, 19),
        (X86Register::Cr0, 28),
        // CR4: 15, 26, 29..=31, 33..=63.
        (X86Register::Cr4, 15),
        (X86Register::Cr4, 26),
        (X86Register::Cr4, 29),
        (X86Register::Cr4, 31),
        (X86Register::Cr4, 33),
        (X86Register::Cr4, 63),
        // EFER: 1..=7, 9, 16, 19, 22..=63.
        (X86Register::Efer, 1),
        (X86Register::Efer, 7),
        (X86Register::Efer, 9),
        (X86Register::Efer, 16),
        (X86Register::Efer, 19),
        (X86Register::Efer, 22),
        (X86Register::Efer, 63),
    ];
    for &(register, bit) in cases {
        let base = X86Paging::long_mode(CR3);
        let regs = match register {
            X86Register::Cr0 => long(Some(base.cr0 | 1 << bit), None, None),
            X86Register::Cr4 => long(None, Some(base.cr4 | 1 << bit), None),
            X86Register::Efer => long(None, None, Some(base.efer | 1 << bit)),
        };
        assert_eq!(reserved(regs), (register, 1 << bit), "{register} bit {bit}");
    }
}

#[test]
fn combinations_hardware_refuses() {
    const NW: u64 = 1 << 29;
    const CET: u64 = 1 << 23;
    let pg = CR0_PE | CR0_PG | CR0_WP;
    let cases = [
        // MOV to CR0: PG without PE.
        (
            X86Paging::new(CR0_PG, CR3, 0, 0),
            "CR0.PG is set without CR0.PE",
        ),
        // MOV to CR0: NW without CD, with or without paging.
        (
            X86Paging::new(CR0_PE | NW, 0, 0, 0),
            "CR0.NW is set without CR0.CD",
        ),
        (
            long(Some(pg | NW), None, None),
            "CR0.NW is set without CR0.CD",
        ),
        // LMA is the processor's report of LME with PG.
        (
            X86Paging::new(pg, CR3, CR4_PAE, EFER_LMA),
            "EFER.LMA is set but EFER.LME and CR0.PG are not both set",
        ),
        (
            X86Paging::new(CR0_PE, CR3, CR4_PAE, EFER_LME | EFER_LMA),
            "EFER.LMA is set but EFER.LME and CR0.PG are not both set",
        ),
        // MOV to CR0 setting PG with LME and PAE clear.
        (
            X86Paging::new(pg, CR3, 0, EFER_LME | EFER_LMA),
            "long mode is active but CR4.PAE is clear",
        ),
        // PCIDs exist in IA-32e mode only: not under PAE or 32-bit paging,
        // nor with paging off.
        (
            X86Paging::new(pg, CR3, CR4_PAE | CR4_PCIDE, EFER_NXE),
            "CR4.PCIDE is set outside long mode",
        ),
        (
            X86Paging::new(pg, CR3, CR4_PCIDE, 0),
            "CR4.PCIDE is set outside long mode",
        ),
        (
            X86Paging::new(CR0_PE, 0, CR4_PAE | CR4_PCIDE, EFER_LME),
            "CR4.PCIDE is set outside long mode",
        ),
        // CET needs CR0.WP.
        (
            long(Some(CR0_PE | CR0_PG), Some(CR4_PAE | CET), None),
            "CR4.CET is set without CR0.WP",
        ),
    ];
    for (regs, want) in cases {
        let (_, msg) = refused(regs);
        assert!(msg.starts_with(want), "{regs:x?}: {msg}");
    }
}

#[test]
fn real_guests_values_are_accepted() {
    let cases = [
        // QEMU TCG, Debian kernel (cli/tests/maps_qemu.rs).
        (0x8005_0033, 0x6f0, 0xd01, X86Mode::Level4),
        // The CLI's default CR0 and the C tests' EFER (no SCE).
        (0x8001_0001, 0x20, 0xd00, X86Mode::Level4),
        // KVM guests on recent Intel hosts: FSGSBASE, PCIDE, OSXSAVE,
        // SMEP, SMAP, PKE, UMIP; with LA57; with CET and FRED.
        (0x8005_0033, 0x77_0ef0, 0xd01, X86Mode::Level4),
        (0x8005_0033, 0x77_1ef0, 0xd01, X86Mode::Level5),
        (0x8005_0033, 0x1_00f7_0ef0, 0xd01, X86Mode::Level4),
        // AMD: SVME (a nested hypervisor), Automatic IBRS (Zen 4), TCE.
        (0x8005_0033, 0x3506f0, 0x1d01, X86Mode::Level4),
        (0x8005_0033, 0x3506f0, 0x20_9d01, X86Mode::Level4),
        // Firmware and 32-bit kernels; reset (CD|NW|ET).
        (0x8000_0011, 0x10, 0, X86Mode::Bits32),
        (0x8000_0033, 0x6b0, 0x800, X86Mode::Pae),
        (0x6000_0010, 0, 0, X86Mode::NoPaging),
        // LME set before paging is turned on.
        (0x11, 0x20, 0x100, X86Mode::NoPaging),
        // Every defined bit at once: all of CR0, CR4 and EFER.
        (0xe005_003f, 0x1_1bff_7fff, 0x36_fd01, X86Mode::Level5),
    ];
    for (cr0, cr4, efer, mode) in cases {
        let regs = X86Paging::new(cr0, CR3, cr4, efer);
        let w = Walker::new(regs).unwrap_or_else(|e| panic!("{regs:x?}: {e}"));
        assert_eq!(w.mode(), mode, "{regs:x?}");
    }
}

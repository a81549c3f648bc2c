//! Hand-written cases from the Intel SDM (vol. 3A ch. 4, vol. 3C §29.3)
//! and the AMD APM (vol. 2 §5, §15.25) for the guest page-table walkers:
//! canonical holes, reserved bits per level, permission rules (CR0.WP,
//! SMEP, SMAP, protection keys), accessed/dirty updates, EPT
//! misconfigurations and violation qualifications, NPT EXITINFO1, #PF error
//! codes, tables outside memory, cycles, and guest-virtual reads and writes
//! across pages.

// Test code: page-table fields are built from small known values.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::page_tables::{Flags, Kind, Tables, A, D, EA, ED, ER, EW, EX, PAGE, PS, US, XD};
use pagefold::paging::{
    x86::{CR0_WP, CR4_PKE, CR4_PKS, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_NXE},
    Access, EptConfig, FaultCode, FaultReason, PhysImage, SecondLevel, Stage, WalkCache, WalkFault,
    WalkOptions, Walker, X86Paging,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};

const MEM: u64 = 64 << 20;
const TABLES: u64 = 0x10_0000;
const TABLES_LEN: u64 = 0x70_0000;
const GT_GPA: u64 = 0xc000_0000;
const GT_HOST: u64 = 0x80_0000;
const GT_LEN: u64 = 0x4_0000;

const PF_P: u32 = 1;
const PF_W: u32 = 2;
const PF_U: u32 = 4;
const PF_RSVD: u32 = 8;
const PF_ID: u32 = 16;
const PF_PK: u32 = 32;

const AD: WalkOptions = WalkOptions {
    set_accessed_dirty: true,
};

fn mem() -> GuestMemory {
    GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap()
}

fn tables(kind: Kind, mem: &GuestMemory) -> Tables<'_> {
    Tables::new(kind, mem, TABLES, TABLES, TABLES_LEN)
}

fn full() -> Flags {
    Flags::full()
}

fn ro() -> Flags {
    Flags::full().with(true, false, true, true)
}

/// Memory address of the level-`level` entry for `va`.
fn entry(t: &Tables<'_>, va: u64, level: u8) -> u64 {
    t.entry_at(va, level)
}

fn set_bits(t: &Tables<'_>, va: u64, level: u8, bits: u64) {
    let at = entry(t, va, level);
    t.write_entry(at, t.read_entry(at) | bits);
}

fn clear_bits(t: &Tables<'_>, va: u64, level: u8, bits: u64) {
    let at = entry(t, va, level);
    t.write_entry(at, t.read_entry(at) & !bits);
}

fn pf(f: &WalkFault) -> u32 {
    match f.code {
        FaultCode::PageFault { error_code } => error_code,
        c => panic!("not a #PF: {c:?} ({f})"),
    }
}

fn qual(f: &WalkFault) -> u64 {
    match f.code {
        FaultCode::EptViolation { qualification } => qualification,
        c => panic!("not an EPT violation: {c:?} ({f})"),
    }
}

/// A guest of `first` nested under `second`, the guest's table pages
/// mapped in the second level with every permission.
fn nested<'m>(mem: &'m GuestMemory, first: Kind, second: Kind) -> (Tables<'m>, Tables<'m>) {
    let mut s = tables(second, mem);
    for i in 0..GT_LEN / PAGE {
        assert!(
            s.map(GT_GPA + i * PAGE, GT_HOST + i * PAGE, 12, full(), |_| full(
            ))
        );
    }
    let g = Tables::new(first, mem, GT_GPA, GT_HOST, GT_LEN);
    (g, s)
}

// ---------------------------------------------------------------- canonical

#[test]
fn canonical_holes_4_level() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    assert!(t.map(0xffff_8000_0000_0000, 0x5000, 12, full(), |_| full()));
    assert!(t.map(0x7fff_ffff_f000, 0x6000, 12, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    assert_eq!(
        w.translate(&mem, GuestVirtAddr(0xffff_8000_0000_0123), Access::read())
            .unwrap()
            .gpa,
        GuestPhysAddr(0x5123)
    );
    assert_eq!(
        w.translate(&mem, GuestVirtAddr(0x7fff_ffff_ffff), Access::read())
            .unwrap()
            .gpa,
        GuestPhysAddr(0x6fff)
    );
    for va in [
        0x0000_8000_0000_0000u64,
        0xffff_7fff_ffff_ffff,
        0x0001_0000_0000_0000,
        0x8000_0000_0000_0000,
        0x00ff_8000_0000_0000,
    ] {
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(f.reason, FaultReason::NonCanonical, "{va:#x}");
        assert_eq!(f.code, FaultCode::GeneralProtection);
        assert_eq!((f.level, f.entry_addr), (0, None));
    }
}

#[test]
fn canonical_holes_5_level() {
    let mem = mem();
    let mut t = tables(Kind::Level5, &mem);
    // Non-canonical under 4-level, canonical with LA57.
    assert!(t.map(0x0000_8000_0000_0000, 0x5000, 12, full(), |_| full()));
    assert!(t.map(0xff00_0000_0000_0000, 0x6000, 12, full(), |_| full()));
    assert!(t.map(0x00ff_ffff_ffff_f000, 0x7000, 12, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    assert_eq!(
        w.translate(&mem, GuestVirtAddr(0x0000_8000_0000_0010), Access::read())
            .unwrap()
            .gpa,
        GuestPhysAddr(0x5010)
    );
    assert_eq!(
        w.translate(&mem, GuestVirtAddr(0xff00_0000_0000_0010), Access::read())
            .unwrap()
            .gpa,
        GuestPhysAddr(0x6010)
    );
    let t5 = w
        .translate(&mem, GuestVirtAddr(0x00ff_ffff_ffff_ffff), Access::read())
        .unwrap();
    assert_eq!((t5.gpa.0, t5.memory_refs), (0x7fff, 5));
    for va in [
        0x0100_0000_0000_0000u64,
        0xfeff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
    ] {
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(f.reason, FaultReason::NonCanonical, "{va:#x}");
        assert_eq!(f.code, FaultCode::GeneralProtection);
    }
    // 32-bit modes take only 32-bit addresses.
    let mut t = tables(Kind::Pae, &mem);
    assert!(t.map(0, 0x5000, 12, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(1 << 32), Access::read())
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::AddressTooWide);
}

// ------------------------------------------------------------ reserved bits

#[test]
fn reserved_bits_above_maxphyaddr_at_every_level() {
    for kind in [Kind::Level4, Kind::Level5] {
        let mem = mem();
        let mut t = tables(kind, &mem);
        let va = 0x1234_5678_9000;
        assert!(t.map(va, 0x5000, 12, full(), |_| full()));
        let regs = t.regs().with_maxphyaddr(40);
        let w = Walker::new(regs).unwrap();
        for level in 1..=kind.levels() {
            for bit in [40u32, 45, 51] {
                set_bits(&t, va, level, 1 << bit);
                let f = w
                    .translate(&mem, GuestVirtAddr(va), Access::write().user())
                    .unwrap_err();
                assert_eq!(f.reason, FaultReason::Reserved { bits: 1 << bit });
                assert_eq!(f.level, level, "{kind:?} bit {bit}");
                assert_eq!(f.entry_addr, Some(GuestPhysAddr(entry(&t, va, level))));
                assert_eq!(pf(&f), PF_P | PF_W | PF_U | PF_RSVD);
                clear_bits(&t, va, level, 1 << bit);
            }
            // Bits 58:52 are ignored at every level.
            set_bits(&t, va, level, 0x07f0_0000_0000_0000);
            w.translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap();
            clear_bits(&t, va, level, 0x07f0_0000_0000_0000);
        }
        // Bit 39 is an address bit under MAXPHYADDR 40.
        set_bits(&t, va, 1, 1 << 39);
        assert_eq!(
            w.translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap()
                .gpa,
            GuestPhysAddr((1 << 39) | 0x5000)
        );
        // The same bits are address bits at MAXPHYADDR 52.
        set_bits(&t, va, 1, 1 << 45);
        let w52 = Walker::new(t.regs()).unwrap();
        assert_eq!(
            w52.translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap()
                .gpa,
            GuestPhysAddr((1 << 45) | (1 << 39) | 0x5000)
        );
    }
}

#[test]
fn ps_is_reserved_in_pml4e_and_pml5e() {
    for kind in [Kind::Level4, Kind::Level5] {
        let mem = mem();
        let mut t = tables(kind, &mem);
        let va = 0x4000_0000;
        assert!(t.map(va, 0x5000, 12, full(), |_| full()));
        let w = Walker::new(t.regs()).unwrap();
        for level in 4..=kind.levels() {
            set_bits(&t, va, level, PS);
            let f = w
                .translate(&mem, GuestVirtAddr(va), Access::read())
                .unwrap_err();
            assert_eq!(
                f.reason,
                FaultReason::Reserved { bits: PS },
                "{kind:?} {level}"
            );
            assert_eq!(f.level, level);
            assert_eq!(pf(&f), PF_P | PF_RSVD);
            clear_bits(&t, va, level, PS);
        }
        w.translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap();
    }
}

#[test]
fn large_page_reserved_and_pat_bits() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    let (va2m, va1g) = (0x20_0000u64, 0x40_0000_0000u64);
    assert!(t.map(va2m, 0x4000_0000, 21, full(), |_| full()));
    assert!(t.map(va1g, 0x80_0000_0000, 30, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    // Bit 12 is PAT in both.
    set_bits(&t, va2m, 2, 1 << 12);
    set_bits(&t, va1g, 3, 1 << 12);
    let a = w
        .translate(&mem, GuestVirtAddr(va2m + 0x1234), Access::read())
        .unwrap();
    assert_eq!(
        (a.gpa.0, a.page_size, a.attributes.pat),
        (0x4000_1234, 1 << 21, true)
    );
    let b = w
        .translate(&mem, GuestVirtAddr(va1g + 0x123_4567), Access::read())
        .unwrap();
    assert_eq!(
        (b.gpa.0, b.page_size, b.attributes.pat),
        (0x80_0123_4567, 1 << 30, true)
    );
    for bit in [13u32, 16, 20] {
        set_bits(&t, va2m, 2, 1 << bit);
        let f = w
            .translate(&mem, GuestVirtAddr(va2m), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.reason, f.level),
            (FaultReason::Reserved { bits: 1 << bit }, 2)
        );
        clear_bits(&t, va2m, 2, 1 << bit);
    }
    for bit in [13u32, 21, 29] {
        set_bits(&t, va1g, 3, 1 << bit);
        let f = w
            .translate(&mem, GuestVirtAddr(va1g), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.reason, f.level),
            (FaultReason::Reserved { bits: 1 << bit }, 3)
        );
        clear_bits(&t, va1g, 3, 1 << bit);
    }
    // Without 1 GiB page support PS in a PDPTE is reserved.
    let mut regs = t.regs();
    regs.gbpages = false;
    let w = Walker::new(regs).unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(va1g), Access::read())
        .unwrap_err();
    assert_eq!((f.reason, f.level), (FaultReason::Reserved { bits: PS }, 3));
    assert_eq!(pf(&f), PF_P | PF_RSVD);
    w.translate(&mem, GuestVirtAddr(va2m), Access::read())
        .unwrap();
}

#[test]
fn pae_pdpte_and_entry_reserved_bits() {
    let mem = mem();
    let mut t = tables(Kind::Pae, &mem);
    let va = 0x8020_1000u64;
    assert!(t.map(va, 0x5000, 12, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    w.translate(&mem, GuestVirtAddr(va), Access::read())
        .unwrap();
    // PDPTE: 2:1 and 8:5 reserved (no R/W, U/S, A, PS), 63:MAXPHYADDR too,
    // bit 63 even with NXE.
    for bit in [1u32, 2, 5, 6, 7, 8, 52, 62, 63] {
        set_bits(&t, va, 3, 1 << bit);
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.reason, f.level),
            (FaultReason::Reserved { bits: 1 << bit }, 3),
            "bit {bit}"
        );
        assert_eq!(pf(&f), PF_P | PF_RSVD);
        clear_bits(&t, va, 3, 1 << bit);
    }
    // PWT/PCD and the ignored bits 11:9 are allowed.
    set_bits(&t, va, 3, (1 << 3) | (1 << 4) | (7 << 9));
    w.translate(&mem, GuestVirtAddr(va), Access::read())
        .unwrap();
    // PDE/PTE: 62:MAXPHYADDR reserved; 63 is XD with NXE, reserved without.
    for level in [1u8, 2] {
        set_bits(&t, va, level, 1 << 62);
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.reason, f.level),
            (FaultReason::Reserved { bits: 1 << 62 }, level)
        );
        clear_bits(&t, va, level, 1 << 62);
        set_bits(&t, va, level, XD);
        let ok = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap();
        assert!(!ok.permissions.execute);
        let mut regs = t.regs();
        regs.efer &= !EFER_NXE;
        let f = Walker::new(regs)
            .unwrap()
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.reason, f.level),
            (FaultReason::Reserved { bits: XD }, level)
        );
        clear_bits(&t, va, level, XD);
    }
    // A 2 MiB PAE page: bits 20:13 reserved.
    assert!(t.map(0x4000_0000, 0x60_0000, 21, full(), |_| full()));
    set_bits(&t, 0x4000_0000, 2, 1 << 13);
    let f = w
        .translate(&mem, GuestVirtAddr(0x4000_0000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.reason, f.level),
        (FaultReason::Reserved { bits: 1 << 13 }, 2)
    );
}

#[test]
fn bits32_pse36_and_ps_without_pse() {
    let mem = mem();
    let mut t = tables(Kind::Bits32Pse, &mem);
    let va = 0x8040_0000u64;
    // Physical bits 39:32 in PDE bits 20:13.
    assert!(t.map(va, 0xab_c000_0000, 22, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    let tr = w
        .translate(&mem, GuestVirtAddr(va + 0x12_3456), Access::read())
        .unwrap();
    assert_eq!(
        (tr.gpa.0, tr.page_size, tr.level),
        (0xab_c012_3456, 4 << 20, 2)
    );
    // Bit 21 is always reserved.
    set_bits(&t, va, 2, 1 << 21);
    let f = w
        .translate(&mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.reason, f.level),
        (FaultReason::Reserved { bits: 1 << 21 }, 2)
    );
    assert_eq!(pf(&f), PF_P | PF_RSVD);
    clear_bits(&t, va, 2, 1 << 21);
    // With MAXPHYADDR 36 only bits 16:13 carry the address; 20:17 are
    // reserved.
    let w36 = Walker::new(t.regs().with_maxphyaddr(36)).unwrap();
    let f = w36
        .translate(&mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    // 0xab has bits 39:32 = 1010_1011: entry bits 20:13 = 0xab << 13.
    assert_eq!(f.reason, FaultReason::Reserved { bits: 0xa0 << 13 });
    let at = entry(&t, va, 2);
    t.write_entry(at, (t.read_entry(at) & !(0xff << 13)) | (0xb << 13));
    assert_eq!(
        w36.translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap()
            .gpa,
        GuestPhysAddr(0xb_c000_0000)
    );
    // Without CR4.PSE, PS is ignored: the PDE points at a page table.
    let mut plain = t.regs();
    plain.cr4 &= !CR4_PSE;
    let wn = Walker::new(plain).unwrap();
    let pt = 0x30_0000u64;
    t.write_entry(at, pt | PS | 0x7);
    mem.write_obj(GuestPhysAddr(pt + 8), 0x0077_7000u32 | 0x7)
        .unwrap();
    let tr = wn
        .translate(&mem, GuestVirtAddr(va + 0x2abc), Access::read())
        .unwrap();
    assert_eq!((tr.gpa.0, tr.page_size, tr.level), (0x77_7abc, 4096, 1));
    // 32-bit entries have no XD and no reserved bits in a PTE.
    let tr = wn
        .translate(&mem, GuestVirtAddr(va + 0x2000), Access::fetch())
        .unwrap();
    assert!(tr.permissions.execute);
}

#[test]
fn xd_without_nxe_is_reserved_at_every_level() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    let va = 0x7000_0000_1000;
    assert!(t.map(va, 0x5000, 12, full(), |_| full()));
    let mut regs = t.regs();
    regs.efer &= !EFER_NXE;
    let w = Walker::new(regs).unwrap();
    let wn = Walker::new(t.regs()).unwrap();
    for level in 1..=4 {
        set_bits(&t, va, level, XD);
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::fetch())
            .unwrap_err();
        assert_eq!(
            (f.reason, f.level),
            (FaultReason::Reserved { bits: XD }, level)
        );
        // No I/D without NXE (and without SMEP).
        assert_eq!(pf(&f), PF_P | PF_RSVD);
        let f = wn
            .translate(&mem, GuestVirtAddr(va), Access::fetch())
            .unwrap_err();
        assert_eq!((f.reason, f.level), (FaultReason::Permission, level));
        assert_eq!(pf(&f), PF_P | PF_ID);
        clear_bits(&t, va, level, XD);
    }
}

// -------------------------------------------------------------- permissions

#[test]
fn cr0_wp_and_user_supervisor() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    let (sup_ro, user_ro) = (0x1000u64, 0x2000u64);
    assert!(t.map(
        sup_ro,
        0x5000,
        12,
        Flags::full().with(true, false, true, false),
        |_| full()
    ));
    assert!(t.map(user_ro, 0x6000, 12, ro(), |_| full()));
    let wp = Walker::new(t.regs()).unwrap();
    let mut regs = t.regs();
    regs.cr0 &= !CR0_WP;
    let nowp = Walker::new(regs).unwrap();
    for va in [sup_ro, user_ro] {
        let f = wp
            .translate(&mem, GuestVirtAddr(va), Access::write())
            .unwrap_err();
        assert_eq!((f.reason, f.level), (FaultReason::Permission, 1));
        assert_eq!(pf(&f), PF_P | PF_W);
        nowp.translate(&mem, GuestVirtAddr(va), Access::write())
            .unwrap();
    }
    // User writes honour R/W whatever CR0.WP says.
    let f = nowp
        .translate(&mem, GuestVirtAddr(user_ro), Access::write().user())
        .unwrap_err();
    assert_eq!(pf(&f), PF_P | PF_W | PF_U);
    // User accesses to a supervisor page fault (reads too).
    let f = nowp
        .translate(&mem, GuestVirtAddr(sup_ro), Access::read().user())
        .unwrap_err();
    assert_eq!((f.reason, pf(&f)), (FaultReason::Permission, PF_P | PF_U));
    // The rootmost denying level is reported: clear U/S in the PDPTE.
    clear_bits(&t, user_ro, 3, US);
    let f = wp
        .translate(&mem, GuestVirtAddr(user_ro), Access::read().user())
        .unwrap_err();
    assert_eq!(
        (f.level, f.entry_addr.map(|a| a.0)),
        (3, Some(entry(&t, user_ro, 3)))
    );
    // A not-present fault: P clear in the error code.
    let f = wp
        .translate(&mem, GuestVirtAddr(0x9000), Access::write().user())
        .unwrap_err();
    assert_eq!(
        (f.reason, f.level, pf(&f)),
        (FaultReason::NotPresent, 1, PF_W | PF_U)
    );
    let f = wp
        .translate(&mem, GuestVirtAddr(0x9000), Access::fetch())
        .unwrap_err();
    assert_eq!(pf(&f), PF_ID);
}

#[test]
fn smep() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    assert!(t.map(0x1000, 0x5000, 12, full(), |_| full()));
    assert!(t.map(
        0x2000,
        0x6000,
        12,
        Flags::full().with(true, true, true, false),
        |_| full()
    ));
    let mut regs = t.regs();
    regs.cr4 |= CR4_SMEP;
    regs.efer &= !EFER_NXE;
    let w = Walker::new(regs).unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Permission);
    // I/D is reported with SMEP even without NXE.
    assert_eq!(pf(&f), PF_P | PF_ID);
    w.translate(&mem, GuestVirtAddr(0x1000), Access::fetch().user())
        .unwrap();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap();
    w.translate(&mem, GuestVirtAddr(0x2000), Access::fetch())
        .unwrap();
    // Without SMEP the supervisor may run user code.
    Walker::new(t.regs())
        .unwrap()
        .translate(&mem, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap();
}

#[test]
fn smap_with_ac_and_implicit_accesses() {
    use pagefold::paging::{AccessKind, Privilege};
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    assert!(t.map(0x1000, 0x5000, 12, full(), |_| full()));
    assert!(t.map(
        0x2000,
        0x6000,
        12,
        Flags::full().with(true, true, true, false),
        |_| full()
    ));
    let mut regs = t.regs();
    regs.cr4 |= CR4_SMAP;
    let w = Walker::new(regs).unwrap();
    for kind in [AccessKind::Read, AccessKind::Write] {
        let explicit = Access::new(kind, Privilege::Supervisor);
        let implicit = Access::new(kind, Privilege::SupervisorImplicit);
        let f = w
            .translate(&mem, GuestVirtAddr(0x1000), explicit)
            .unwrap_err();
        assert_eq!(f.reason, FaultReason::Permission);
        assert_eq!(
            pf(&f),
            PF_P | if kind == AccessKind::Write { PF_W } else { 0 }
        );
        w.translate(&mem, GuestVirtAddr(0x1000), explicit.with_ac(true))
            .unwrap();
        // Implicit supervisor accesses ignore EFLAGS.AC.
        w.translate(&mem, GuestVirtAddr(0x1000), implicit.with_ac(true))
            .unwrap_err();
        w.translate(&mem, GuestVirtAddr(0x1000), implicit)
            .unwrap_err();
        // Supervisor pages and user accesses are not affected.
        w.translate(&mem, GuestVirtAddr(0x2000), explicit).unwrap();
        w.translate(&mem, GuestVirtAddr(0x2000), implicit).unwrap();
        w.translate(&mem, GuestVirtAddr(0x1000), explicit.user())
            .unwrap();
    }
    // Fetches are SMEP's business, not SMAP's.
    w.translate(&mem, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap();
}

#[test]
fn protection_keys() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    t.pke = true;
    let user = Flags { key: 3, ..full() };
    let sup = Flags {
        key: 5,
        ..Flags::full().with(true, true, true, false)
    };
    assert!(t.map(0x1000, 0x5000, 12, user, |_| full()));
    assert!(t.map(0x2000, 0x6000, 12, sup, |_| full()));
    let mut regs = t.regs();
    regs.cr4 |= CR4_PKE | CR4_PKS;
    // PKRU: key 3 access-disabled. PKRS: key 5 write-disabled.
    regs.pkru = 1 << 6;
    regs.pkrs = 1 << 11;
    let w = Walker::new(regs).unwrap();
    for a in [
        Access::read().user(),
        Access::write().user(),
        Access::read(),
        Access::write(),
    ] {
        let f = w.translate(&mem, GuestVirtAddr(0x1000), a).unwrap_err();
        assert_eq!(f.reason, FaultReason::ProtectionKey { key: 3 }, "{a:?}");
        let want =
            PF_P | PF_PK | if a.is_user() { PF_U } else { 0 } | if a.is_write() { PF_W } else { 0 };
        assert_eq!(pf(&f), want);
    }
    // Fetches are not checked against keys.
    let ok = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::fetch().user())
        .unwrap();
    assert_eq!(ok.permissions.key, 3);
    // PKRS write-disable on a supervisor page: reads fine, writes denied
    // with CR0.WP, allowed without.
    w.translate(&mem, GuestVirtAddr(0x2000), Access::read())
        .unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x2000), Access::write())
        .unwrap_err();
    assert_eq!(
        (f.reason, pf(&f)),
        (FaultReason::ProtectionKey { key: 5 }, PF_P | PF_W | PF_PK)
    );
    let mut nowp = regs;
    nowp.cr0 &= !CR0_WP;
    Walker::new(nowp)
        .unwrap()
        .translate(&mem, GuestVirtAddr(0x2000), Access::write())
        .unwrap();
    // WD on a user page: user writes always denied, supervisor writes only
    // with CR0.WP.
    let mut wd = regs;
    wd.pkru = 1 << 7;
    let w = Walker::new(wd).unwrap();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::read().user())
        .unwrap();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::write().user())
        .unwrap_err();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::write())
        .unwrap_err();
    wd.cr0 &= !CR0_WP;
    let w = Walker::new(wd).unwrap();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::write().user())
        .unwrap_err();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::write())
        .unwrap();
    // A user write to a read-only page whose key also denies it: PK is set
    // with the other bits (SDM 4.7, the PK flag's conditions hold).
    let ro_user = Flags { key: 3, ..ro() };
    assert!(t.map(0x3000, 0x7000, 12, ro_user, |_| full()));
    let mut both = regs;
    both.pkru = 1 << 6;
    let f = Walker::new(both)
        .unwrap()
        .translate(&mem, GuestVirtAddr(0x3000), Access::write().user())
        .unwrap_err();
    assert_eq!((f.level, pf(&f)), (1, PF_P | PF_W | PF_U | PF_PK));
    both.pkru = 0;
    let f = Walker::new(both)
        .unwrap()
        .translate(&mem, GuestVirtAddr(0x3000), Access::write().user())
        .unwrap_err();
    assert_eq!(
        (f.reason, pf(&f)),
        (FaultReason::Permission, PF_P | PF_W | PF_U)
    );
    // Keys off: the same bits mean nothing.
    Walker::new(t.regs())
        .unwrap()
        .translate(&mem, GuestVirtAddr(0x1000), Access::write().user())
        .unwrap();
}

// ---------------------------------------------------------- accessed/dirty

#[test]
fn accessed_and_dirty_flags() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    let (va, big, ro_va) = (0x1000u64, 0x4000_0000u64, 0x3000u64);
    assert!(t.map(va, 0x5000, 12, full(), |_| full()));
    assert!(t.map(big, 0x20_0000, 21, full(), |_| full()));
    assert!(t.map(ro_va, 0x7000, 12, ro(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    let snapshot = |v: u64| -> Vec<u64> { t.path(v).iter().map(|&a| t.read_entry(a)).collect() };
    // Without the option nothing changes.
    let before = snapshot(va);
    w.translate(&mem, GuestVirtAddr(va), Access::write())
        .unwrap();
    assert_eq!(snapshot(va), before);
    // A read sets A at every level, D nowhere.
    w.translate_with(&mem, GuestVirtAddr(va), Access::read(), AD, None)
        .unwrap();
    for (i, e) in snapshot(va).iter().enumerate() {
        assert_eq!(e & (A | D), A, "level {}", 4 - i);
    }
    // A write sets D on the leaf only.
    let tr = w
        .translate_with(&mem, GuestVirtAddr(va), Access::write(), AD, None)
        .unwrap();
    assert!(tr.attributes.dirty && tr.attributes.accessed);
    let s = snapshot(va);
    assert_eq!(s[3] & (A | D), A | D);
    for e in &s[..3] {
        assert_eq!(e & D, 0);
    }
    // A large page: D on the PDE that maps it.
    w.translate_with(&mem, GuestVirtAddr(big), Access::write(), AD, None)
        .unwrap();
    let s = snapshot(big);
    assert_eq!(s.len(), 3);
    assert_eq!(s[2] & (A | D), A | D);
    // A faulting walk changes nothing, not even A on the upper levels.
    let before = snapshot(ro_va);
    w.translate_with(&mem, GuestVirtAddr(ro_va), Access::write(), AD, None)
        .unwrap_err();
    assert_eq!(snapshot(ro_va), before);
    // A walk that ends at a not-present entry changes nothing.
    let before = snapshot(0x9000);
    w.translate_with(&mem, GuestVirtAddr(0x9000), Access::read(), AD, None)
        .unwrap_err();
    assert_eq!(snapshot(0x9000), before);
}

#[test]
fn accessed_flags_pae_pdpte_untouched_and_32_bit() {
    let mem = mem();
    let mut t = tables(Kind::Pae, &mem);
    assert!(t.map(0x4000_1000, 0x5000, 12, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    let pdpte = t.read_entry(entry(&t, 0x4000_1000, 3));
    w.translate_with(&mem, GuestVirtAddr(0x4000_1000), Access::write(), AD, None)
        .unwrap();
    assert_eq!(t.read_entry(entry(&t, 0x4000_1000, 3)), pdpte);
    assert_eq!(t.read_entry(entry(&t, 0x4000_1000, 2)) & (A | D), A);
    assert_eq!(t.read_entry(entry(&t, 0x4000_1000, 1)) & (A | D), A | D);
    // And the walk still works afterwards (no reserved bit was set).
    w.translate(&mem, GuestVirtAddr(0x4000_1000), Access::read())
        .unwrap();

    let mut t = tables(Kind::Bits32Pse, &mem);
    assert!(t.map(0x1000, 0x5000, 12, full(), |_| full()));
    assert!(t.map(0x80_0000, 0x40_0000, 22, full(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    w.translate_with(&mem, GuestVirtAddr(0x1000), Access::write(), AD, None)
        .unwrap();
    w.translate_with(&mem, GuestVirtAddr(0x80_0000), Access::write(), AD, None)
        .unwrap();
    assert_eq!(t.read_entry(entry(&t, 0x1000, 2)) & (A | D), A);
    assert_eq!(t.read_entry(entry(&t, 0x1000, 1)) & (A | D), A | D);
    assert_eq!(t.read_entry(entry(&t, 0x80_0000, 2)) & (A | D), A | D);
}

#[test]
fn accessed_flags_on_a_read_only_image_fault_cleanly() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    assert!(t.map(0x1000, 0x5000, 12, full(), |_| full()));
    let mut bytes = vec![0u8; 8 << 20];
    mem.read(GuestPhysAddr(0), &mut bytes).unwrap();
    let img = PhysImage::new(GuestPhysAddr(0), &bytes);
    let w = Walker::new(t.regs()).unwrap();
    assert_eq!(
        w.translate(&img, GuestVirtAddr(0x1234), Access::read())
            .unwrap()
            .gpa,
        GuestPhysAddr(0x5234)
    );
    let f = w
        .translate_with(&img, GuestVirtAddr(0x1234), Access::read(), AD, None)
        .unwrap_err();
    assert_eq!(
        (f.reason, f.code),
        (FaultReason::ReadOnlyTable, FaultCode::Emulation)
    );
}

#[test]
fn ept_accessed_dirty_flags() {
    for ad in [false, true] {
        let mem = mem();
        let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Ept4);
        assert!(s.map(0x5000, 0x30_0000, 12, full(), |_| full()));
        assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
        let w = Walker::new(g.regs())
            .unwrap()
            .with_second_level(s.second(ad))
            .unwrap();
        let snap =
            |gpa: u64| -> Vec<u64> { s.path(gpa).iter().map(|&a| s.read_entry(a)).collect() };
        w.translate_with(&mem, GuestVirtAddr(0x1000), Access::read(), AD, None)
            .unwrap();
        let fin = snap(0x5000);
        let table = snap(g.root);
        if !ad {
            assert!(fin.iter().chain(&table).all(|e| e & (EA | ED) == 0));
            continue;
        }
        // The final page: A everywhere, no D after a read.
        assert!(fin.iter().all(|e| e & (EA | ED) == EA), "{fin:#x?}");
        // Guest table pages: accesses count as writes, so D on the leaf.
        assert_eq!(table[3] & (EA | ED), EA | ED);
        assert!(table[..3].iter().all(|e| e & (EA | ED) == EA));
        w.translate_with(&mem, GuestVirtAddr(0x1000), Access::write(), AD, None)
            .unwrap();
        assert_eq!(snap(0x5000)[3] & ED, ED);
        // The guest's own flags were set too.
        assert_eq!(g.read_entry(entry(&g, 0x1000, 1)) & (A | D), A | D);
    }
}

// --------------------------------------------------------------------- EPT

fn ept_only(mem: &GuestMemory, cfg: impl FnOnce(&mut EptConfig)) -> (Tables<'_>, Walker) {
    let mut s = tables(Kind::Ept4, mem);
    assert!(s.map(0x1000, 0x30_0000, 12, full(), |_| full()));
    let SecondLevel::Ept(mut c) = s.second(false) else {
        unreachable!()
    };
    cfg(&mut c);
    let w = Walker::new(pagefold::paging::X86Paging::new(0, 0, 0, 0))
        .unwrap()
        .with_second_level(SecondLevel::Ept(c))
        .unwrap();
    (s, w)
}

#[test]
fn ept_execute_only_and_misconfigurations() {
    let mem = mem();
    let (s, w) = ept_only(&mem, |_| {});
    let leaf = entry(&s, 0x1000, 1);
    let base = s.read_entry(leaf) & !7;
    // Execute-only where supported: fetch fine, read a violation with only
    // bit 5 (executable) in the permissions.
    s.write_entry(leaf, base | EX);
    w.translate(&mem, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap();
    // (No guest paging: the linear address is the guest-physical one, so
    // bits 7 and 8 are set.)
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.reason, qual(&f)),
        (FaultReason::Permission, 1 | 1 << 5 | 1 << 7 | 1 << 8)
    );
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::write())
        .unwrap_err();
    assert_eq!(qual(&f), 2 | 1 << 5 | 1 << 7 | 1 << 8);
    // ... and a misconfiguration where not.
    let mem2 = self::mem();
    let (s2, w_noxo) = ept_only(&mem2, |c| c.execute_only = false);
    let leaf2 = entry(&s2, 0x1000, 1);
    s2.write_entry(leaf2, (s2.read_entry(leaf2) & !7) | EX);
    let f = w_noxo
        .translate(&mem2, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap_err();
    assert_eq!(
        (f.reason, f.code),
        (FaultReason::Misconfigured, FaultCode::EptMisconfig)
    );
    s2.write_entry(leaf2, s2.read_entry(leaf2) | ER);
    w_noxo
        .translate(&mem2, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap();
    // Write without read: a misconfiguration, at any level.
    s.write_entry(leaf, base | EW);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!((f.code, f.level), (FaultCode::EptMisconfig, 1));
    s.write_entry(leaf, base | EW | EX);
    assert_eq!(
        w.translate(&mem, GuestVirtAddr(0x1000), Access::read())
            .unwrap_err()
            .code,
        FaultCode::EptMisconfig
    );
    s.write_entry(leaf, base | ER | EW | EX);
    let upper = entry(&s, 0x1000, 3);
    let up = s.read_entry(upper);
    s.write_entry(upper, up & !ER);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!((f.code, f.level), (FaultCode::EptMisconfig, 3));
    s.write_entry(upper, up);
    // Memory types 2, 3 and 7 are reserved in a leaf.
    for mt in 0..8u64 {
        s.write_entry(leaf, (base & !(7 << 3)) | mt << 3 | ER | EW | EX);
        let r = w.translate(&mem, GuestVirtAddr(0x1000), Access::read());
        if matches!(mt, 2 | 3 | 7) {
            assert_eq!(r.unwrap_err().code, FaultCode::EptMisconfig, "type {mt}");
        } else {
            assert_eq!(
                r.unwrap().second.unwrap().attributes.memory_type,
                Some(mt as u8)
            );
        }
    }
    s.write_entry(leaf, base | ER | EW | EX);
    // Bits 7:3 of a non-leaf entry are reserved (PS in the PML4E too).
    for level in [2u8, 3, 4] {
        for bit in [3u32, 6, 7] {
            let at = entry(&s, 0x1000, level);
            let v = s.read_entry(at);
            s.write_entry(at, v | 1 << bit);
            let f = w
                .translate(&mem, GuestVirtAddr(0x1000), Access::read())
                .unwrap_err();
            assert_eq!(
                (f.code, f.level),
                (FaultCode::EptMisconfig, level),
                "bit {bit}"
            );
            s.write_entry(at, v);
        }
    }
    // Address bits above MAXPHYADDR.
    let mem3 = self::mem();
    let (s39, w39) = ept_only(&mem3, |c| c.maxphyaddr = 39);
    let at = entry(&s39, 0x1000, 2);
    s39.write_entry(at, s39.read_entry(at) | 1 << 40);
    assert_eq!(
        w39.translate(&mem3, GuestVirtAddr(0x1000), Access::read())
            .unwrap_err()
            .code,
        FaultCode::EptMisconfig
    );
    s39.write_entry(at, s39.read_entry(at) & !(1 << 40));
    w39.translate(&mem3, GuestVirtAddr(0x1000), Access::read())
        .unwrap();
}

#[test]
fn ept_large_page_reserved_bits() {
    let mem = mem();
    let mut s = tables(Kind::Ept4, &mem);
    assert!(s.map(0x20_0000, 0x40_0000, 21, full(), |_| full()));
    assert!(s.map(0x4000_0000, 0x8000_0000, 30, full(), |_| full()));
    let w = Walker::new(pagefold::paging::X86Paging::new(0, 0, 0, 0))
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let t = w
        .translate(&mem, GuestVirtAddr(0x20_1234), Access::read())
        .unwrap();
    assert_eq!((t.pa.0, t.second.unwrap().page_size), (0x40_1234, 1 << 21));
    for (va, level, bit) in [
        (0x20_0000u64, 2u8, 12u32),
        (0x20_0000, 2, 20),
        (0x4000_0000, 3, 12),
        (0x4000_0000, 3, 29),
    ] {
        set_bits(&s, va, level, 1 << bit);
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.code, f.level),
            (FaultCode::EptMisconfig, level),
            "bit {bit}"
        );
        clear_bits(&s, va, level, 1 << bit);
    }
}

#[test]
fn ept_violation_qualification() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Ept4);
    // Final page readable only: read fine, write a violation (bit 8 set).
    assert!(s.map(
        0x5000,
        0x30_0000,
        12,
        Flags::full().with(true, false, false, true),
        |_| full()
    ));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    // A guest page whose gpa is not mapped.
    assert!(g.map(0x2000, 0x7000, 12, full(), |_| full()));
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    w.translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::write())
        .unwrap_err();
    assert_eq!(f.stage, Stage::Second { guest_table: None });
    assert_eq!(f.gpa, Some(GuestPhysAddr(0x5000)));
    assert_eq!(qual(&f), 2 | 1 << 3 | 1 << 7 | 1 << 8);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap_err();
    assert_eq!(qual(&f), 4 | 1 << 3 | 1 << 7 | 1 << 8);
    let f = w
        .translate(&mem, GuestVirtAddr(0x2000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.reason, qual(&f)),
        (FaultReason::NotPresent, 1 | 1 << 7 | 1 << 8)
    );
    // A guest table the EPT does not map: bit 7 without bit 8; a read
    // without EPT A/D, a write with it.
    let pt_gpa = g.read_entry(entry(&g, 0x1000, 2)) & !0xfff;
    let ept_leaf = s.path(pt_gpa)[3];
    let saved = s.read_entry(ept_leaf);
    s.write_entry(ept_leaf, 0);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::write())
        .unwrap_err();
    assert_eq!(
        f.stage,
        Stage::Second {
            guest_table: Some(1)
        }
    );
    // The guest-physical address is the entry's (PT index 1).
    assert_eq!(f.gpa, Some(GuestPhysAddr(pt_gpa + 8)));
    assert_eq!(qual(&f), 1 | 1 << 7);
    let w_ad = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(true))
        .unwrap();
    // With EPT A/D on, a guest paging-structure access counts as a write
    // and its violation sets both the read and the write bit (SDM table
    // 28-7, note 1).
    let f = w_ad
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(qual(&f), 3 | 1 << 7);
    // Read-only table page: fine without A/D, a write violation with it.
    s.write_entry(ept_leaf, saved & !EW);
    w.translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap();
    let f = w_ad
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.stage, qual(&f)),
        (
            Stage::Second {
                guest_table: Some(1)
            },
            3 | 1 << 3 | 1 << 5 | 1 << 7
        )
    );
    // Without guest paging the linear address is the guest-physical one:
    // bits 7 and 8 set (SDM table 28-7: bit 7 is clear only for PDPTE
    // loads and trace-address pre-translation).
    let w0 = Walker::new(pagefold::paging::X86Paging::new(0, 0, 0, 0))
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let f = w0
        .translate(&mem, GuestVirtAddr(0x5000), Access::write())
        .unwrap_err();
    assert_eq!(qual(&f), 2 | 1 << 3 | 1 << 7 | 1 << 8);
}

#[test]
fn ept_mode_based_execute() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Ept4);
    const XU: u64 = 1 << 10;
    assert!(s.map(0x5000, 0x30_0000, 12, full(), |_| full()));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full())); // user page
    assert!(g.map(
        0x2000,
        0x5000,
        12,
        Flags::full().with(true, true, true, false),
        |_| full()
    ));
    let SecondLevel::Ept(mut c) = s.second(false) else {
        unreachable!()
    };
    c.mode_based_execute = true;
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(SecondLevel::Ept(c))
        .unwrap();
    // X set, XU clear in the final leaf: supervisor fetches only.
    w.translate(&mem, GuestVirtAddr(0x2000), Access::fetch())
        .unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::fetch().user())
        .unwrap_err();
    assert_eq!(f.stage, Stage::Second { guest_table: None });
    // Bits 3-5 R/W/X, bit 6 XU (clear).
    assert_eq!(qual(&f), 4 | 0b111 << 3 | 1 << 7 | 1 << 8);
    // The linear page's U/S decides, not the CPL: a supervisor fetch from
    // the user page needs XU too.
    w.translate(&mem, GuestVirtAddr(0x1000), Access::fetch())
        .unwrap_err();
    // XU everywhere on the path: user fetches allowed, bit 6 reported.
    for a in s.path(0x5000) {
        s.write_entry(a, s.read_entry(a) | XU);
    }
    w.translate(&mem, GuestVirtAddr(0x1000), Access::fetch().user())
        .unwrap();
    let leaf = s.path(0x5000)[3];
    s.write_entry(leaf, s.read_entry(leaf) & !EX);
    let f = w
        .translate(&mem, GuestVirtAddr(0x2000), Access::fetch())
        .unwrap_err();
    assert_eq!(qual(&f), 4 | 0b011 << 3 | 1 << 6 | 1 << 7 | 1 << 8);
    // An entry with only XU set is present under MBEC.
    s.write_entry(leaf, (s.read_entry(leaf) & !7) | XU);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Permission);
}

// --------------------------------------------------------------------- NPT

#[test]
fn npt_exit_info() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Npt4);
    assert!(s.map(0x5000, 0x30_0000, 12, ro(), |_| full()));
    assert!(s.map(
        0x6000,
        0x31_0000,
        12,
        Flags::full().with(true, true, true, false),
        |_| full()
    ));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    assert!(g.map(0x2000, 0x6000, 12, full(), |_| full()));
    assert!(g.map(0x3000, 0x7000, 12, full(), |_| full()));
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let info = |f: &WalkFault| match f.code {
        FaultCode::NestedPageFault { exit_info1 } => exit_info1,
        c => panic!("not an NPF: {c:?}"),
    };
    let t = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap();
    assert_eq!(t.pa, GuestPhysAddr(0x30_0000));
    // Final accesses: bit 32; every access is a user access.
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::write())
        .unwrap_err();
    assert_eq!(info(&f), u64::from(PF_P | PF_W | PF_U) | 1 << 32);
    let f = w
        .translate(&mem, GuestVirtAddr(0x2000), Access::read())
        .unwrap_err();
    assert_eq!(info(&f), u64::from(PF_P | PF_U) | 1 << 32);
    let f = w
        .translate(&mem, GuestVirtAddr(0x3000), Access::fetch())
        .unwrap_err();
    assert_eq!(info(&f), u64::from(PF_U | PF_ID) | 1 << 32);
    // A guest table access: bit 33, and a write.
    let pt_gpa = g.read_entry(entry(&g, 0x1000, 2)) & !0xfff;
    let leaf = s.path(pt_gpa)[3];
    let saved = s.read_entry(leaf);
    s.write_entry(leaf, 0);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(
        f.stage,
        Stage::Second {
            guest_table: Some(1)
        }
    );
    assert_eq!(info(&f), u64::from(PF_W | PF_U) | 1 << 33);
    s.write_entry(leaf, saved);
    // A reserved bit in an NPT entry (above a MAXPHYADDR of 40): RSVD.
    assert!(s.map(0x8000, 0x32_0000, 12, full(), |_| full()));
    assert!(g.map(0x4000, 0x8000, 12, full(), |_| full()));
    set_bits(&s, 0x8000, 1, 1 << 45);
    let SecondLevel::Npt(mut c) = s.second(false) else {
        unreachable!()
    };
    c.maxphyaddr = 40;
    let w40 = Walker::new(g.regs())
        .unwrap()
        .with_second_level(SecondLevel::Npt(c))
        .unwrap();
    let f = w40
        .translate(&mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert_eq!(f.reason, FaultReason::Reserved { bits: 1 << 45 });
    assert_eq!(info(&f), u64::from(PF_P | PF_U | PF_RSVD) | 1 << 32);
    // XD in an NPT entry without the host's NXE is reserved too.
    clear_bits(&s, 0x8000, 1, 1 << 45);
    set_bits(&s, 0x8000, 2, XD);
    c.maxphyaddr = 52;
    c.nxe = false;
    let wx = Walker::new(g.regs())
        .unwrap()
        .with_second_level(SecondLevel::Npt(c))
        .unwrap();
    let f = wx
        .translate(&mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert_eq!((f.reason, f.level), (FaultReason::Reserved { bits: XD }, 2));
}

// ------------------------------------------------------- memory and cycles

#[test]
fn tables_outside_memory_or_in_holes() {
    let mem = GuestMemory::new(&[
        (GuestPhysAddr(0), 1 << 20),
        (GuestPhysAddr(2 << 20), 1 << 20),
    ])
    .unwrap();
    let (pml4, pdpt) = (0x1000u64, 0x2000u64);
    mem.write_obj(GuestPhysAddr(pml4), pdpt | 3).unwrap();
    mem.write_obj(GuestPhysAddr(pml4 + 8), 0x18_0000u64 | 3)
        .unwrap(); // hole
    mem.write_obj(GuestPhysAddr(pml4 + 16), (1u64 << 40) | 3)
        .unwrap(); // past the end
    mem.write_obj(GuestPhysAddr(pdpt), 0x20_0000u64 | 3)
        .unwrap(); // second region
    let w = Walker::new(pagefold::paging::X86Paging::long_mode(pml4)).unwrap();
    for (va, pa) in [(1u64 << 39, 0x18_0000u64), (2 << 39, 1 << 40)] {
        let f = w
            .translate(&mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            f.reason,
            FaultReason::Unbacked {
                pa: GuestPhysAddr(pa)
            }
        );
        assert_eq!((f.code, f.level), (FaultCode::Emulation, 3));
    }
    // The PD in the second region is empty: not present, no panic.
    let f = w
        .translate(&mem, GuestVirtAddr(0), Access::read())
        .unwrap_err();
    assert_eq!((f.reason, f.level), (FaultReason::NotPresent, 2));
    // CR3 itself outside memory.
    let w = Walker::new(pagefold::paging::X86Paging::long_mode(0x10_0000_0000)).unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0), Access::read())
        .unwrap_err();
    assert!(matches!(f.reason, FaultReason::Unbacked { .. }));
    assert_eq!(w.mappings(&mem).filter(Result::is_ok).count(), 0);
    // The listing reports the bad tables and goes on.
    let w = Walker::new(pagefold::paging::X86Paging::long_mode(pml4)).unwrap();
    let errs = w.mappings(&mem).filter(Result::is_err).count();
    assert!(errs >= 2, "{errs}");
}

#[test]
fn discarded_table_page_reads_as_zeros() {
    // The walker reads a region through a direct window until a layer
    // discards a page of it: from then on the region's page states decide,
    // and the discarded page table reads as zeros (not present). Tables in
    // one region, then spread over two (the window follows the walk).
    for (layout, pd, pt) in [
        (vec![(GuestPhysAddr(0), 1u64 << 20)], 0x3000u64, 0x4000u64),
        (
            vec![
                (GuestPhysAddr(0), 1 << 20),
                (GuestPhysAddr(2 << 20), 1 << 20),
            ],
            0x20_3000,
            0x20_4000,
        ),
    ] {
        let mem = GuestMemory::new(&layout).unwrap();
        let (pml4, pdpt) = (0x1000u64, 0x2000u64);
        mem.write_obj(GuestPhysAddr(pml4), pdpt | 3).unwrap();
        mem.write_obj(GuestPhysAddr(pdpt), pd | 3).unwrap();
        mem.write_obj(GuestPhysAddr(pd), pt | 3).unwrap();
        mem.write_obj(GuestPhysAddr(pt + 8), 0x5000u64 | 3).unwrap();
        let w = Walker::new(pagefold::paging::X86Paging::long_mode(pml4)).unwrap();
        let t = w
            .translate(&mem, GuestVirtAddr(0x1234), Access::read())
            .unwrap();
        assert_eq!((t.gpa.0, t.memory_refs), (0x5234, 4));
        mem.discard(GuestPhysAddr(pt), PAGE).unwrap();
        let f = w
            .translate(&mem, GuestVirtAddr(0x1234), Access::read())
            .unwrap_err();
        assert_eq!((f.reason, f.level), (FaultReason::NotPresent, 1));
        // Written again, it is read again.
        mem.write_obj(GuestPhysAddr(pt + 8), 0x6000u64 | 3).unwrap();
        let t = w
            .translate(&mem, GuestVirtAddr(0x1234), Access::read())
            .unwrap();
        assert_eq!((t.gpa.0, t.memory_refs), (0x6234, 4));
    }
}

#[test]
fn second_level_table_in_a_hole() {
    let mem = GuestMemory::new(&[
        (GuestPhysAddr(0), 16 << 20),
        (GuestPhysAddr(32 << 20), 1 << 20),
    ])
    .unwrap();
    let (mut g, s) = nested(&mem, Kind::Level4, Kind::Ept4);
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    // The EPT PDPTE covering gpa 0x5000 points into the hole.
    let pdpte = s.path(0x5000)[1];
    s.write_entry(pdpte, 0x140_0000 | ER | EW | EX);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(f.stage, Stage::Second { guest_table: None });
    assert_eq!(
        (f.reason, f.code),
        (
            FaultReason::Unbacked {
                pa: GuestPhysAddr(0x140_0000)
            },
            FaultCode::Emulation
        )
    );
    // A guest table in a hole of guest-physical space behind the EPT.
    let pml4e = entry(&g, 0x1000, 4);
    g.write_entry(pml4e, 0x5000 | 7);
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(
        f.stage,
        Stage::Second {
            guest_table: Some(3)
        }
    );
    assert!(matches!(f.reason, FaultReason::Unbacked { .. }), "{f}");
    assert!(w.mappings(&mem).any(|m| m.is_err()));
}

#[test]
fn self_referencing_tables_stay_bounded() {
    let mem = mem();
    let pml4 = 0x1000u64;
    // Every PML4 entry points at the PML4 itself.
    for i in 0..512 {
        mem.write_obj(GuestPhysAddr(pml4 + 8 * i), pml4 | 7)
            .unwrap();
    }
    let w = Walker::new(pagefold::paging::X86Paging::long_mode(pml4)).unwrap();
    // Read as a PTE at the bottom, the same entry maps the PML4's frame.
    let t = w
        .translate(&mem, GuestVirtAddr(0x7fff_ffff_f123), Access::read())
        .unwrap();
    assert_eq!((t.gpa.0, t.memory_refs), (pml4 + 0x123, 4));
    w.translate_with(
        &mem,
        GuestVirtAddr(0xffff_8000_0000_0000),
        Access::write(),
        AD,
        None,
    )
    .unwrap();
    let items: Vec<_> = w.mappings_with_budget(&mem, 10_000).collect();
    assert!(items.len() <= 10_001, "{}", items.len());
    assert_eq!(
        items.last().unwrap().unwrap_err().reason,
        FaultReason::TooManyEntries
    );
    assert!(items[..items.len() - 1].iter().all(Result::is_ok));
    // The same through a cache.
    let mut cache = WalkCache::new();
    for va in [0u64, 0x1000, 0x20_0000] {
        let a = w
            .translate_with(
                &mem,
                GuestVirtAddr(va),
                Access::read(),
                WalkOptions::default(),
                Some(&mut cache),
            )
            .unwrap();
        assert_eq!(a.gpa, GuestPhysAddr(pml4));
    }
}

// ------------------------------------------------------- read_virt/write_virt

#[test]
fn read_and_write_virt_across_pages() {
    let mem = mem();
    let mut t = tables(Kind::Level4, &mem);
    // Three scattered pages; the third read-only.
    assert!(t.map(0x1000, 0x30_0000, 12, full(), |_| full()));
    assert!(t.map(0x2000, 0x20_0000, 12, full(), |_| full()));
    assert!(t.map(0x3000, 0x28_0000, 12, ro(), |_| full()));
    let w = Walker::new(t.regs()).unwrap();
    let data: Vec<u8> = (0..100u8).collect();
    w.write_virt(
        &mem,
        GuestVirtAddr(0x1fd0),
        &data,
        Access::write(),
        WalkOptions::default(),
        None,
    )
    .unwrap();
    let mut a = [0u8; 0x30];
    mem.read(GuestPhysAddr(0x30_0fd0), &mut a).unwrap();
    assert_eq!(&a[..], &data[..0x30]);
    let mut b = [0u8; 100 - 0x30];
    mem.read(GuestPhysAddr(0x20_0000), &mut b).unwrap();
    assert_eq!(&b[..], &data[0x30..]);
    let mut back = vec![0u8; 100];
    let mut cache = WalkCache::new();
    w.read_virt(
        &mem,
        GuestVirtAddr(0x1fd0),
        &mut back,
        Access::read(),
        WalkOptions::default(),
        Some(&mut cache),
    )
    .unwrap();
    assert_eq!(back, data);
    // A write whose second page is read-only writes nothing at all.
    let e = w
        .write_virt(
            &mem,
            GuestVirtAddr(0x2ff0),
            &[0xee; 32],
            Access::write(),
            WalkOptions::default(),
            None,
        )
        .unwrap_err();
    assert_eq!(
        (e.offset, e.fault.reason, e.fault.va.0),
        (16, FaultReason::Permission, 0x3000)
    );
    let mut c = [0u8; 16];
    mem.read(GuestPhysAddr(0x20_0ff0), &mut c).unwrap();
    assert_eq!(c, [0u8; 16]);
    // A read into an unmapped page fills what it could.
    let mut buf = [0u8; 0x40];
    let e = w
        .read_virt(
            &mem,
            GuestVirtAddr(0xfe0),
            &mut buf,
            Access::read(),
            WalkOptions::default(),
            None,
        )
        .unwrap_err();
    assert_eq!(
        (e.offset, e.fault.reason, e.fault.va.0),
        (0, FaultReason::NotPresent, 0xfe0)
    );
    let e = w
        .read_virt(
            &mem,
            GuestVirtAddr(0x3fe0),
            &mut buf,
            Access::read(),
            WalkOptions::default(),
            None,
        )
        .unwrap_err();
    assert_eq!((e.offset, e.fault.va.0), (0x20, 0x4000));
    // A write through the dirty-flag path marks both pages dirty.
    w.write_virt(
        &mem,
        GuestVirtAddr(0x1ff8),
        &[1; 16],
        Access::write(),
        AD,
        None,
    )
    .unwrap();
    for va in [0x1000u64, 0x2000] {
        assert_eq!(t.read_entry(entry(&t, va, 1)) & (A | D), A | D);
    }
}

#[test]
fn invlpg_drops_every_fragment_of_a_large_page() {
    // A 2 MiB guest page over 4 KiB EPT pages is cached as 4 KiB
    // fragments. INVLPG of any address in the page drops them all (SDM
    // 4.10.4.1: "If the paging structures map the linear address using a
    // page larger than 4 KBytes and there are multiple TLB entries for
    // that page, the instruction invalidates all of them").
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Ept4);
    for i in 0..512 {
        assert!(s.map(
            0x20_0000 + i * PAGE,
            0x200_0000 + i * PAGE,
            12,
            full(),
            |_| full()
        ));
    }
    assert!(g.map(0x4000_0000, 0x20_0000, 21, full(), |_| full()));
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let mut cache = WalkCache::new();
    for off in [0u64, 0x1000, 0x5_0000] {
        w.translate_with(
            &mem,
            GuestVirtAddr(0x4000_0000 + off),
            Access::read(),
            WalkOptions::default(),
            Some(&mut cache),
        )
        .unwrap();
    }
    g.unmap(0x4000_0000).unwrap();
    cache.invalidate_page(w.space(), GuestVirtAddr(0x4000_0000));
    for off in [0u64, 0x1000, 0x5_0000] {
        let r = w.translate_with(
            &mem,
            GuestVirtAddr(0x4000_0000 + off),
            Access::read(),
            WalkOptions::default(),
            Some(&mut cache),
        );
        assert_eq!(
            r.unwrap_err().reason,
            FaultReason::NotPresent,
            "offset {off:#x}"
        );
    }
}

// ------------------------------------------ second level against the manuals
// Cases a review against the SDM/APM found: EPT violation qualifications
// for guest paging-structure accesses (SDM table 28-7), A/D updates as
// writes (SDM 29.3.3.2), PAE PDPTE loads as reads, guest paging off, AMD's
// reserved bit 8 in non-leaf NPT entries, mode-based execute without
// execute-only support (SDM 29.3.3.1). Each failed before its fix.

/// SDM table 28-7 note: with EPT A/D on, guest paging-structure accesses are
/// treated as writes; "if such an access causes an EPT violation, the
/// processor sets both bit 0 and bit 1 of the exit qualification".
#[test]
fn ept_ad_table_access_violation_sets_read_and_write_bits() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Ept4);
    assert!(s.map(0x5000, 0x30_0000, 12, full(), |_| full()));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    let pt_gpa = g.read_entry(g.entry_at(0x1000, 2)) & !0xfff;
    let ept_leaf = s.path(pt_gpa)[3];
    s.write_entry(ept_leaf, s.read_entry(ept_leaf) & !EW); // table page read-only
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(true))
        .unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(
        f.stage,
        Stage::Second {
            guest_table: Some(1)
        }
    );
    assert_eq!(qual(&f) & 3, 3, "qualification {:#x}", qual(&f));
}

/// SDM §29.3.3.2: "Writes by the logical processor to guest paging
/// structures to update accessed and dirty flags are considered to be data
/// writes" (EPT A/D off too). A guest PTE in an EPT read-only page whose A
/// flag is clear: the A update must be an EPT violation (bit 1, bit 8 clear),
/// and the entry must stay unchanged.
#[test]
fn ept_no_ad_guest_ad_update_through_read_only_ept_page() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Ept4);
    assert!(s.map(0x5000, 0x30_0000, 12, full(), |_| full()));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    let pte = g.entry_at(0x1000, 1);
    g.write_entry(pte, g.read_entry(pte) & !A);
    let pt_gpa = g.read_entry(g.entry_at(0x1000, 2)) & !0xfff;
    let ept_leaf = s.path(pt_gpa)[3];
    s.write_entry(ept_leaf, s.read_entry(ept_leaf) & !EW);
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let r = w.translate_with(&mem, GuestVirtAddr(0x1000), Access::read(), AD, None);
    let pte_after = g.read_entry(pte);
    assert!(
        r.is_err(),
        "walk succeeded and wrote A into a page EPT maps read-only: pte {pte_after:#x}"
    );
    let f = r.unwrap_err();
    assert_eq!(qual(&f) & 2, 2);
    assert_eq!(qual(&f) & (1 << 8), 0);
}

/// SDM table 28-7 bit 7: the guest linear-address field is valid for all
/// EPT violations except PDPTE loads by MOV CR (and TAPT). With CR0.PG=0 the
/// linear address is the guest-physical address (bit 8: it is the
/// translation of a linear address).
#[test]
fn ept_violation_without_guest_paging_has_linear_address() {
    let mem = mem();
    let mut s = Tables::new(Kind::Ept4, &mem, TABLES, TABLES, TABLES_LEN);
    assert!(s.map(
        0x5000,
        0x30_0000,
        12,
        Flags::full().with(true, false, true, true),
        |_| full()
    ));
    let w = Walker::new(X86Paging::new(0, 0, 0, 0))
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x5000), Access::write())
        .unwrap_err();
    assert_eq!(qual(&f) & (3 << 7), 3 << 7, "qualification {:#x}", qual(&f));
}

/// SDM §29.3.3.2 (and §4.4.1): PDPTE loads for PAE paging are treated as
/// reads even if EPTP bit 6 is 1 (and they happen at MOV CR3, not during
/// the walk). A PAE guest whose PDPT page is EPT read-only must translate
/// with EPT A/D on, and the EPT leaf mapping the PDPT must not get D.
#[test]
fn pae_pdpte_under_ept_ad_is_a_read() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Pae, Kind::Ept4);
    assert!(s.map(0x5000, 0x30_0000, 12, full(), |_| full()));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    let pdpt_gpa = g.regs().cr3 & !0xfff;
    let ept_leaf = s.path(pdpt_gpa)[3];
    s.write_entry(ept_leaf, s.read_entry(ept_leaf) & !EW);
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(true))
        .unwrap();
    let r = w.translate(&mem, GuestVirtAddr(0x1000), Access::read());
    assert!(r.is_ok(), "{:?}", r.err().map(|f| (f.stage, f.code)));
    // D on the PDPT's EPT leaf (writable again).
    s.write_entry(ept_leaf, s.read_entry(ept_leaf) | EW);
    w.translate_with(&mem, GuestVirtAddr(0x1000), Access::read(), AD, None)
        .unwrap();
    assert_eq!(
        s.read_entry(ept_leaf) & (EA | ED),
        EA,
        "EPT leaf of the PDPT page {:#x}",
        s.read_entry(ept_leaf)
    );
}

/// AMD: non-leaf PML4Es (bits 8:7 MBZ) and PDPEs reserve bit 8 (KVM's
/// __reset_rsvds_bits_mask, `nonleaf_bit8_rsvd` for AMD, used for NPT).
#[test]
fn npt_nonleaf_bit8_reserved() {
    let mem = mem();
    let (mut g, mut s) = nested(&mem, Kind::Level4, Kind::Npt4);
    assert!(s.map(0x5000, 0x30_0000, 12, full(), |_| full()));
    assert!(g.map(0x1000, 0x5000, 12, full(), |_| full()));
    let pml4e = s.entry_at(0x5000, 4);
    s.write_entry(pml4e, s.read_entry(pml4e) | 1 << 8);
    let w = Walker::new(g.regs())
        .unwrap()
        .with_second_level(s.second(false))
        .unwrap();
    let r = w.translate(&mem, GuestVirtAddr(0x1000), Access::read());
    assert!(r.is_err(), "NPT PML4E with bit 8 set accepted");
}

/// SDM §29.3.3.1: without execute-only support, with mode-based execute
/// control, an entry with bit 0 clear and bit 10 set is misconfigured.
#[test]
fn ept_mbec_user_execute_only_without_execute_only_support() {
    let mem = mem();
    let mut s = Tables::new(Kind::Ept4, &mem, TABLES, TABLES, TABLES_LEN);
    assert!(s.map(0x1000, 0x30_0000, 12, full(), |_| full()));
    let leaf = s.entry_at(0x1000, 1);
    s.write_entry(leaf, (s.read_entry(leaf) & !7) | 1 << 10);
    let SecondLevel::Ept(mut c) = s.second(false) else {
        unreachable!()
    };
    c.execute_only = false;
    c.mode_based_execute = true;
    let w = Walker::new(X86Paging::new(0, 0, 0, 0))
        .unwrap()
        .with_second_level(SecondLevel::Ept(c))
        .unwrap();
    let f = w
        .translate(&mem, GuestVirtAddr(0x1000), Access::read())
        .unwrap_err();
    assert_eq!(f.code, FaultCode::EptMisconfig, "{f}");
}

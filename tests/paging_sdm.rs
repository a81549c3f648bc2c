//! The second level against the manuals, cases found by review: EPT
//! violation qualifications for guest paging-structure accesses (SDM table
//! 28-7), accessed/dirty updates as writes (SDM 29.3.3.2), PAE PDPTE loads
//! as reads, guest paging off, AMD's reserved bit 8 in non-leaf NPT
//! entries, and mode-based execute without execute-only support (SDM
//! 29.3.3.1). Each failed before its fix.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, dead_code)]

#[path = "common/page_tables.rs"]
mod page_tables;

use page_tables::{Flags, Kind, Tables, A, EA, ED, EW, PAGE};
use pagefold::paging::{Access, FaultCode, Stage, WalkFault, WalkOptions, Walker, X86Paging};
use pagefold::{GuestMemory, GuestPhysAddr};

const MEM: u64 = 64 << 20;
const TABLES: u64 = 0x10_0000;
const TABLES_LEN: u64 = 0x70_0000;
const GT_GPA: u64 = 0xc000_0000;
const GT_HOST: u64 = 0x80_0000;
const GT_LEN: u64 = 0x4_0000;
const AD: WalkOptions = WalkOptions {
    set_accessed_dirty: true,
};

fn mem() -> GuestMemory {
    GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap()
}
fn full() -> Flags {
    Flags::full()
}
fn qual(f: &WalkFault) -> u64 {
    match f.code {
        FaultCode::EptViolation { qualification } => qualification,
        c => panic!("not an EPT violation: {c:?} ({f})"),
    }
}
fn nested<'m>(mem: &'m GuestMemory, first: Kind, second: Kind) -> (Tables<'m>, Tables<'m>) {
    let mut s = Tables::new(second, mem, TABLES, TABLES, TABLES_LEN);
    for i in 0..GT_LEN / PAGE {
        assert!(
            s.map(GT_GPA + i * PAGE, GT_HOST + i * PAGE, 12, full(), |_| full(
            ))
        );
    }
    let g = Tables::new(first, mem, GT_GPA, GT_HOST, GT_LEN);
    (g, s)
}

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
    let f = w.translate(&mem, 0x1000, Access::read()).unwrap_err();
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
    let r = w.translate_with(&mem, 0x1000, Access::read(), AD, None);
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
    let f = w.translate(&mem, 0x5000, Access::write()).unwrap_err();
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
    let r = w.translate(&mem, 0x1000, Access::read());
    assert!(r.is_ok(), "{:?}", r.err().map(|f| (f.stage, f.code)));
    // D on the PDPT's EPT leaf (writable again).
    s.write_entry(ept_leaf, s.read_entry(ept_leaf) | EW);
    w.translate_with(&mem, 0x1000, Access::read(), AD, None)
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
    let r = w.translate(&mem, 0x1000, Access::read());
    assert!(r.is_err(), "NPT PML4E with bit 8 set accepted");
}

/// SDM §29.3.3.1: without execute-only support, with mode-based execute
/// control, an entry with bit 0 clear and bit 10 set is misconfigured.
#[test]
fn ept_mbec_user_execute_only_without_execute_only_support() {
    use pagefold::paging::SecondLevel;
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
    let f = w.translate(&mem, 0x1000, Access::read()).unwrap_err();
    assert_eq!(f.code, FaultCode::EptMisconfig, "{f}");
}

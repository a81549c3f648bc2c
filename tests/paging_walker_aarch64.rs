//! AArch64 guests through the architecture-neutral `Walker`: the same
//! answers as the AArch64 walker's own, and everything built around the
//! walk — the walk cache (hits, ASID invalidation, tagged addresses under
//! TBID), the listing of both TTBR ranges, range translation and
//! `read_virt`/`write_virt` — on hand-built 4 KiB-granule tables.

// Test code: table fields are built from small known values.
#![allow(clippy::unwrap_used)]

use pagefold::paging::{
    aarch64::regs::{SCTLR_M, TCR_TBI0, TCR_TBID0},
    Aarch64FaultKind, Aarch64Paging, Aarch64Walker, Access, AccessKind, Arch, ArchAttributes,
    FaultCode, Granule, Privilege, Stage, WalkCache, WalkOptions, Walker,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};

const PAGE: u64 = 1 << 12;
const TABLE: u64 = 3;
const AF: u64 = 1 << 10;
const NG: u64 = 1 << 11;
const AP1: u64 = 1 << 6;
const AP2: u64 = 1 << 7;
const UXN: u64 = 1 << 54;

/// 4 KiB granule, 48-bit VAs in both ranges (T0SZ = T1SZ = 16), 4 levels.
struct Tables {
    mem: GuestMemory,
    next: u64,
}

impl Tables {
    fn new() -> Self {
        Tables {
            mem: GuestMemory::new(&[(GuestPhysAddr(0), 16 << 20)]).unwrap(),
            next: 0x10_0000,
        }
    }

    fn alloc(&mut self) -> u64 {
        let t = self.next;
        self.next += PAGE;
        t
    }

    fn entry(&self, pa: u64) -> u64 {
        self.mem.read_obj(GuestPhysAddr(pa)).unwrap()
    }

    /// Maps `va` with `leaf` at architectural `level` (1..=3) under
    /// `root`; returns the leaf entry's address.
    fn map(&mut self, root: u64, va: u64, level: u8, leaf: u64) -> u64 {
        let mut table = root;
        for l in 0..level {
            let at = table + 8 * ((va >> (39 - 9 * u32::from(l))) & 511);
            let e = self.entry(at);
            table = if e & 3 == 3 {
                e & 0x0000_ffff_ffff_f000
            } else {
                let t = self.alloc();
                self.mem.write_obj(GuestPhysAddr(at), t | TABLE).unwrap();
                t
            };
        }
        let at = table + 8 * ((va >> (39 - 9 * u32::from(level))) & 511);
        self.mem.write_obj(GuestPhysAddr(at), leaf).unwrap();
        at
    }
}

fn regs(root0: u64, root1: u64, asid: u16) -> Aarch64Paging {
    let mut r = Aarch64Paging::new(Granule::K4, root0 | u64::from(asid) << 48, root1);
    r.mair = 0x0000_0000_0044_ff00;
    r
}

const HIGH: u64 = 0xffff_8000_0000_0000;

/// A lower-range user page, an upper-range kernel page, a 2 MiB block in
/// the upper range.
fn layout() -> (Tables, u64, u64) {
    let mut t = Tables::new();
    let (r0, r1) = (t.alloc(), t.alloc());
    t.map(r0, 0x40_0000, 3, 0x20_0000 | TABLE | AF | AP1 | NG | 1 << 2);
    t.map(r0, 0x40_1000, 3, 0x30_0000 | TABLE | AF | AP1 | NG);
    t.map(r1, HIGH | 0x1000, 3, 0x21_0000 | TABLE | AF | UXN);
    t.map(r1, HIGH | 0x4000_0000, 2, 0x40_0000 | 1 | AF | UXN | AP2);
    (t, r0, r1)
}

#[test]
fn walker_agrees_with_the_aarch64_walker_and_reports_the_abort() {
    let (t, r0, r1) = layout();
    let rg = regs(r0, r1, 7);
    let w = Walker::new(rg).unwrap();
    let a = Aarch64Walker::new(rg).unwrap();
    assert_eq!(w.arch(), Arch::Aarch64);
    assert_eq!(w.pcid(), 7);
    let vas = [
        0x40_0123,
        0x40_1fff,
        0x40_2000,
        HIGH | 0x1008,
        HIGH | 0x4012_3456,
        HIGH | 0x2000,
        0x0001_0000_0000_0000,
        0x0080_0000_0000_0000,
    ];
    for va in vas {
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            for privilege in [Privilege::User, Privilege::Supervisor] {
                let access = Access::new(kind, privilege);
                let got = w.translate(&t.mem, GuestVirtAddr(va), access);
                let want = a.translate(&t.mem, GuestVirtAddr(va), access);
                match (got, want) {
                    (Ok(g), Ok(x)) => {
                        assert_eq!((g.gpa, g.pa, g.page_size), (x.pa, x.pa, x.page_size));
                        assert_eq!(g.permissions, x.permissions);
                        assert_eq!(g.arch_attributes, ArchAttributes::Aarch64(x.attributes));
                        assert_eq!(g.memory_refs, x.memory_refs);
                        assert_eq!(Some(4 - i8::try_from(g.level).unwrap()), x.level);
                    }
                    (Err(g), Err(x)) => {
                        assert_eq!(g.stage, Stage::First);
                        let esr = x.esr_el1().unwrap();
                        assert_eq!(
                            g.code,
                            FaultCode::Aarch64Abort { esr },
                            "{va:#x} {access:?}"
                        );
                    }
                    (g, x) => panic!("{va:#x} {access:?}: walker {g:?}, aarch64 walker {x:?}"),
                }
            }
        }
    }
    // The abort's syndrome: a data abort from EL0, translation fault at
    // level 3 (the lower range's unmapped page after 0x40_1000).
    let f = w
        .translate(&t.mem, GuestVirtAddr(0x40_2000), Access::read().user())
        .unwrap_err();
    assert_eq!(
        f.code,
        FaultCode::Aarch64Abort {
            esr: 0x24 << 26 | 1 << 25 | 0b00_0111
        }
    );
    // The MAIR byte AttrIndx 1 selects, and the neutral flags.
    let tr = w
        .translate(&t.mem, GuestVirtAddr(0x40_0000), Access::read())
        .unwrap();
    let ArchAttributes::Aarch64(attrs) = tr.arch_attributes else {
        panic!("no AArch64 attributes")
    };
    assert_eq!((attrs.attr_index, attrs.memory_attr), (1, 0xff));
    assert!(tr.attributes.accessed && !tr.attributes.global);
}

#[test]
fn cache_hits_and_asid_invalidation() {
    let (t, r0, r1) = layout();
    let w = Walker::new(regs(r0, r1, 7)).unwrap();
    let mut cache = WalkCache::new();
    let read = Access::read();
    let opts = WalkOptions::default();
    for va in [0x40_0010, HIGH | 0x1010] {
        let cold = w
            .translate_with(&t.mem, GuestVirtAddr(va), read, opts, Some(&mut cache))
            .unwrap();
        assert!(cold.memory_refs > 0);
        let warm = w
            .translate_with(&t.mem, GuestVirtAddr(va), read, opts, Some(&mut cache))
            .unwrap();
        assert_eq!(warm.memory_refs, 0, "{va:#x} is a hit");
        assert_eq!((warm.gpa, warm.permissions), (cold.gpa, cold.permissions));
        assert_eq!(warm.arch_attributes, cold.arch_attributes);
    }
    // A hit re-checks the access: EL0 may not touch the kernel page.
    let f = w
        .translate_with(
            &t.mem,
            GuestVirtAddr(HIGH | 0x1010),
            read.user(),
            opts,
            Some(&mut cache),
        )
        .unwrap_err();
    assert!(matches!(f.code, FaultCode::Aarch64Abort { .. }));
    // TLBI ASIDE1 for ASID 7: the nG user page walks again, the global
    // kernel page stays.
    cache.invalidate_pcid(7);
    let user = w
        .translate_with(
            &t.mem,
            GuestVirtAddr(0x40_0010),
            read,
            opts,
            Some(&mut cache),
        )
        .unwrap();
    let kernel = w
        .translate_with(
            &t.mem,
            GuestVirtAddr(HIGH | 0x1010),
            read,
            opts,
            Some(&mut cache),
        )
        .unwrap();
    assert!(user.memory_refs > 0);
    assert_eq!(kernel.memory_refs, 0);
    // Another ASID is another address space: its own walk.
    let other = Walker::new(regs(r0, r1, 9)).unwrap();
    let t9 = other
        .translate_with(
            &t.mem,
            GuestVirtAddr(0x40_0010),
            read,
            opts,
            Some(&mut cache),
        )
        .unwrap();
    assert!(t9.memory_refs > 0);
}

/// Under TBI0 with TBID0 a tagged address may be used by data accesses
/// only: a fetch of it faults even right after a data access to it went
/// through the cache.
#[test]
fn tagged_addresses_under_tbid_are_checked_on_every_access() {
    let (t, r0, r1) = layout();
    let mut rg = regs(r0, r1, 7);
    rg.tcr |= TCR_TBI0 | TCR_TBID0;
    let w = Walker::new(rg).unwrap();
    let mut cache = WalkCache::new();
    let tagged = GuestVirtAddr(0x5a00_0000_0040_1000);
    let opts = WalkOptions::default();
    for _ in 0..2 {
        let tr = w
            .translate_with(&t.mem, tagged, Access::read(), opts, Some(&mut cache))
            .unwrap();
        assert_eq!(tr.gpa, GuestPhysAddr(0x30_0000));
        // (An EL0 fetch: the page allows it, only the range check may
        // refuse.)
        let f = w
            .translate_with(
                &t.mem,
                tagged,
                Access::fetch().user(),
                opts,
                Some(&mut cache),
            )
            .unwrap_err();
        assert_eq!(f.reason, pagefold::paging::FaultReason::NonCanonical);
        let mut bound = cache.bind(&w);
        assert!(bound
            .translate_pa(&t.mem, tagged, Access::fetch().user(), opts)
            .is_err());
    }
    // Without TBID an (EL0) fetch of the tagged address is fine, but not
    // cached: TLBI by VA drops the untagged page, which a tagged entry of
    // its own would outlive (review17). (EL1 may not execute this
    // EL0-writable page.)
    rg.tcr &= !TCR_TBID0;
    let w = Walker::new(rg).unwrap();
    let mut cache = WalkCache::new();
    for _ in 0..2 {
        w.translate_with(
            &t.mem,
            tagged,
            Access::fetch().user(),
            opts,
            Some(&mut cache),
        )
        .unwrap();
    }
    assert_eq!(cache.stats().hits, 0);
}

#[test]
fn listing_covers_both_ranges_in_address_order() {
    let (t, r0, r1) = layout();
    let w = Walker::new(regs(r0, r1, 7)).unwrap();
    let maps: Vec<_> = w.mappings(&t.mem).map(Result::unwrap).collect();
    let got: Vec<(u64, u64, u64)> = maps.iter().map(|m| (m.va.0, m.gpa.0, m.size)).collect();
    assert_eq!(
        got,
        [
            (0x40_0000, 0x20_0000, PAGE),
            (0x40_1000, 0x30_0000, PAGE),
            (HIGH | 0x1000, 0x21_0000, PAGE),
            (HIGH | 0x4000_0000, 0x40_0000, 2 << 20),
        ]
    );
    for m in &maps {
        let tr = w.translate(&t.mem, m.va, Access::read()).unwrap();
        assert_eq!(
            (tr.gpa, tr.permissions, tr.level),
            (m.gpa, m.permissions, m.level)
        );
        assert_eq!(tr.arch_attributes, m.arch_attributes);
    }
    // EPD1 leaves the upper range out; the MMU off is one flat mapping of
    // the PA size.
    let mut rg = regs(r0, r1, 7);
    rg.tcr |= pagefold::paging::aarch64::regs::TCR_EPD1;
    let lower = Walker::new(rg).unwrap().mappings(&t.mem).count();
    assert_eq!(lower, 2);
    rg.sctlr &= !SCTLR_M;
    let flat: Vec<_> = Walker::new(rg).unwrap().mappings(&t.mem).collect();
    assert_eq!(flat.len(), 1);
    assert_eq!(flat[0].as_ref().unwrap().size, 1 << 48);
}

#[test]
fn ranges_and_virtual_reads_and_writes() {
    let (t, r0, r1) = layout();
    let w = Walker::new(regs(r0, r1, 7)).unwrap();
    // Two pages, not physically contiguous: two segments.
    let segs: Vec<_> = w
        .translate_range(&t.mem, GuestVirtAddr(0x40_0f00), 0x200, Access::read())
        .map(Result::unwrap)
        .collect();
    assert_eq!(segs.len(), 2);
    assert_eq!(
        (segs[0].gpa, segs[0].len),
        (GuestPhysAddr(0x20_0f00), 0x100)
    );
    assert_eq!(
        (segs[1].gpa, segs[1].len),
        (GuestPhysAddr(0x30_0000), 0x100)
    );
    // A write across the page boundary lands in both frames.
    let data: Vec<u8> = (0..=255).collect();
    w.write_virt(
        &t.mem,
        GuestVirtAddr(0x40_0f80),
        &data,
        Access::write(),
        WalkOptions::default(),
        None,
    )
    .unwrap();
    let mut back = [0u8; 256];
    w.read_virt(
        &t.mem,
        GuestVirtAddr(0x40_0f80),
        &mut back,
        Access::read(),
        WalkOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(back[..], data[..]);
    let high: u8 = t.mem.read_obj(GuestPhysAddr(0x30_0000)).unwrap();
    assert_eq!(high, 0x80);
    // The read-only block refuses a write with a permission fault.
    let f = w
        .write_virt(
            &t.mem,
            GuestVirtAddr(HIGH | 0x4000_0000),
            &data,
            Access::write(),
            WalkOptions::default(),
            None,
        )
        .unwrap_err();
    let FaultCode::Aarch64Abort { esr } = f.fault.code else {
        panic!("{f:?}")
    };
    assert_eq!(esr & 0x3f, 0b00_1110, "permission fault, level 2");
    let _ = Aarch64FaultKind::Permission;
}

#[test]
fn an_x86_second_level_is_refused_under_an_aarch64_guest() {
    let (_, r0, r1) = layout();
    let w = Walker::new(regs(r0, r1, 0)).unwrap();
    let err = w
        .with_second_level(pagefold::paging::SecondLevel::Ept(
            pagefold::paging::EptConfig {
                eptp: 0x1000 | 3 << 3 | 6,
                execute_only: false,
                mode_based_execute: false,
                maxphyaddr: 48,
            },
        ))
        .unwrap_err();
    assert!(err.to_string().contains("EPT"), "{err}");
}

/// FEAT_PAN3: with SCTLR_EL1.EPAN, PAN also denies EL1 data accesses to an
/// execute-only EL0 page (AP = 00, UXN clear), which plain PAN allows; the
/// cache re-checks when EPAN changes.
#[test]
fn epan_extends_pan_to_execute_only_pages() {
    let mut t = Tables::new();
    let (r0, r1) = (t.alloc(), t.alloc());
    t.map(r0, 0x50_0000, 3, 0x60_0000 | TABLE | AF | NG);
    let mut rg = regs(r0, r1, 3);
    rg.pan = true;
    let mut cache = WalkCache::new();
    let opts = WalkOptions::default();
    let va = GuestVirtAddr(0x50_0010);
    let plain = Walker::new(rg).unwrap();
    rg.sctlr |= pagefold::paging::aarch64::regs::SCTLR_EPAN;
    let epan = Walker::new(rg).unwrap();
    for _ in 0..2 {
        assert!(plain
            .translate_with(&t.mem, va, Access::read(), opts, Some(&mut cache))
            .is_ok());
        let f = epan
            .translate_with(&t.mem, va, Access::read(), opts, Some(&mut cache))
            .unwrap_err();
        let FaultCode::Aarch64Abort { esr } = f.code else {
            panic!("{f:?}")
        };
        assert_eq!(esr & 0x3f, 0b00_1111, "permission fault, level 3");
        // EL0 still executes it; EL1 fetches are not PAN's business.
        assert!(epan
            .translate_with(&t.mem, va, Access::fetch().user(), opts, Some(&mut cache))
            .is_ok());
    }
}

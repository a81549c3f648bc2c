//! The AArch64 stage-1 walker (`Aarch64Walker`) on hand-built tables in a
//! real `GuestMemory`: every granule and start level, both TTBRs, blocks
//! where each granule allows them, every fault kind with its fault status
//! code and level, the permission matrix (EL0/EL1 by read/write/fetch by
//! AP, UXN, PXN, the table bits, PAN and WXN), the access flag and DBM with
//! TCR_EL1.HA/HD on and off, MAIR attributes, 52-bit addresses (FEAT_LPA
//! with 64 KiB, FEAT_LPA2 with 4 KiB from level -1 and with 16 KiB); then a
//! property test against a small reference model written here from the Arm
//! ARM, on random (garbage) tables, with and without 52-bit layouts.

// Test code: table fields are built from small known values.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold::paging::{
    aarch64::regs::{
        SCTLR_M, SCTLR_WXN, TCR_DS, TCR_EPD0, TCR_EPD1, TCR_HA, TCR_HD, TCR_HPD0, TCR_TBI0,
        TCR_TBID0,
    },
    Aarch64Fault, Aarch64FaultKind, Aarch64Paging, Aarch64Stage2, Aarch64Stage2Walker,
    Aarch64Walker, Access, AccessKind, Granule, Privilege, Stage2Access, Ttbr, WalkOptions,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};
use proptest::{prelude::*, test_runner::Config as ProptestConfig};

const MEM: u64 = 8 << 20;

/// Descriptor bits used by the tests.
const VALID: u64 = 1;
const TABLE: u64 = 3; // also a level-3 page
const BLOCK: u64 = 1;
const AP1: u64 = 1 << 6;
const AP2: u64 = 1 << 7;
const AF: u64 = 1 << 10;
const DBM: u64 = 1 << 51;
const CONT: u64 = 1 << 52;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
const PXN_T: u64 = 1 << 59;
const UXN_T: u64 = 1 << 60;
const APT0: u64 = 1 << 61;
const APT1: u64 = 1 << 62;

fn gshift(g: Granule) -> u32 {
    g.shift()
}

/// Bit position of the lowest VA bit a level indexes.
fn lshift(g: Granule, level: i8) -> u32 {
    gshift(g) + (gshift(g) - 3) * (3 - level) as u32
}

/// Hand-built tables for one granule: a bump allocator of granule-sized
/// tables from 64 KiB up.
struct Tables {
    mem: GuestMemory,
    g: Granule,
    next: u64,
}

impl Tables {
    fn new(g: Granule) -> Self {
        Tables {
            mem: GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap(),
            g,
            next: 0x1_0000,
        }
    }

    fn alloc(&mut self) -> u64 {
        let t = self.next;
        self.next += 1 << gshift(self.g);
        t
    }

    fn read(&self, pa: u64) -> u64 {
        self.mem.read_obj(GuestPhysAddr(pa)).unwrap()
    }

    fn write(&self, pa: u64, v: u64) {
        self.mem.write_obj(GuestPhysAddr(pa), v).unwrap();
    }

    fn index(&self, txsz: u8, start: i8, level: i8, va: u64) -> u64 {
        let entries = if level == start {
            1u64 << (64 - u32::from(txsz) - lshift(self.g, level))
        } else {
            1u64 << (gshift(self.g) - 3)
        };
        (va >> lshift(self.g, level)) & (entries - 1)
    }

    /// Maps `va` with `leaf` at `level` under `root` (start level from
    /// `txsz`), making tables with `table_bits` on the way; returns the
    /// leaf's address.
    fn map(&mut self, root: u64, txsz: u8, va: u64, level: i8, leaf: u64, table_bits: u64) -> u64 {
        let start = self.g.start_level(txsz);
        let mut table = root;
        for l in start..level {
            let at = table + 8 * self.index(txsz, start, l, va);
            let e = self.read(at);
            table = if e & 3 == 3 {
                e & 0x0000_ffff_ffff_f000 & !((1 << gshift(self.g)) - 1)
            } else {
                let t = self.alloc();
                self.write(at, t | TABLE | table_bits);
                t
            };
        }
        let at = table + 8 * self.index(txsz, start, level, va);
        self.write(at, leaf);
        at
    }
}

fn tcr(g: Granule, t0sz: u8, t1sz: u8, ips: u64) -> u64 {
    u64::from(t0sz) | (g.tg0() << 14) | (u64::from(t1sz) << 16) | (g.tg1() << 30) | (ips << 32)
}

fn regs(g: Granule, t0sz: u8, t1sz: u8, root0: u64, root1: u64) -> Aarch64Paging {
    Aarch64Paging {
        tcr: tcr(g, t0sz, t1sz, 0b101),
        ttbr0: root0,
        ttbr1: root1,
        sctlr: SCTLR_M,
        mair: 0x0011_2233_4455_66ff,
        pan: false,
        pa_bits: 48,
        lva: false,
        lpa2: false,
    }
}

fn acc(kind: AccessKind, el0: bool) -> Access {
    Access::new(
        kind,
        if el0 {
            Privilege::User
        } else {
            Privilege::Supervisor
        },
    )
}

fn va1(txsz: u8, low: u64) -> u64 {
    // The TTBR1 range: the top 64 - txsz bits set.
    (u64::MAX << (64 - txsz)) | low
}

/// Every granule with every start level its TxSZ range allows, both
/// TTBRs: a page maps, with one reference per level.
#[test]
fn every_granule_and_start_level_both_ttbrs() {
    for (g, txszs) in [
        (Granule::K4, &[16u8, 25, 34, 39][..]),
        (Granule::K16, &[16, 17, 28, 39][..]),
        (Granule::K64, &[16, 22, 35, 39][..]),
    ] {
        for &txsz in txszs {
            let mut t = Tables::new(g);
            let (r0, r1) = (t.alloc(), t.alloc());
            let page = 1u64 << gshift(g);
            let low = (0x1234_5678_9abc_u64 & ((1u64 << (64 - txsz)) - 1)) & !(page - 1);
            let leaf = 0x40_0000_0000 | TABLE | AF | AP1;
            t.map(r0, txsz, low, 3, leaf, 0);
            t.map(r1, txsz, va1(txsz, low), 3, leaf + page, 0);
            let w = Aarch64Walker::new(regs(g, txsz, txsz, r0, r1)).unwrap();
            let levels = (4 - g.start_level(txsz)) as u32;
            for (va, ttbr, pa) in [
                (low + 0x10, Ttbr::Ttbr0, 0x40_0000_0010),
                (va1(txsz, low) + 0x10, Ttbr::Ttbr1, 0x40_0000_0010 + page),
            ] {
                let tr = w
                    .translate(&t.mem, GuestVirtAddr(va), Access::read())
                    .unwrap_or_else(|e| panic!("{g:?} txsz {txsz}: {e}"));
                assert_eq!(tr.pa, GuestPhysAddr(pa), "{g:?} txsz {txsz}");
                assert_eq!(tr.page_size, page);
                assert_eq!(tr.level, Some(3));
                assert_eq!(tr.ttbr, Some(ttbr));
                assert_eq!(tr.memory_refs, levels, "{g:?} txsz {txsz}");
            }
            // The neighbour page is unmapped: a translation fault at level 3.
            let f = w
                .translate(&t.mem, GuestVirtAddr(low + page), Access::read())
                .unwrap_err();
            assert_eq!(
                (f.kind, f.level, f.fsc()),
                (Aarch64FaultKind::Translation, 3, Some(0b00_0111))
            );
        }
    }
}

/// Blocks at every level a granule allows; a block encoding where none is
/// allowed and level-3 0b01 are translation faults at that level.
#[test]
fn blocks_where_allowed_and_faults_elsewhere() {
    for (g, ok, bad) in [
        (Granule::K4, &[1i8, 2][..], &[0i8][..]),
        (Granule::K16, &[2], &[0, 1]),
        (Granule::K64, &[2], &[1]),
    ] {
        for &level in ok {
            let mut t = Tables::new(g);
            let r = t.alloc();
            let size = 1u64 << lshift(g, level);
            let va = 3 * size;
            t.map(r, 16, va, level, (5 * size) | BLOCK | AF | CONT, 0);
            let w = Aarch64Walker::new(regs(g, 16, 16, r, r)).unwrap();
            let tr = w
                .translate(&t.mem, GuestVirtAddr(va + size - 8), Access::read())
                .unwrap();
            assert_eq!(tr.pa, GuestPhysAddr(6 * size - 8), "{g:?} level {level}");
            assert_eq!((tr.page_size, tr.level), (size, Some(level)));
            assert!(tr.attributes.contiguous);
        }
        for &level in bad {
            let mut t = Tables::new(g);
            let r = t.alloc();
            let va = 1u64 << lshift(g, level);
            let at = t.map(r, 16, va, level, BLOCK | AF, 0);
            let w = Aarch64Walker::new(regs(g, 16, 16, r, r)).unwrap();
            let f = w
                .translate(&t.mem, GuestVirtAddr(va), Access::read())
                .unwrap_err();
            assert_eq!((f.kind, f.level), (Aarch64FaultKind::Translation, level));
            assert_eq!(f.entry_addr, Some(GuestPhysAddr(at)));
        }
        // Level 3, 0b01: reserved.
        let mut t = Tables::new(g);
        let r = t.alloc();
        t.map(r, 16, 0, 3, 0x10_0000 | VALID | AF, 0);
        let w = Aarch64Walker::new(regs(g, 16, 16, r, r)).unwrap();
        let f = w
            .translate(&t.mem, GuestVirtAddr(0), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.fsc()),
            (Aarch64FaultKind::Translation, 3, Some(7))
        );
    }
}

/// Addresses in neither range, and ranges EPDn disables, fault at level 0
/// without reading a table; TBI ignores the top byte for data (and, with
/// TBID, not for fetches).
#[test]
fn ranges_epd_and_tbi() {
    let mut t = Tables::new(Granule::K4);
    let (r0, r1) = (t.alloc(), t.alloc());
    t.map(r0, 25, 0x1000, 3, 0x9000 | TABLE | AF, 0);
    t.map(r1, 25, va1(25, 0x1000), 3, 0xa000 | TABLE | AF, 0);
    let mut rg = regs(Granule::K4, 25, 25, r0, r1);
    let w = Aarch64Walker::new(rg).unwrap();
    for va in [
        1u64 << 39,
        1 << 55,
        0x8000_0000_0000_1000,
        0xffff_ff00_0000_1000 & !(1 << 55),
    ] {
        let f = w
            .translate(&t.mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.entry),
            (Aarch64FaultKind::Translation, 0, None),
            "{va:#x}"
        );
    }
    assert!(w
        .translate(&t.mem, GuestVirtAddr(va1(25, 0x1000)), Access::read())
        .is_ok());
    // Tagged pointers.
    let tagged = 0x5a00_0000_0000_1000;
    assert!(w
        .translate(&t.mem, GuestVirtAddr(tagged), Access::read())
        .is_err());
    rg.tcr |= TCR_TBI0;
    let w = Aarch64Walker::new(rg).unwrap();
    assert_eq!(
        w.translate(&t.mem, GuestVirtAddr(tagged), Access::fetch())
            .unwrap()
            .pa,
        GuestPhysAddr(0x9000)
    );
    rg.tcr |= TCR_TBID0;
    let w = Aarch64Walker::new(rg).unwrap();
    assert!(w
        .translate(&t.mem, GuestVirtAddr(tagged), Access::read())
        .is_ok());
    let f = w
        .translate(&t.mem, GuestVirtAddr(tagged), Access::fetch())
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::Translation, 0));
    // EPD0 / EPD1.
    for (epd, va, ttbr) in [
        (TCR_EPD0, 0x1000, Ttbr::Ttbr0),
        (TCR_EPD1, va1(25, 0x1000), Ttbr::Ttbr1),
    ] {
        let mut r = regs(Granule::K4, 25, 25, r0, r1);
        r.tcr |= epd;
        let w = Aarch64Walker::new(r).unwrap();
        let f = w
            .translate(&t.mem, GuestVirtAddr(va), Access::read())
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.ttbr),
            (Aarch64FaultKind::Translation, 0, Some(ttbr))
        );
        assert_eq!(f.fsc(), Some(0b00_0100));
    }
    // MMU off: flat, with the PA size checked.
    let mut r = regs(Granule::K4, 25, 25, r0, r1);
    r.sctlr = 0;
    let w = Aarch64Walker::new(r).unwrap();
    assert_eq!(
        w.translate(&t.mem, GuestVirtAddr(0x1234), Access::write())
            .unwrap()
            .pa,
        GuestPhysAddr(0x1234)
    );
    let f = w
        .translate(&t.mem, GuestVirtAddr(1 << 48), Access::read())
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::AddressSize, 0));
}

/// Invalid descriptors at each level, address size faults for a TTBR, a
/// table and a leaf, tables outside memory.
#[test]
fn fault_kinds_codes_and_levels() {
    let g = Granule::K4;
    // Invalid at each level.
    for level in 0..=3i8 {
        let mut t = Tables::new(g);
        let r = t.alloc();
        let va = 0x0000_1234_5678_9000;
        t.map(r, 16, va, 3, 0x5000 | TABLE | AF, 0);
        // Knock out the entry at `level`.
        let mut table = r;
        for l in 0..level {
            table = t.read(table + 8 * t.index(16, 0, l, va)) & 0xffff_ffff_f000;
        }
        let at = table + 8 * t.index(16, 0, level, va);
        t.write(at, 0xdead_0000 & !1);
        let w = Aarch64Walker::new(regs(g, 16, 16, r, r)).unwrap();
        let f = w
            .translate(&t.mem, GuestVirtAddr(va), Access::write())
            .unwrap_err();
        assert_eq!((f.kind, f.level), (Aarch64FaultKind::Translation, level));
        assert_eq!(f.fsc(), Some(0b00_0100 | level as u8));
        assert_eq!(
            (f.entry_addr, f.entry),
            (Some(GuestPhysAddr(at)), Some(0xdead_0000))
        );
        // EL1 data abort, same EL, WnR.
        assert_eq!(
            f.esr_el1(),
            Some(0x25 << 26 | 1 << 25 | 1 << 6 | (4 | level as u64))
        );
    }
    // IPS = 32 bits: a table above 4 GiB, a leaf output above, a TTBR above.
    let mut t = Tables::new(g);
    let r = t.alloc();
    let leaf_at = t.map(r, 16, 0x4000, 3, (1u64 << 40) | TABLE | AF, 0);
    let mut rg = regs(g, 16, 16, r, r);
    rg.tcr = tcr(g, 16, 16, 0);
    let w = Aarch64Walker::new(rg).unwrap();
    let f = w
        .translate(&t.mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.fsc()),
        (Aarch64FaultKind::AddressSize, 3, Some(3))
    );
    assert_eq!(f.entry_addr, Some(GuestPhysAddr(leaf_at)));
    // The same tables with 48-bit IPS translate.
    let w48 = Aarch64Walker::new(regs(g, 16, 16, r, r)).unwrap();
    assert_eq!(
        w48.translate(&t.mem, GuestVirtAddr(0x4000), Access::read())
            .unwrap()
            .pa,
        GuestPhysAddr(1 << 40)
    );
    // A level-1 table pointer above 4 GiB.
    let l0 = t.read(r);
    let l1 = l0 & 0xffff_ffff_f000;
    t.write(l1, t.read(l1) | (1 << 36));
    let f = w
        .translate(&t.mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.fsc()),
        (Aarch64FaultKind::AddressSize, 1, Some(1))
    );
    // IPS larger than the implemented PA size behaves as the PA size.
    let mut rp = regs(g, 16, 16, r, r);
    rp.pa_bits = 36;
    let f = Aarch64Walker::new(rp)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::AddressSize, 1));
    // A TTBR above the OA size: level 0, no table read.
    let mut rt = rg;
    rt.ttbr0 = 1 << 33;
    let f = Aarch64Walker::new(rt)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.entry),
        (Aarch64FaultKind::AddressSize, 0, None)
    );
    // A table outside memory: no architectural code.
    let mut t = Tables::new(g);
    let r = t.alloc();
    t.write(r, (1u64 << 40) | TABLE);
    let w = Aarch64Walker::new(regs(g, 16, 16, r, r)).unwrap();
    let f = w
        .translate(&t.mem, GuestVirtAddr(0x4000), Access::read())
        .unwrap_err();
    assert!(matches!(f.kind, Aarch64FaultKind::Unbacked { .. }));
    assert_eq!((f.level, f.fsc(), f.esr_el1()), (1, None, None));
}

fn fault_of(
    r: Result<pagefold::paging::Aarch64Translation, Aarch64Fault>,
) -> Option<(Aarch64FaultKind, i8)> {
    r.err().map(|f| (f.kind, f.level))
}

/// The permission matrix: the architecture's AP[2:1] table (EL1 RW/--,
/// RW/RW, R-/--, R-/R-), UXN, PXN, "EL0-writable is never EL1-executable",
/// WXN and PAN, each for EL0 and EL1 by read, write and fetch.
#[test]
fn permission_matrix() {
    // (AP[2:1], EL1 read, EL1 write, EL0 read, EL0 write)
    let ap_table = [
        (0b00u64, true, true, false, false),
        (0b01, true, true, true, true),
        (0b10, true, false, false, false),
        (0b11, true, false, true, false),
    ];
    let mut t = Tables::new(Granule::K4);
    let r = t.alloc();
    let mut n = 0u64;
    for (ap, p_r, p_w, u_r, u_w) in ap_table {
        for (uxn, pxn) in [(false, false), (true, false), (false, true), (true, true)] {
            for (wxn, pan) in [(false, false), (true, false), (false, true), (true, true)] {
                n += 1;
                let va = n << 12;
                let leaf = 0x80_0000
                    | TABLE
                    | AF
                    | (ap << 6)
                    | if uxn { UXN } else { 0 }
                    | if pxn { PXN } else { 0 };
                t.map(r, 16, va, 3, leaf, 0);
                let mut rg = regs(Granule::K4, 16, 16, r, r);
                if wxn {
                    rg.sctlr |= SCTLR_WXN;
                }
                rg.pan = pan;
                let w = Aarch64Walker::new(rg).unwrap();
                let p_x = !(pxn || u_w || (wxn && p_w));
                let u_x = !(uxn || (wxn && u_w));
                let p_data = !(pan && u_r);
                for (kind, el0, want) in [
                    (AccessKind::Read, false, p_r && p_data),
                    (AccessKind::Write, false, p_w && p_data),
                    (AccessKind::Fetch, false, p_x),
                    (AccessKind::Read, true, u_r),
                    (AccessKind::Write, true, u_w),
                    (AccessKind::Fetch, true, u_x),
                ] {
                    let got = w.translate(&t.mem, GuestVirtAddr(va), acc(kind, el0));
                    let ctx = format!(
                        "ap {ap:#b} uxn {uxn} pxn {pxn} wxn {wxn} pan {pan} {kind:?} el0 {el0}"
                    );
                    if want {
                        let tr = got.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                        // Reported permissions agree (PAN is not folded in).
                        let p = tr.permissions;
                        assert_eq!(
                            (p.write, p.user, p.execute, p.user_execute),
                            (p_w, u_r, p_x, u_x),
                            "{ctx}"
                        );
                    } else {
                        let f = got.unwrap_err();
                        assert_eq!(
                            (f.kind, f.level, f.fsc()),
                            (Aarch64FaultKind::Permission, 3, Some(0b00_1111)),
                            "{ctx}"
                        );
                        let ec = match kind {
                            AccessKind::Fetch => 0x20,
                            _ => 0x24,
                        } | u64::from(!el0);
                        assert_eq!(f.esr_el1().unwrap() >> 26, ec, "{ctx}");
                        assert_eq!(f.el0(), el0);
                    }
                }
            }
        }
    }
}

/// APTable, UXNTable, PXNTable restrict every level below, and HPD turns
/// them off; the fault is reported at the leaf's level.
#[test]
fn hierarchical_permissions() {
    let mut t = Tables::new(Granule::K4);
    let r = t.alloc();
    let leaf = 0x80_0000 | TABLE | AF | AP1; // EL1 RW, EL0 RW, executable at EL0
    let cases = [
        // EL0 loses read and write, not execute (execute-only stays
        // possible), and no longer writing, the page is EL1-executable.
        (APT0, [true, true, true, false, false, true]),
        (APT1, [true, false, true, true, false, true]),
        (UXN_T, [true, true, false, true, true, false]),
        (PXN_T, [true, true, false, true, true, true]),
        (APT0 | APT1, [true, false, true, false, false, true]),
    ];
    for (i, (bits, want)) in cases.into_iter().enumerate() {
        // A 2 MiB block per case, under its own level-1 table with `bits`
        // on the level-0 descriptor... so give each case its own 512 GiB.
        let va = (i as u64 + 1) << 39;
        t.map(r, 16, va, 3, leaf, bits);
        for hpd in [false, true] {
            let mut rg = regs(Granule::K4, 16, 16, r, r);
            if hpd {
                rg.tcr |= TCR_HPD0;
            }
            let w = Aarch64Walker::new(rg).unwrap();
            let kinds = [
                (AccessKind::Read, false),
                (AccessKind::Write, false),
                (AccessKind::Fetch, false),
                (AccessKind::Read, true),
                (AccessKind::Write, true),
                (AccessKind::Fetch, true),
            ];
            for (k, (kind, el0)) in kinds.into_iter().enumerate() {
                // Without hierarchy: AP=01 is RW for both, EL1 never
                // executes an EL0-writable page.
                let expect = if hpd {
                    [true, true, false, true, true, true][k]
                } else {
                    want[k]
                };
                let got = fault_of(w.translate(&t.mem, GuestVirtAddr(va), acc(kind, el0)));
                let want_fault = if expect {
                    None
                } else {
                    Some((Aarch64FaultKind::Permission, 3))
                };
                assert_eq!(
                    got, want_fault,
                    "bits {bits:#x} hpd {hpd} {kind:?} el0 {el0}"
                );
            }
        }
    }
}

/// The access flag: a fault without HA (before a permission fault), set
/// by the walk with HA when asked; DBM: a write to a writable-clean page
/// with HD clears AP[2]; HD without HA, or no DBM, is a permission fault.
#[test]
fn access_flag_and_dirty_state() {
    let g = Granule::K16;
    let mut t = Tables::new(g);
    let r = t.alloc();
    let va = 0x4000;
    // EL1 read-only, no AF, DBM.
    let leaf = 0x100_0000 | TABLE | AP2 | DBM;
    let at = t.map(r, 16, va, 3, leaf, 0);
    let base = regs(g, 16, 16, r, r);
    let set = WalkOptions {
        set_accessed_dirty: true,
    };

    // No HA: access flag fault, even for a write the page forbids.
    let w = Aarch64Walker::new(base).unwrap();
    for a in [Access::read(), Access::write(), Access::fetch().user()] {
        let f = w
            .translate_with(&t.mem, GuestVirtAddr(va), a, set)
            .unwrap_err();
        assert_eq!(
            (f.kind, f.level, f.fsc()),
            (Aarch64FaultKind::AccessFlag, 3, Some(0b00_1011))
        );
    }
    assert_eq!(t.read(at), leaf, "a faulting walk writes nothing");

    // HD without HA does nothing: still an access flag fault.
    let mut hd_only = base;
    hd_only.tcr |= TCR_HD;
    let f = Aarch64Walker::new(hd_only)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert_eq!(f.kind, Aarch64FaultKind::AccessFlag);

    // HA: a read succeeds; without set_accessed_dirty nothing is written,
    // with it AF is set.
    let mut ha = base;
    ha.tcr |= TCR_HA;
    let w = Aarch64Walker::new(ha).unwrap();
    let tr = w
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap();
    assert!(!tr.attributes.accessed);
    assert_eq!(t.read(at), leaf);
    let tr = w
        .translate_with(&t.mem, GuestVirtAddr(va), Access::read(), set)
        .unwrap();
    assert!(tr.attributes.accessed);
    assert_eq!(t.read(at), leaf | AF);
    // A write without HD: permission fault, AP[2] kept.
    let f = w
        .translate_with(&t.mem, GuestVirtAddr(va), Access::write(), set)
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::Permission, 3));
    assert_eq!(t.read(at), leaf | AF);

    // HA + HD: the write is allowed and clears AP[2].
    let mut hd = ha;
    hd.tcr |= TCR_HD;
    let w = Aarch64Walker::new(hd).unwrap();
    let tr = w
        .translate(&t.mem, GuestVirtAddr(va), Access::write())
        .unwrap();
    assert_eq!(
        tr.attributes.ap, 0b10,
        "not updated without set_accessed_dirty"
    );
    let tr = w
        .translate_with(&t.mem, GuestVirtAddr(va), Access::write(), set)
        .unwrap();
    assert_eq!(tr.attributes.ap, 0b00);
    assert_eq!(t.read(at), (leaf | AF) & !AP2);
    assert_eq!(tr.memory_refs, 4 + 1, "four reads and one exchange");
    // An EL0 write to an EL1-only DBM page still faults, and changes nothing.
    t.write(at, leaf | AF);
    let f = w
        .translate_with(&t.mem, GuestVirtAddr(va), Access::write().user(), set)
        .unwrap_err();
    assert_eq!(f.kind, Aarch64FaultKind::Permission);
    assert_eq!(t.read(at), leaf | AF);
    // Without DBM, HD does not make the page writable.
    t.write(at, (leaf | AF) & !DBM);
    let f = w
        .translate_with(&t.mem, GuestVirtAddr(va), Access::write(), set)
        .unwrap_err();
    assert_eq!(f.kind, Aarch64FaultKind::Permission);
}

/// MAIR attribute bytes, shareability, nG and the ASID.
#[test]
fn attributes_and_asid() {
    let mut t = Tables::new(Granule::K64);
    let r = t.alloc();
    for idx in 0..8u64 {
        t.map(
            r,
            16,
            idx << 16,
            3,
            (0x100_0000 + (idx << 16)) | TABLE | AF | (idx << 2) | (3 << 8) | (1 << 11),
            0,
        );
    }
    let mut rg = regs(Granule::K64, 16, 16, r | (0x42 << 48), r);
    rg.mair = 0x0706_0504_0302_01ff;
    let w = Aarch64Walker::new(rg).unwrap();
    assert_eq!(w.asid(), 0x42);
    for idx in 0..8u8 {
        let tr = w
            .translate(&t.mem, GuestVirtAddr(u64::from(idx) << 16), Access::read())
            .unwrap();
        let a = tr.attributes;
        assert_eq!(
            (a.attr_index, a.memory_attr),
            (idx, rg.mair.to_le_bytes()[usize::from(idx)])
        );
        assert_eq!((a.shareability, a.not_global), (3, true));
    }
}

// ---------------------------------------------------------------------------
// The reference model: written from the Arm ARM's rules, sharing nothing
// with the walker but the memory.

#[derive(Clone, Copy, Debug)]
struct Model {
    g: u32, // granule shift
    txsz: [u32; 2],
    root: [u64; 2],
    oa: u32,
    ha: bool,
    hd: bool,
    wxn: bool,
    pan: bool,
    /// TCR_EL1.DS in effect (4/16 KiB): `OA[51:50]` in bits 9:8, address
    /// bits up to 49, blocks one level higher.
    ds: bool,
    /// A 52-bit PA with 64 KiB: `OA[51:48]` in bits 15:12, level-1 blocks.
    lpa: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    Ok { pa: u64, level: i8, refs: u32 },
    Fault { kind: &'static str, level: i8 },
}

fn model(m: &Model, mem: &GuestMemory, va: u64, kind: AccessKind, el0: bool) -> Out {
    let fault = |kind, level| Out::Fault { kind, level };
    let hi = (va >> 55) & 1 == 1;
    let r = usize::from(hi);
    let ia = 64 - m.txsz[r];
    // Every bit from `ia` up equals bit 55.
    let top = va >> ia;
    let all = u64::MAX >> ia;
    if (hi && top != all) || (!hi && top != 0) {
        return fault("translation", 0);
    }
    if m.root[r] >> m.oa != 0 {
        return fault("address size", 0);
    }
    let stride = m.g - 3;
    // Levels needed for `ia - g` bits.
    let mut levels = 0;
    while m.g + stride * levels < ia {
        levels += 1;
    }
    let start = 4 - levels as i8;
    let (mut no_el0, mut no_w, mut uxn_t, mut pxn_t) = (false, false, false, false);
    let mut table = m.root[r];
    for (refs, level) in (1u32..).zip(start..=3i8) {
        let sh = m.g + stride * (3 - level) as u32;
        let width = if level == start { ia - sh } else { stride };
        let idx = (va >> sh) & ((1u64 << width) - 1);
        let Ok(d) = mem.read_obj::<u64>(GuestPhysAddr(table + idx * 8)) else {
            return fault("unbacked", level);
        };
        let field = |lo: u32, hi: u32| d & ((1u64 << (hi + 1)) - 1) & !((1u64 << lo) - 1);
        let addr_bits = |lo: u32| {
            if m.ds {
                field(lo, 49) | (((d >> 8) & 3) << 50)
            } else if m.lpa {
                field(lo, 47) | (((d >> 12) & 0xf) << 48)
            } else {
                field(lo, 47)
            }
        };
        let too_wide = addr_bits(m.g) >> m.oa != 0;
        let is_table = d & 3 == 3 && level < 3;
        let is_page = d & 3 == 3 && level == 3;
        let block_ok = match m.g {
            12 => level == 1 || level == 2 || (level == 0 && m.ds),
            14 => level == 2 || (level == 1 && m.ds),
            _ => level == 2 || (level == 1 && m.lpa),
        };
        let is_block = d & 3 == 1 && level < 3 && block_ok;
        if is_table {
            if too_wide {
                return fault("address size", level);
            }
            no_el0 |= d & APT0 != 0;
            no_w |= d & APT1 != 0;
            uxn_t |= d & UXN_T != 0;
            pxn_t |= d & PXN_T != 0;
            table = addr_bits(m.g);
            continue;
        }
        if !is_page && !is_block {
            return fault("translation", level);
        }
        if too_wide {
            return fault("address size", level);
        }
        if d & AF == 0 && !m.ha {
            return fault("access flag", level);
        }
        // AP[2:1] -> (EL1 write, EL0 read, EL0 write), then the tables.
        let write = kind == AccessKind::Write;
        let mut ap = (d >> 6) & 3;
        if write && m.hd && d & DBM != 0 {
            ap &= 0b01;
        }
        let (mut pw, mut ur, mut uw) = match ap {
            0b00 => (true, false, false),
            0b01 => (true, true, true),
            0b10 => (false, false, false),
            _ => (false, true, false),
        };
        if no_el0 {
            ur = false;
            uw = false;
        }
        if no_w {
            pw = false;
            uw = false;
        }
        let px = !(d & PXN != 0 || pxn_t || uw || (m.wxn && pw));
        let ux = !(d & UXN != 0 || uxn_t || (m.wxn && uw));
        let ok = match (kind, el0) {
            (AccessKind::Read, true) => ur,
            (AccessKind::Write, true) => uw,
            (AccessKind::Fetch, true) => ux,
            (AccessKind::Fetch, false) => px,
            (AccessKind::Read, false) => !(m.pan && ur),
            (AccessKind::Write, false) => pw && !(m.pan && ur),
        };
        if !ok {
            return fault("permission", level);
        }
        return Out::Ok {
            pa: addr_bits(sh) | (va & ((1u64 << sh) - 1)),
            level,
            refs,
        };
    }
    unreachable!("level 3 is always a leaf or a fault")
}

fn walker_out(w: &Aarch64Walker, mem: &GuestMemory, va: u64, kind: AccessKind, el0: bool) -> Out {
    match w.translate(mem, GuestVirtAddr(va), acc(kind, el0)) {
        Ok(t) => Out::Ok {
            pa: t.pa.0,
            level: t.level.unwrap(),
            refs: t.memory_refs,
        },
        Err(f) => Out::Fault {
            kind: match f.kind {
                Aarch64FaultKind::Translation => "translation",
                Aarch64FaultKind::AccessFlag => "access flag",
                Aarch64FaultKind::Permission => "permission",
                Aarch64FaultKind::AddressSize => "address size",
                Aarch64FaultKind::Unbacked { .. } => "unbacked",
                Aarch64FaultKind::ReadOnlyTable => "read-only",
                Aarch64FaultKind::Contended => "contended",
            },
            level: f.level,
        },
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

proptest! {
    #![proptest_config(config(48))]

    /// Random tables (pointers into a pool of tables, so loops and shared
    /// tables occur, and out of memory; random descriptor types,
    /// permission bits, AF, DBM and output addresses, some above the OA
    /// size, random bits where 52-bit layouts keep address bits), random
    /// registers (half of them with a 52-bit PA, FEAT_LVA and TCR_EL1.DS,
    /// so 52-bit VAs, level -1 and the 52-bit TTBR layout) and probes: the
    /// walker agrees with the model on every address, access and
    /// privilege, and never panics.
    #[test]
    fn walker_matches_model(seed in 1u64.., gsel in 0u8..3, t0 in 12u8..=39, t1 in 12u8..=39,
                            flags in 0u8..32, ips in prop::sample::select(vec![0u64, 2, 5, 6]),
                            wide in any::<bool>()) {
        let g = [Granule::K4, Granule::K16, Granule::K64][usize::from(gsel)];
        let (t0, t1) = if wide { (t0, t1) } else { (t0.max(16), t1.max(16)) };
        let gs = g.shift();
        let mut rng = Rng(seed);
        let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
        let pool: Vec<u64> = (1..=6u64).map(|i| i << gs).collect();
        let entries = 1u64 << (gs - 3);
        let bits_pool = [AP1, AP2, AF, DBM, PXN, UXN, PXN_T, UXN_T, APT0, APT1, CONT,
                         1 << 8, 1 << 9, 1 << 13, 1 << 48, 1 << 49];
        for &tbl in &pool {
            for i in 0..entries {
                let mut d = match rng.below(8) {
                    0 => rng.next() & !1,                         // invalid, garbage
                    1 => (1u64 << 40) | 3,                        // a table out of memory
                    2 | 3 => pool[rng.below(6) as usize] | 3,     // table / page
                    4 => (rng.below(1 << 20) << 28) | 1,          // block / reserved
                    _ => (rng.below(1 << 36) << 12) | 3,          // page, random OA
                };
                for b in bits_pool {
                    if rng.below(3) == 0 {
                        d |= b;
                    }
                }
                mem.write_obj(GuestPhysAddr(tbl + i * 8), d).unwrap();
            }
        }
        let (ha, hd, wxn, pan) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0, flags & 8 != 0);
        let mut ttbr = || {
            let base = pool[rng.below(6) as usize];
            // BADDR[51:48] in bits 5:2 (52-bit layout), sometimes.
            if wide && rng.below(4) == 0 { base | (rng.below(16) << 2) } else { base }
        };
        let (r0, r1) = (ttbr(), ttbr());
        let mut tcr = tcr(g, t0, t1, ips);
        if ha { tcr |= TCR_HA; }
        if hd { tcr |= TCR_HD; }
        if wide { tcr |= TCR_DS; }
        let regs = Aarch64Paging {
            tcr,
            ttbr0: r0,
            ttbr1: r1,
            sctlr: SCTLR_M | if wxn { SCTLR_WXN } else { 0 },
            mair: 0,
            pan,
            pa_bits: if wide { 52 } else { 48 },
            lva: wide,
            lpa2: wide,
        };
        let w = Aarch64Walker::new(regs).unwrap();
        let oa = match (ips, wide) { (0, _) => 32, (2, _) => 40, (6, true) => 52, _ => 48 };
        // With DS every base register has the 52-bit layout.
        let root = |v: u64| if wide {
            (v & 0x0000_ffff_ffff_ffc0) | (((v >> 2) & 0xf) << 48)
        } else {
            v & 0x0000_ffff_ffff_fffe
        };
        let m = Model {
            g: gs, txsz: [u32::from(t0), u32::from(t1)], root: [root(r0), root(r1)], oa, ha,
            hd: hd && ha, wxn, pan, ds: wide && g != Granule::K64, lpa: wide && g == Granule::K64,
        };
        for _ in 0..256 {
            let mut va = rng.next();
            match rng.below(4) {
                // In the TTBR0 range / the TTBR1 range / random.
                0 | 1 => va &= (1u64 << (64 - t0)) - 1,
                2 => va |= u64::MAX << (64 - t1),
                _ => {}
            }
            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                for el0 in [false, true] {
                    let want = model(&m, &mem, va, kind, el0);
                    let got = walker_out(&w, &mem, va, kind, el0);
                    prop_assert_eq!(got, want, "va {:#x} {:?} el0 {}", va, kind, el0);
                }
            }
        }
    }
}

/// TTBR0 and TTBR1 with different granules and sizes (TG0 = 64 KiB with
/// 42-bit VAs, TG1 = 4 KiB with 39-bit VAs), as TCR_EL1 allows.
#[test]
fn different_granules_per_range() {
    let mut t = Tables::new(Granule::K64);
    let r0 = t.alloc();
    t.map(r0, 22, 0x3_0000, 3, 0x70_0000 | TABLE | AF, 0);
    // The 4 KiB tables share the memory, above the 64 KiB ones.
    t.g = Granule::K4;
    t.next = 0x40_0000;
    let r1 = t.alloc();
    t.map(r1, 25, va1(25, 0x20_0000), 2, 0x80_0000 | BLOCK | AF, 0);
    let mut rg = regs(Granule::K64, 22, 25, r0, r1);
    rg.tcr = (rg.tcr & !(3 << 30)) | (Granule::K4.tg1() << 30);
    let w = Aarch64Walker::new(rg).unwrap();
    let a = w
        .translate(&t.mem, GuestVirtAddr(0x3_0042), Access::read())
        .unwrap();
    assert_eq!(
        (a.pa, a.page_size, a.memory_refs),
        (GuestPhysAddr(0x70_0042), 0x1_0000, 2)
    );
    let b = w
        .translate(&t.mem, GuestVirtAddr(va1(25, 0x20_1234)), Access::read())
        .unwrap();
    assert_eq!(
        (b.pa, b.page_size, b.level),
        (GuestPhysAddr(0x80_1234), 2 << 20, Some(2))
    );
    assert_eq!(b.memory_refs, 2);
    // 42 bits for TTBR0: bit 42 set is outside both ranges.
    let f = w
        .translate(&t.mem, GuestVirtAddr(1 << 42), Access::read())
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::Translation, 0));
}

/// An access flag update into a read-only image is refused without an
/// architectural code; a walk that needs no update reads it fine.
#[test]
fn read_only_image_refuses_updates() {
    let mut t = Tables::new(Granule::K4);
    let r = t.alloc();
    t.map(r, 16, 0x5000, 3, 0x9000 | TABLE, 0);
    t.map(r, 16, 0x6000, 3, 0xa000 | TABLE | AF, 0);
    let mut bytes = vec![0u8; 0x2_0000];
    t.mem.read(GuestPhysAddr(0), &mut bytes).unwrap();
    let image = pagefold::paging::PhysImage::new(GuestPhysAddr(0), &bytes);
    let mut rg = regs(Granule::K4, 16, 16, r, r);
    rg.tcr |= TCR_HA;
    let w = Aarch64Walker::new(rg).unwrap();
    let set = WalkOptions {
        set_accessed_dirty: true,
    };
    let f = w
        .translate_with(&image, GuestVirtAddr(0x5000), Access::read(), set)
        .unwrap_err();
    assert_eq!((f.kind, f.fsc()), (Aarch64FaultKind::ReadOnlyTable, None));
    assert_eq!(
        w.translate_with(&image, GuestVirtAddr(0x6000), Access::read(), set)
            .unwrap()
            .pa,
        GuestPhysAddr(0xa000)
    );
}

proptest! {
    #![proptest_config(config(256))]

    /// Any register values: the walker is refused with a typed error, or
    /// translates any address without panicking (garbage tables in memory).
    #[test]
    fn garbage_registers_never_panic(tcr in any::<u64>(), ttbr0 in any::<u64>(), ttbr1 in any::<u64>(),
                                     sctlr in any::<u64>(), pan in any::<bool>(), pa in 0usize..7,
                                     vas in prop::collection::vec(any::<u64>(), 16), seed in 1u64..) {
        let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)]).unwrap();
        let mut rng = Rng(seed);
        for i in 0..(1u64 << 17) {
            mem.write_obj(GuestPhysAddr(i * 8), rng.next()).unwrap();
        }
        let pa_bits = [32u8, 36, 40, 42, 44, 48, 52][pa];
        // Keep some registers plausible so walks happen: small bases, a
        // TxSZ in range half the time.
        let tcr = if seed % 2 == 0 {
            let txsz = 16 + seed % 24;
            (tcr & !(0x3f_003f | 1 << 6 | 1 << 35 | 1 << 59)) | (txsz * 0x1_0001)
        } else {
            tcr
        };
        let regs = Aarch64Paging {
            tcr,
            ttbr0: ttbr0 & 0xf_0000,
            ttbr1: ttbr1 & 0xf_0000,
            sctlr,
            mair: 0,
            pan,
            pa_bits,
            lva: seed % 3 == 0,
            lpa2: seed % 5 == 0,
        };
        if let Ok(w) = Aarch64Walker::new(regs) {
            for va in vas {
                for a in [Access::read(), Access::write().user(), Access::fetch()] {
                    let _ = w.translate(&mem, GuestVirtAddr(va), a);
                    let _ = w.translate_with(&mem, GuestVirtAddr(va), a, WalkOptions { set_accessed_dirty: true });
                }
            }
        }
    }
}

/// Registers for 52-bit addresses: a 52-bit PA (FEAT_LPA), FEAT_LVA and
/// FEAT_LPA2, IPS 52 bits, TCR_EL1.DS when `ds`.
fn regs52(g: Granule, t0sz: u8, t1sz: u8, root0: u64, root1: u64, ds: bool) -> Aarch64Paging {
    let mut r = regs(g, t0sz, t1sz, root0, root1);
    r.tcr = tcr(g, t0sz, t1sz, 0b110) | if ds { TCR_DS } else { 0 };
    r.pa_bits = 52;
    r.lva = true;
    r.lpa2 = true;
    r
}

/// FEAT_LPA with the 64 KiB granule: `OA[51:48]` in descriptor bits 15:12,
/// level-1 blocks, TTBR `BADDR[51:48]` in bits 5:2, 52-bit VAs with
/// FEAT_LVA (both ranges); under a 48-bit IPS those bits make an address
/// size fault, and without FEAT_LPA they are not address bits.
#[test]
fn lpa_64k_52_bit_output_and_input() {
    let g = Granule::K64;
    let mut t = Tables::new(g);
    let (r0, r1) = (t.alloc(), t.alloc());
    let pa = (0xcu64 << 48) | 0x1234_0000;
    let page = (pa & 0x0000_ffff_ffff_0000) | (((pa >> 48) & 0xf) << 12) | TABLE | AF;
    let va = (1u64 << 51) | 0x5_0000;
    t.map(r0, 12, va, 3, page, 0);
    t.map(r1, 12, va1(12, 0x5_0000), 3, page, 0);
    // A 4 TiB block at level 1.
    let tb = 1u64 << 42;
    let block = ((0x3u64 << 48) | (5 * tb)) & 0x0000_ffff_ffff_0000 | (0x3 << 12) | BLOCK | AF;
    t.map(r0, 12, 7 * tb, 1, block, 0);
    let w = Aarch64Walker::new(regs52(g, 12, 12, r0, r1, false)).unwrap();
    for (v, ttbr) in [(va, Ttbr::Ttbr0), (va1(12, 0x5_0000), Ttbr::Ttbr1)] {
        let tr = w
            .translate(&t.mem, GuestVirtAddr(v + 0x42), Access::read())
            .unwrap();
        assert_eq!(
            (tr.pa, tr.level, tr.ttbr, tr.memory_refs),
            (GuestPhysAddr(pa + 0x42), Some(3), Some(ttbr), 3)
        );
    }
    let tr = w
        .translate(&t.mem, GuestVirtAddr(7 * tb + 9), Access::read())
        .unwrap();
    assert_eq!(
        (tr.pa, tr.page_size, tr.level),
        (GuestPhysAddr(((0x3 << 48) | (5 * tb)) + 9), tb, Some(1))
    );
    // Without FEAT_LVA, T0SZ 12 is refused.
    let mut r = regs52(g, 12, 12, r0, r1, false);
    r.lva = false;
    assert!(Aarch64Walker::new(r).is_err());
    // IPS 48: the same page's bits 15:12 are an address size fault.
    let mut r = regs52(g, 12, 12, r0, r1, false);
    r.tcr = (r.tcr & !(7 << 32)) | (0b101 << 32);
    let f = Aarch64Walker::new(r)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.fsc()),
        (Aarch64FaultKind::AddressSize, 3, Some(3))
    );
    // No FEAT_LPA: bits 15:12 are not address bits; a level-1 block is a
    // translation fault; 48-bit VAs.
    let mut r = regs(g, 16, 16, r0, r1);
    r.tcr |= 0b110 << 32;
    let w48 = Aarch64Walker::new(r).unwrap();
    let va48 = va & ((1 << 48) - 1);
    t.map(r0, 16, va48, 3, page, 0);
    assert_eq!(
        w48.translate(&t.mem, GuestVirtAddr(va48), Access::read())
            .unwrap()
            .pa,
        GuestPhysAddr(pa & 0xffff_ffff_ffff)
    );
    let f = w48
        .translate(&t.mem, GuestVirtAddr(7 * tb), Access::read())
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::Translation, 1));
    // TTBR0 bits 5:2 are BADDR[51:48]: the table is above memory.
    let mut r = regs52(g, 12, 12, r0 | (0x1 << 2), r1, false);
    r.tcr |= TCR_EPD1;
    let f = Aarch64Walker::new(r)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert!(matches!(f.kind, Aarch64FaultKind::Unbacked { pa } if pa.0 >> 48 == 1));
    assert_eq!((f.level, f.fsc()), (1, None));
}

/// FEAT_LPA2 with the 4 KiB granule (TCR_EL1.DS): a 52-bit VA walks five
/// levels from level -1, `OA[51:50]` sits in bits 9:8 so shareability
/// comes from TCR_EL1.SH0, level-0 blocks; faults at level -1 have their
/// own status codes.
#[test]
fn lpa2_4k_level_minus_one() {
    let g = Granule::K4;
    let mut t = Tables::new(g);
    let (r0, r1) = (t.alloc(), t.alloc());
    let pa = (0x2u64 << 50) | (1 << 49) | 0x7_6000;
    let page = (pa & 0x0003_ffff_ffff_f000) | (((pa >> 50) & 3) << 8) | TABLE | AF;
    let va = (1u64 << 51) | (1 << 48) | 0x3000;
    t.map(r0, 12, va, 3, page, 0);
    let big = 1u64 << 39;
    let out = (1u64 << 50) | (6 * big);
    let block = (out & 0x0003_ffff_ffff_f000) | (((out >> 50) & 3) << 8) | BLOCK | AF;
    t.map(r0, 12, 9 * big, 0, block, 0);
    let mut rg = regs52(g, 12, 16, r0, r1, true);
    rg.tcr |= 0b11 << 12; // SH0: inner shareable
    let w = Aarch64Walker::new(rg).unwrap();
    assert!(w.tcr().ds);
    let tr = w
        .translate(&t.mem, GuestVirtAddr(va + 5), Access::read())
        .unwrap();
    assert_eq!(
        (tr.pa, tr.level, tr.memory_refs),
        (GuestPhysAddr(pa + 5), Some(3), 5)
    );
    assert_eq!(tr.attributes.shareability, 0b11);
    let tr = w
        .translate(&t.mem, GuestVirtAddr(9 * big + 5), Access::read())
        .unwrap();
    assert_eq!(
        (tr.pa, tr.page_size, tr.level, tr.memory_refs),
        (GuestPhysAddr(((1 << 50) | (6 * big)) + 5), big, Some(0), 2)
    );
    // The level -1 entry knocked out: translation fault, level -1.
    let top = r0 + 8 * t.index(12, -1, -1, va);
    let saved = t.read(top);
    t.write(top, 0);
    let f = w
        .translate(&t.mem, GuestVirtAddr(va), Access::write().user())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.fsc(), f.entry_addr),
        (
            Aarch64FaultKind::Translation,
            -1,
            Some(0b10_1011),
            Some(GuestPhysAddr(top))
        )
    );
    assert_eq!(f.esr_el1(), Some(0x24 << 26 | 1 << 25 | 1 << 6 | 0b10_1011));
    // A level -1 table above a 48-bit IPS: address size, level -1.
    t.write(top, saved | (1 << 8));
    let mut r48 = rg;
    r48.tcr = (r48.tcr & !(7 << 32)) | (0b101 << 32);
    let f = Aarch64Walker::new(r48)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.fsc()),
        (Aarch64FaultKind::AddressSize, -1, Some(0b10_1001))
    );
    t.write(top, saved);
    // The page's OA[51:50] under a 48-bit IPS: address size, level 3.
    let f = Aarch64Walker::new(r48)
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::AddressSize, 3));
    // Without DS the descriptor's bits 9:8 are shareability again (and
    // 52-bit VAs are refused).
    let r16 = t.alloc();
    t.map(r16, 16, 0x3000, 3, (0x7_6000 | (0b10 << 8)) | TABLE | AF, 0);
    let mut r = regs(g, 16, 16, r16, r1);
    r.lpa2 = true;
    let w16 = Aarch64Walker::new(r).unwrap();
    let tr = w16
        .translate(&t.mem, GuestVirtAddr(0x3000), Access::read())
        .unwrap();
    assert_eq!(
        (tr.pa, tr.attributes.shareability),
        (GuestPhysAddr(0x7_6000), 0b10)
    );
    assert!(Aarch64Walker::new(regs(g, 12, 16, r0, r1)).is_err());
}

/// FEAT_LPA2 with the 16 KiB granule: a 52-bit VA starts at level 0 with
/// 32 entries, a 64 GiB block at level 1 carries `OA[51:50]` in bits 9:8,
/// the TTBR holds `BADDR[51:48]` in bits 5:2.
#[test]
fn lpa2_16k() {
    let g = Granule::K16;
    let mut t = Tables::new(g);
    let (r0, r1) = (t.alloc(), t.alloc());
    let size = 1u64 << 36;
    let out = (0x3u64 << 50) | (7 * size);
    let block = (out & 0x0003_ffff_ffff_c000) | (((out >> 50) & 3) << 8) | BLOCK | AF;
    let va = (1u64 << 51) | (2 * size);
    t.map(r0, 12, va, 1, block, 0);
    assert_eq!(t.index(12, 0, 0, va), 16);
    let w = Aarch64Walker::new(regs52(g, 12, 12, r0, r1, true)).unwrap();
    let tr = w
        .translate(&t.mem, GuestVirtAddr(va + 0x77), Access::read())
        .unwrap();
    assert_eq!(
        (tr.pa, tr.page_size, tr.level, tr.memory_refs),
        (GuestPhysAddr(out + 0x77), size, Some(1), 2)
    );
    // Without DS a level-1 block is a translation fault (and the VA must
    // fit 48 bits).
    let f = Aarch64Walker::new(regs(g, 16, 16, r0, r1))
        .unwrap()
        .translate(&t.mem, GuestVirtAddr(2 * size), Access::read())
        .unwrap_err();
    assert_eq!(f.kind, Aarch64FaultKind::Translation);
    // The TTBR's bits 5:2: a 52-bit table base (above memory).
    let w = Aarch64Walker::new(regs52(g, 12, 12, r0 | (0x8 << 2), r1, true)).unwrap();
    let f = w
        .translate(&t.mem, GuestVirtAddr(va), Access::read())
        .unwrap_err();
    assert!(matches!(f.kind, Aarch64FaultKind::Unbacked { pa } if pa.0 >> 48 == 8));
}

// ---------------------------------------------------------------------------
// Stage 2 against its own reference model, written here from the Arm ARM's
// rules (VTCR_EL2's start levels, concatenation, S2AP, XN/XNX, AF, DBM),
// sharing nothing with the walker but the memory.

#[derive(Clone, Copy, Debug)]
struct S2Model {
    g: u32,
    ia: u32,
    start: i8,
    root: u64,
    oa: u32,
    ha: bool,
    hd: bool,
    xnx: bool,
    ds: bool,
    lpa: bool,
}

fn s2_model(m: &S2Model, mem: &GuestMemory, ipa: u64, kind: AccessKind, el0: bool) -> Out {
    let fault = |kind, level| Out::Fault { kind, level };
    if ipa >> m.ia != 0 {
        return fault("translation", 0);
    }
    if m.root >> m.oa != 0 {
        return fault("address size", 0);
    }
    let stride = m.g - 3;
    let mut table = m.root;
    for (refs, level) in (1u32..).zip(m.start..=3i8) {
        let sh = m.g + stride * (3 - level) as u32;
        let width = if level == m.start { m.ia - sh } else { stride };
        let idx = (ipa >> sh) & ((1u64 << width) - 1);
        let Ok(d) = mem.read_obj::<u64>(GuestPhysAddr(table + idx * 8)) else {
            return fault("unbacked", level);
        };
        let field = |lo: u32, hi: u32| d & ((1u64 << (hi + 1)) - 1) & !((1u64 << lo) - 1);
        let addr = |lo: u32| {
            if m.ds {
                field(lo, 49) | (((d >> 8) & 3) << 50)
            } else if m.lpa {
                field(lo, 47) | (((d >> 12) & 0xf) << 48)
            } else {
                field(lo, 47)
            }
        };
        let too_wide = addr(m.g) >> m.oa != 0;
        if d & 3 == 3 && level < 3 {
            if too_wide {
                return fault("address size", level);
            }
            table = addr(m.g);
            continue;
        }
        let block_ok = match m.g {
            12 => level == 1 || level == 2 || (level == 0 && m.ds),
            14 => level == 2 || (level == 1 && m.ds),
            _ => level == 2 || (level == 1 && m.lpa),
        };
        let leaf = (d & 3 == 3 && level == 3) || (d & 3 == 1 && level < 3 && block_ok);
        if !leaf {
            return fault("translation", level);
        }
        if too_wide {
            return fault("address size", level);
        }
        if d & AF == 0 && !m.ha {
            return fault("access flag", level);
        }
        let (xn1, xn0) = (d & (1 << 54) != 0, d & (1 << 53) != 0);
        // (EL1, EL0) execute.
        let (x1, x0) = match (m.xnx, xn1, xn0) {
            (false, false, _) => (true, true),
            (false, true, _) => (false, false),
            (true, false, false) => (true, true),
            (true, false, true) => (false, true),
            (true, true, false) => (false, false),
            (true, true, true) => (true, false),
        };
        let ok = match kind {
            AccessKind::Read => d & (1 << 6) != 0,
            AccessKind::Write => d & (1 << 7) != 0 || (m.hd && d & DBM != 0),
            AccessKind::Fetch => {
                if el0 {
                    x0
                } else {
                    x1
                }
            }
        };
        if !ok {
            return fault("permission", level);
        }
        return Out::Ok {
            pa: addr(sh) | (ipa & ((1u64 << sh) - 1)),
            level,
            refs,
        };
    }
    unreachable!("level 3 is always a leaf or a fault")
}

fn s2_walker_out(
    w: &Aarch64Stage2Walker,
    mem: &GuestMemory,
    ipa: u64,
    kind: AccessKind,
    el0: bool,
) -> Out {
    match w.translate(mem, GuestPhysAddr(ipa), acc(kind, el0)) {
        Ok(t) => Out::Ok {
            pa: t.pa.0,
            level: t.level,
            refs: t.memory_refs,
        },
        Err(f) => Out::Fault {
            kind: match f.kind {
                Aarch64FaultKind::Translation => "translation",
                Aarch64FaultKind::AccessFlag => "access flag",
                Aarch64FaultKind::Permission => "permission",
                Aarch64FaultKind::AddressSize => "address size",
                Aarch64FaultKind::Unbacked { .. } => "unbacked",
                Aarch64FaultKind::ReadOnlyTable => "read-only",
                Aarch64FaultKind::Contended => "contended",
            },
            level: f.level,
        },
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// Random stage-2 tables (a concatenated start area and a pool of
    /// tables pointing at each other, out of memory, above the OA size;
    /// random S2AP, XN, AF, DBM and 52-bit address bits), every granule
    /// with a random start level and IPA size that level can resolve
    /// (half of them with FEAT_LPA/LPA2 and DS, so level -1 and 52-bit
    /// layouts), random HA/HD/XNX and PS: the walker agrees with the model
    /// on every IPA, access and EL.
    #[test]
    fn stage2_matches_model(seed in 1u64.., gsel in 0u8..3, pick in 0u32..1000, flags in 0u8..16,
                            ps in prop::sample::select(vec![0u64, 2, 5, 6]), wide in any::<bool>()) {
        let g = [Granule::K4, Granule::K16, Granule::K64][usize::from(gsel)];
        let (gs, stride) = (g.shift(), g.shift() - 3);
        // (SL2, SL0, start level) the granule offers here.
        let mut levels: Vec<(bool, u64, i8)> = match g {
            Granule::K4 => vec![(false, 0, 2), (false, 1, 1), (false, 2, 0), (false, 3, 3)],
            Granule::K16 => vec![(false, 0, 3), (false, 1, 2), (false, 2, 1)],
            Granule::K64 => vec![(false, 0, 3), (false, 1, 2), (false, 2, 1)],
        };
        if wide && g == Granule::K4 { levels.push((true, 0, -1)); }
        if wide && g == Granule::K16 { levels.push((false, 3, 0)); }
        let (sl2, sl0, start) = levels[pick as usize % levels.len()];
        let resolved = gs + stride * (3 - start) as u32;
        let max_ia = if wide { 52 } else { 48 };
        let lo = (resolved + 1).max(16);
        let hi = (resolved + stride + 4).min(max_ia);
        prop_assume!(lo <= hi);
        let ia = lo + (pick / 7) % (hi - lo + 1);
        let (ha, hd, xnx) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
        let ds = wide && g != Granule::K64;
        let vtcr = u64::from(64 - ia) | (sl0 << 6) | (g.tg0() << 14) | (ps << 16)
            | if ha { 1 << 21 } else { 0 } | if hd { 1 << 22 } else { 0 }
            | if ds { 1 << 32 } else { 0 } | if sl2 { 1 << 33 } else { 0 };
        let mut rng = Rng(seed);
        // The start tables at 0 (1 MiB: 16 tables of 64 KiB at most), the
        // pool above.
        let mem = GuestMemory::new(&[(GuestPhysAddr(0), MEM)]).unwrap();
        let start_bytes = 8u64 << (ia - resolved);
        let pool: Vec<u64> = (0..6u64).map(|i| (1 << 20) + (i << gs)).collect();
        let bits_pool = [1 << 6, 1 << 7, AF, DBM, 1 << 53, 1 << 54, CONT, 1 << 8, 1 << 9,
                         1 << 13, 1 << 48, 1 << 49];
        let mut fill = |at: u64| {
            let mut d = match rng.below(8) {
                0 => rng.next() & !1,
                1 => (1u64 << 40) | 3,
                2 | 3 => pool[rng.below(6) as usize] | 3,
                4 => (rng.below(1 << 20) << 28) | 1,
                _ => (rng.below(1 << 36) << 12) | 3,
            };
            for b in bits_pool {
                if rng.below(3) == 0 {
                    d |= b;
                }
            }
            mem.write_obj(GuestPhysAddr(at), d).unwrap();
        };
        for i in 0..start_bytes / 8 {
            fill(i * 8);
        }
        for &tbl in &pool {
            for i in 0..(1u64 << stride) {
                fill(tbl + i * 8);
            }
        }
        let cfg = Aarch64Stage2 {
            vtcr,
            vttbr: 0,
            pa_bits: if wide { 52 } else { 48 },
            xnx,
            lpa2: wide,
            ttst: true,
        };
        let w = Aarch64Stage2Walker::new(cfg).unwrap();
        let oa = match (ps, wide) { (0, _) => 32, (2, _) => 40, (6, true) => 52, _ => 48 };
        let m = S2Model {
            g: gs, ia, start, root: 0, oa, ha, hd: hd && ha, xnx, ds, lpa: wide && g == Granule::K64,
        };
        for _ in 0..256 {
            let mut ipa = rng.next();
            if rng.below(4) != 0 {
                ipa &= (1u64 << ia) - 1;
            }
            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                for el0 in [false, true] {
                    let want = s2_model(&m, &mem, ipa, kind, el0);
                    let got = s2_walker_out(&w, &mem, ipa, kind, el0);
                    prop_assert_eq!(got, want, "ipa {:#x} {:?} el0 {}", ipa, kind, el0);
                }
            }
        }
    }

    /// Any stage-2 configuration: refused with a typed error, or walks any
    /// IPA on garbage tables without panicking.
    #[test]
    fn stage2_garbage_never_panics(vtcr in any::<u64>(), vttbr in any::<u64>(), pa in 0usize..8,
                                   xnx in any::<bool>(), lpa2 in any::<bool>(), ttst in any::<bool>(),
                                   ipas in prop::collection::vec(any::<u64>(), 16), seed in 1u64..) {
        let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)]).unwrap();
        let mut rng = Rng(seed);
        for i in 0..(1u64 << 17) {
            mem.write_obj(GuestPhysAddr(i * 8), rng.next()).unwrap();
        }
        let pa_bits = [32u8, 36, 40, 42, 44, 48, 52, 50][pa];
        // Keep half the configurations plausible: only the walk's fields.
        let vtcr = if seed % 2 == 0 { vtcr & 0x3_0067_ffff } else { vtcr };
        let cfg = Aarch64Stage2 { vtcr, vttbr: vttbr & 0xf_fffc, pa_bits, xnx, lpa2, ttst };
        if let Ok(w) = Aarch64Stage2Walker::new(cfg) {
            for ipa in ipas {
                for a in [Access::read(), Access::write().user(), Access::fetch()] {
                    let _ = w.translate(&mem, GuestPhysAddr(ipa), a);
                    let f = w.translate_with(&mem, GuestPhysAddr(ipa >> (seed % 40)), a,
                                             WalkOptions { set_accessed_dirty: true });
                    if let Err(f) = f {
                        let _ = (f.fsc(), f.esr_el2(Stage2Access::TableRead), f.hpfar_el2());
                    }
                }
            }
        }
    }
}

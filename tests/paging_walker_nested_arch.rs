//! Two-stage walks of AArch64 and RISC-V guests through `Walker`: stage 1
//! under stage 2 (VTCR_EL2/VTTBR_EL2) and Sv48 under the Sv48x4 G stage
//! (`hgatp`), on hand-built tables where stage 2 maps every guest-physical
//! page `p` to `p + SHIFT`. Checked: the output addresses, the 24 memory
//! references of a cold 4-level-on-4-level walk and none warm, and the
//! faults each architecture raises — a stage-2 abort's ESR_EL2 (S1PTW for
//! a stage-1 table access, WnR) and HPFAR_EL2, a RISC-V guest-page fault's
//! cause (the original access's type), `htval` and `htinst` (the
//! pseudoinstruction of an implicit VS-stage table access) — and the
//! stage-2 execute permission by EL (FEAT_XNX). Also RISC-V's first stage
//! alone: faults, Svnapot and the listing.

// Test code: table fields are built from small known values.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use pagefold::paging::{
    Aarch64Paging, Aarch64Stage2, Access, AccessKind, Arch, ArchAttributes, FaultCode, Granule,
    Privilege, RiscvGStage, RiscvMode, RiscvPaging, RiscvTrap, SecondLevel, Stage, WalkCache,
    WalkOptions, Walker,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};

const PAGE: u64 = 1 << 12;
/// Stage 2 maps guest-physical `p` to `p + SHIFT`.
const SHIFT: u64 = 16 << 20;
/// Guest-physical memory stage 2 maps: the first 8 MiB.
const GUEST: u64 = 8 << 20;

/// Memory of 32 MiB: guest-physical pages at +16 MiB, stage-2 tables from
/// 1 MiB.
struct Mem {
    mem: GuestMemory,
    /// Next free guest-physical table page (stage 1).
    guest_next: u64,
    /// Next free stage-2 table page (host side).
    host_next: u64,
}

impl Mem {
    fn new() -> Self {
        Mem {
            mem: GuestMemory::new(&[(GuestPhysAddr(0), 32 << 20)]).unwrap(),
            guest_next: 0x10_0000,
            host_next: 0x10_0000,
        }
    }

    fn get(&self, pa: u64) -> u64 {
        self.mem.read_obj(GuestPhysAddr(pa)).unwrap()
    }

    fn set(&self, pa: u64, v: u64) {
        self.mem.write_obj(GuestPhysAddr(pa), v).unwrap();
    }

    /// A zeroed 4 KiB (or `pages` × 4 KiB) table: guest-physical for stage
    /// 1 (`guest`), host for stage 2.
    fn table(&mut self, guest: bool, pages: u64) -> u64 {
        let next = if guest {
            &mut self.guest_next
        } else {
            &mut self.host_next
        };
        let t = *next;
        *next += pages * PAGE;
        t
    }
}

/// A 4-level walk's index of `va` at level `l` (3 = root .. 0 = last),
/// `root_bits` wide at the root.
fn index(va: u64, l: u32, root_bits: u32) -> u64 {
    let bits = if l == 3 { root_bits } else { 9 };
    (va >> (12 + 9 * l)) & ((1 << bits) - 1)
}

/// Maps `va` with the entry `leaf` in 4-level tables under `root`
/// (addresses as the tables see them: guest-physical ones are stored at
/// +SHIFT), with the `table(pa)` encoding; `next(e)` decodes a table
/// entry.
#[allow(clippy::too_many_arguments)]
fn map4(
    m: &mut Mem,
    guest: bool,
    root: u64,
    va: u64,
    root_bits: u32,
    table: fn(u64) -> u64,
    leaf: u64,
    next: fn(u64) -> u64,
) -> u64 {
    let base = if guest { SHIFT } else { 0 };
    let mut t = root;
    for l in (1..4).rev() {
        let at = base + t + 8 * index(va, l, root_bits);
        let e = m.get(at);
        t = if e & 1 != 0 {
            next(e)
        } else {
            let n = m.table(guest, 1);
            m.set(at, table(n));
            n
        };
    }
    let at = base + t + 8 * index(va, 0, root_bits);
    m.set(at, leaf);
    at
}

// AArch64 encodings.
const A_AF: u64 = 1 << 10;
const A_AP1: u64 = 1 << 6;
const S2AP_RW: u64 = 3 << 6;
const S2AP_R: u64 = 1 << 6;
const S2_XN1: u64 = 1 << 54;
const S2_NORMAL: u64 = 0xf << 2;

fn a_table(pa: u64) -> u64 {
    pa | 3
}

fn a_next(e: u64) -> u64 {
    e & 0x0000_ffff_ffff_f000
}

/// An AArch64 guest: stage 2 mapping the first 8 MiB IPA to +16 MiB, a
/// user page at VA 0x40_0000 -> IPA 0x50_0000, every stage-2 leaf with
/// `s2_leaf_extra` (XN bits).
fn aarch64(m: &mut Mem, s2_leaf_extra: u64, xnx: bool) -> Walker {
    let s2_root = m.table(false, 1);
    for ipa in (0..GUEST).step_by(PAGE as usize) {
        let leaf = (ipa + SHIFT) | 3 | A_AF | S2AP_RW | S2_NORMAL | s2_leaf_extra;
        map4(m, false, s2_root, ipa, 9, a_table, leaf, a_next);
    }
    let s1_root = m.table(true, 1);
    map4(
        m,
        true,
        s1_root,
        0x40_0000,
        9,
        a_table,
        0x50_0000 | 3 | A_AF | A_AP1,
        a_next,
    );
    let mut s2 = Aarch64Stage2::new(Granule::K4, 48, s2_root);
    s2.xnx = xnx;
    Walker::new(Aarch64Paging::new(Granule::K4, s1_root, s1_root))
        .unwrap()
        .with_second_level(SecondLevel::Aarch64(s2))
        .unwrap()
}

/// The stage-2 leaf entry of `ipa` (the tables are 4-level, 9 bits a
/// level, from the first stage-2 table at 1 MiB).
fn s2_leaf_at(m: &Mem, ipa: u64) -> u64 {
    let mut t = 0x10_0000;
    for l in (1..4).rev() {
        t = a_next(m.get(t + 8 * index(ipa, l, 9)));
    }
    t + 8 * index(ipa, 0, 9)
}

#[test]
fn aarch64_stage1_under_stage2() {
    let mut m = Mem::new();
    let w = aarch64(&mut m, 0, false);
    assert_eq!(w.arch(), Arch::Aarch64);
    let t = w
        .translate(&m.mem, GuestVirtAddr(0x40_0123), Access::read().user())
        .unwrap();
    assert_eq!((t.gpa.0, t.pa.0), (0x50_0123, 0x50_0123 + SHIFT));
    // Four stage-1 descriptors, each behind a 4-level stage-2 walk, then
    // the final IPA's: 4 * 5 + 4.
    assert_eq!(t.memory_refs, 24);
    let second = t.second.unwrap();
    assert_eq!(second.page_size, PAGE);
    assert_eq!(second.attributes.memory_type, Some(0xf));
    let mut cache = WalkCache::new();
    let opts = WalkOptions::default();
    for expect_refs in [24, 0] {
        let t = w
            .translate_with(
                &m.mem,
                GuestVirtAddr(0x40_0123),
                Access::read(),
                opts,
                Some(&mut cache),
            )
            .unwrap();
        assert_eq!((t.pa.0, t.memory_refs), (0x50_0123 + SHIFT, expect_refs));
    }
}

#[test]
fn aarch64_stage2_aborts_carry_s1ptw_wnr_and_hpfar() {
    let mut m = Mem::new();
    let w = aarch64(&mut m, 0, false);
    // The stage-1 level-2 table lives at IPA 0x10_2000 (root 0x10_0000,
    // then 0x10_1000, 0x10_2000, 0x10_3000): unmap it at stage 2.
    let at = s2_leaf_at(&m, 0x10_2000);
    m.set(at, 0);
    let f = w
        .translate(&m.mem, GuestVirtAddr(0x40_0000), Access::write().user())
        .unwrap_err();
    assert_eq!(
        f.stage,
        Stage::Second {
            guest_table: Some(2)
        }
    );
    assert_eq!(
        f.gpa,
        Some(GuestPhysAddr(0x10_2000 + 8 * index(0x40_0000, 1, 9)))
    );
    let FaultCode::Aarch64Stage2Abort { esr, hpfar } = f.code else {
        panic!("{f:?}")
    };
    // Data abort from a lower EL, IL, S1PTW, a descriptor read (WnR
    // clear), translation fault at stage-2 level 3.
    assert_eq!(esr, 0x24 << 26 | 1 << 25 | 1 << 7 | 0b00_0111);
    assert_eq!(hpfar, (0x10_2000 >> 12) << 4);
    // The final IPA read-only at stage 2: a write is a permission fault
    // on the access itself (S1PTW clear, WnR set), reads still work.
    m.set(at, (0x10_2000 + SHIFT) | 3 | A_AF | S2AP_RW | S2_NORMAL);
    let leaf = s2_leaf_at(&m, 0x50_0000);
    m.set(leaf, (0x50_0000 + SHIFT) | 3 | A_AF | S2AP_R | S2_NORMAL);
    assert!(w
        .translate(&m.mem, GuestVirtAddr(0x40_0000), Access::read())
        .is_ok());
    let f = w
        .translate(&m.mem, GuestVirtAddr(0x40_0008), Access::write())
        .unwrap_err();
    assert_eq!(f.stage, Stage::Second { guest_table: None });
    let FaultCode::Aarch64Stage2Abort { esr, .. } = f.code else {
        panic!("{f:?}")
    };
    assert_eq!(esr, 0x24 << 26 | 1 << 25 | 1 << 6 | 0b00_1111);
}

#[test]
fn aarch64_stage2_execute_by_el_with_xnx() {
    // Stage 1: VA 0x40_0000 an EL0 page (EL0 may execute it), VA
    // 0x40_1000 an EL1 page at IPA 0x50_1000 (EL1 may execute it), so
    // stage 2 alone decides. XN[1:0] (bits 54:53): without FEAT_XNX only
    // XN[1] counts; with it 0b01 denies EL1, 0b10 both, 0b11 EL0.
    for (xnx, extra, el1, el0) in [
        (false, S2_XN1, false, false),
        (false, 1 << 53, true, true),
        (true, S2_XN1, false, false),
        (true, 1 << 53, false, true),
        (true, S2_XN1 | 1 << 53, true, false),
    ] {
        let mut m = Mem::new();
        let w = aarch64(&mut m, extra, xnx);
        let s1_root = 0x10_0000;
        map4(
            &mut m,
            true,
            s1_root,
            0x40_1000,
            9,
            a_table,
            0x50_1000 | 3 | A_AF | 1 << 7,
            a_next,
        );
        let mut cache = WalkCache::new();
        let opts = WalkOptions::default();
        for (va, privilege, want) in [
            (0x40_0000, Privilege::User, el0),
            (0x40_1000, Privilege::Supervisor, el1),
        ] {
            let access = Access::new(AccessKind::Fetch, privilege);
            let r = w.translate(&m.mem, GuestVirtAddr(va), access);
            assert_eq!(
                r.is_ok(),
                want,
                "xnx {xnx} XN {extra:#x} {privilege:?}: {r:?}"
            );
            if let Err(f) = r {
                assert_eq!(f.stage, Stage::Second { guest_table: None });
                let FaultCode::Aarch64Stage2Abort { esr, .. } = f.code else {
                    panic!("{f:?}")
                };
                // An instruction abort from a lower EL, permission fault
                // at level 3.
                assert_eq!(esr, 0x20 << 26 | 1 << 25 | 0b00_1111);
            }
            // The cache agrees, cold and warm.
            for _ in 0..2 {
                let c = w.translate_with(&m.mem, GuestVirtAddr(va), access, opts, Some(&mut cache));
                assert_eq!(
                    c.is_ok(),
                    want,
                    "cached: xnx {xnx} XN {extra:#x} {privilege:?}"
                );
            }
        }
    }
}

// RISC-V encodings.
const V: u64 = 1;
const R: u64 = 1 << 1;
const W: u64 = 1 << 2;
const X: u64 = 1 << 3;
const U: u64 = 1 << 4;
const A: u64 = 1 << 6;
const D: u64 = 1 << 7;
const N: u64 = 1 << 63;

fn r_table(pa: u64) -> u64 {
    (pa >> 12) << 10 | V
}

fn r_next(e: u64) -> u64 {
    ((e >> 10) & ((1 << 44) - 1)) << 12
}

fn r_leaf(pa: u64, flags: u64) -> u64 {
    (pa >> 12) << 10 | flags
}

/// A RISC-V guest: Sv48x4 G stage mapping the first 8 MiB GPA to +16 MiB
/// (16 KiB root), an Sv48 user page at VA 0x40_0000 -> GPA 0x50_0000.
fn riscv(m: &mut Mem, g_flags: u64, adue: bool) -> (Walker, u64) {
    let g_root = m.table(false, 4);
    for gpa in (0..GUEST).step_by(PAGE as usize) {
        let leaf = r_leaf(gpa + SHIFT, g_flags);
        map4(m, false, g_root, gpa, 11, r_table, leaf, r_next);
    }
    let s1_root = m.table(true, 1);
    map4(
        m,
        true,
        s1_root,
        0x40_0000,
        9,
        r_table,
        // With Svadu, A and D clear: the walk sets them.
        r_leaf(0x50_0000, V | R | W | U | if adue { 0 } else { A | D }),
        r_next,
    );
    let mut vs = RiscvPaging::new(RiscvMode::Sv48, s1_root);
    vs.adue = adue;
    let mut g = RiscvGStage::new(RiscvMode::Sv48, g_root);
    g.adue = adue;
    let w = Walker::new(vs)
        .unwrap()
        .with_second_level(SecondLevel::Riscv(g))
        .unwrap();
    (w, g_root)
}

/// The G-stage leaf entry of `gpa` (16 KiB root at 1 MiB).
fn g_leaf_at(m: &Mem, gpa: u64) -> u64 {
    let mut t = 0x10_0000;
    for l in (1..4).rev() {
        t = r_next(m.get(t + 8 * index(gpa, l, 11)));
    }
    t + 8 * index(gpa, 0, 11)
}

#[test]
fn riscv_vs_stage_under_g_stage() {
    let mut m = Mem::new();
    let (w, _) = riscv(&mut m, V | R | W | X | U | A | D, false);
    assert_eq!(w.arch(), Arch::Riscv64);
    let t = w
        .translate(&m.mem, GuestVirtAddr(0x40_0abc), Access::read().user())
        .unwrap();
    assert_eq!(
        (t.gpa.0, t.pa.0, t.memory_refs),
        (0x50_0abc, 0x50_0abc + SHIFT, 24)
    );
    let ArchAttributes::Riscv(attrs) = t.arch_attributes else {
        panic!("{t:?}")
    };
    assert!(attrs.accessed && attrs.dirty && !attrs.napot);
    let mut cache = WalkCache::new();
    let opts = WalkOptions::default();
    for expect in [24, 0] {
        let t = w
            .translate_with(
                &m.mem,
                GuestVirtAddr(0x40_0abc),
                Access::write().user(),
                opts,
                Some(&mut cache),
            )
            .unwrap();
        assert_eq!(t.memory_refs, expect);
    }
    // S-mode may not touch the U page without SUM: a load page fault.
    let f = w
        .translate(&m.mem, GuestVirtAddr(0x40_0abc), Access::read())
        .unwrap_err();
    let FaultCode::Riscv(trap) = f.code else {
        panic!("{f:?}")
    };
    assert_eq!((trap.cause, trap.tval, trap.gva), (13, 0x40_0abc, true));
}

#[test]
fn riscv_guest_page_faults_name_the_table_access() {
    let mut m = Mem::new();
    let (w, _) = riscv(&mut m, V | R | W | X | U | A | D, false);
    // The VS-stage level-1 table (the last one, GPA 0x10_3000) unmapped
    // in the G stage: a store's walk faults reading it. The trap is a
    // store guest-page fault (the original access), htval the PTE's GPA
    // >> 2, htinst the read pseudoinstruction.
    let at = g_leaf_at(&m, 0x10_3000);
    m.set(at, 0);
    let f = w
        .translate(&m.mem, GuestVirtAddr(0x40_0000), Access::write().user())
        .unwrap_err();
    assert_eq!(
        f.stage,
        Stage::Second {
            guest_table: Some(1)
        }
    );
    let FaultCode::Riscv(t) = f.code else {
        panic!("{f:?}")
    };
    let pte_gpa = 0x10_3000 + 8 * index(0x40_0000, 0, 9);
    assert_eq!(t.cause, RiscvTrap::STORE_GUEST_PAGE_FAULT);
    assert_eq!(
        (t.tval, t.htval, t.htinst),
        (0x40_0000, pte_gpa >> 2, RiscvTrap::PSEUDO_READ)
    );
    assert!(t.is_guest_page_fault() && t.gva);
    // The final GPA unmapped: a load guest-page fault with htinst 0.
    m.set(at, r_leaf(0x10_3000 + SHIFT, V | R | W | U | A | D));
    let leaf = g_leaf_at(&m, 0x50_0000);
    m.set(leaf, 0);
    let f = w
        .translate(&m.mem, GuestVirtAddr(0x40_0010), Access::read().user())
        .unwrap_err();
    let FaultCode::Riscv(t) = f.code else {
        panic!("{f:?}")
    };
    assert_eq!(
        (t.cause, t.htval, t.htinst),
        (RiscvTrap::LOAD_GUEST_PAGE_FAULT, 0x50_0010 >> 2, 0)
    );
}

#[test]
fn riscv_svadu_update_through_a_read_only_g_stage_page_is_a_pseudo_write_fault() {
    let mut m = Mem::new();
    // G-stage pages readable, not writable: the VS-stage A/D update (a
    // store to the PTE) faults; plain reads of the tables do not.
    let (w, _) = riscv(&mut m, V | R | X | U | A | D, true);
    let opts = WalkOptions {
        set_accessed_dirty: true,
    };
    let f = w
        .translate_with(
            &m.mem,
            GuestVirtAddr(0x40_0000),
            Access::read().user(),
            opts,
            None,
        )
        .unwrap_err();
    let FaultCode::Riscv(t) = f.code else {
        panic!("{f:?}")
    };
    assert_eq!(t.cause, RiscvTrap::LOAD_GUEST_PAGE_FAULT);
    assert_eq!(t.htinst, RiscvTrap::PSEUDO_WRITE);
    assert!(matches!(
        f.stage,
        Stage::Second {
            guest_table: Some(_)
        }
    ));
}

#[test]
fn riscv_bare_g_stage_is_no_second_level() {
    let mut m = Mem::new();
    let root = m.table(true, 1);
    let w = Walker::new(RiscvPaging::new(RiscvMode::Sv39, root))
        .unwrap()
        .with_second_level(SecondLevel::Riscv(RiscvGStage {
            hgatp: 0,
            ..RiscvGStage::new(RiscvMode::Sv39, 0)
        }))
        .unwrap();
    assert!(!w.has_second_level());
}

#[test]
fn riscv_first_stage_napot_listing_and_faults() {
    let m = Mem::new();
    let root = 0x20_0000;
    let mut rg = RiscvPaging::new(RiscvMode::Sv39, root);
    rg.svnapot = true;
    // Sv39: root -> L1 table at 0x20_1000 -> L0 table at 0x20_2000; the 16
    // entries for VA 0x1_0000.. form one NAPOT 64 KiB page at 0x30_0000
    // (PPN[3:0] = 0b1000).
    m.set(root, r_table(0x20_1000));
    m.set(0x20_1000, r_table(0x20_2000));
    let napot = (0x30_8000 >> 12) << 10 | N | V | R | W | A | D;
    for k in 0..16 {
        m.set(0x20_2000 + 8 * (16 + k), napot);
    }
    // A 2 MiB superpage at VA 0x20_0000, kernel read-execute.
    m.set(0x20_1000 + 8, r_leaf(0x40_0000, V | R | X | A));
    let w = Walker::new(rg).unwrap();
    let t = w
        .translate(&m.mem, GuestVirtAddr(0x1_2345), Access::write())
        .unwrap();
    assert_eq!((t.gpa.0, t.page_size), (0x30_2345, 64 << 10));
    let maps: Vec<_> = w.mappings(&m.mem).map(Result::unwrap).collect();
    assert_eq!(maps.len(), 17, "16 NAPOT slots and the superpage");
    for (k, map) in maps[..16].iter().enumerate() {
        let k = k as u64;
        assert_eq!(
            (map.va.0, map.gpa.0, map.size),
            (0x1_0000 + k * PAGE, 0x30_0000 + k * PAGE, PAGE)
        );
    }
    assert_eq!((maps[16].va.0, maps[16].size), (0x20_0000, 2 << 20));
    // A write to the read-execute superpage: a store page fault.
    let f = w
        .translate(&m.mem, GuestVirtAddr(0x20_0010), Access::write())
        .unwrap_err();
    assert_eq!(
        f.code,
        FaultCode::Riscv(RiscvTrap {
            cause: RiscvTrap::STORE_PAGE_FAULT,
            tval: 0x20_0010,
            htval: 0,
            htinst: 0,
            gva: false,
        })
    );
    // A non-canonical Sv39 address: a page fault too (not a #GP).
    let f = w
        .translate(&m.mem, GuestVirtAddr(1 << 40), Access::fetch())
        .unwrap_err();
    let FaultCode::Riscv(t) = f.code else {
        panic!("{f:?}")
    };
    assert_eq!(t.cause, RiscvTrap::INSTRUCTION_PAGE_FAULT);
    // Bare: the address is the physical one, within the PA width.
    let bare = Walker::new(RiscvPaging::bare()).unwrap();
    assert_eq!(
        bare.translate(&m.mem, GuestVirtAddr(0x1234), Access::read())
            .unwrap()
            .gpa
            .0,
        0x1234
    );
    let f = bare
        .translate(&m.mem, GuestVirtAddr(1 << 56), Access::read())
        .unwrap_err();
    let FaultCode::Riscv(t) = f.code else {
        panic!("{f:?}")
    };
    assert_eq!(t.cause, RiscvTrap::LOAD_ACCESS_FAULT);
}

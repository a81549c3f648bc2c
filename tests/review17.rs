//! Review of the AArch64 integration of `paging::Walker` (issue 17): each
//! test pins one defect found by a cold review, against the Arm ARM (DDI
//! 0487, D8) or against the walker's own contract (a cached answer equals
//! an uncached walk; a listing lists what translates).

// Test code: table fields are built from small known values.
#![allow(clippy::unwrap_used)]

use pagefold::paging::{
    aarch64::regs::{TCR_EPD1, TCR_TBI0, TCR_TBI1, TCR_TBID0},
    Aarch64FaultKind, Aarch64Paging, Aarch64Walker, Access, FaultCode, FaultReason, Granule,
    WalkCache, WalkOptions, Walker,
};
use pagefold::{GuestMemory, GuestPhysAddr, GuestVirtAddr};

const TABLE: u64 = 3;
const AF: u64 = 1 << 10;
const AP1: u64 = 1 << 6;

/// Guest memory and a bump allocator of granule-aligned tables.
struct Tables {
    mem: GuestMemory,
    next: u64,
}

impl Tables {
    fn new(layout: &[(GuestPhysAddr, u64)]) -> Self {
        Tables {
            mem: GuestMemory::new(layout).unwrap(),
            next: 0x10_0000,
        }
    }

    fn alloc(&mut self, g: Granule) -> u64 {
        let size = 1u64 << g.shift();
        let t = self.next.next_multiple_of(size);
        self.next = t + size;
        t
    }

    fn entry(&self, pa: u64) -> u64 {
        self.mem.read_obj(GuestPhysAddr(pa)).unwrap()
    }

    /// Maps `va` with `leaf` at architectural `level` under `root`, for
    /// granule `g` and a 48-bit range (TxSZ = 16); new tables come from
    /// the allocator. Returns the leaf entry's address.
    fn map(&mut self, g: Granule, root: u64, va: u64, level: i8, leaf: u64) -> u64 {
        let (shift, stride) = (g.shift(), g.stride());
        let start = g.start_level(16);
        let index = |l: i8| {
            let lsb = shift + stride * u32::try_from(3 - l).unwrap();
            let bits = if l == start { 48 - lsb } else { stride };
            (va >> lsb) & ((1 << bits) - 1)
        };
        let mut table = root;
        for l in start..level {
            let at = table + 8 * index(l);
            let e = self.entry(at);
            table = if e & 3 == 3 {
                e & 0x0000_ffff_ffff_f000 & !((1 << shift) - 1)
            } else {
                let t = self.alloc(g);
                self.mem.write_obj(GuestPhysAddr(at), t | TABLE).unwrap();
                t
            };
        }
        let at = table + 8 * index(level);
        self.mem.write_obj(GuestPhysAddr(at), leaf).unwrap();
        at
    }
}

fn low_ram() -> Vec<(GuestPhysAddr, u64)> {
    vec![(GuestPhysAddr(0), 16 << 20)]
}

/// With stage 1 off, the top byte of a data address is still ignored under
/// TBI (`AArch64.S1DisabledOutput`: the address-size check covers
/// `va<AddrTop:PAMax>`, AddrTop being 55 under TBI, and the output is
/// `va<51:0>`); TBID still limits TBI to data accesses.
#[test]
fn mmu_off_ignores_the_top_byte_under_tbi() {
    let t = Tables::new(&low_ram());
    let mut r = Aarch64Paging::new(Granule::K4, 0x1000, 0x2000);
    r.sctlr = 0;
    r.tcr |= TCR_TBI0 | TCR_TBID0;
    let va = GuestVirtAddr(0x5a00_0000_0000_1234);
    let w = Walker::new(r).unwrap();
    let got = w.translate(&t.mem, va, Access::read()).unwrap();
    assert_eq!(
        (got.gpa, got.pa),
        (GuestPhysAddr(0x1234), GuestPhysAddr(0x1234))
    );
    let a = Aarch64Walker::new(r).unwrap();
    assert_eq!(
        a.translate(&t.mem, va, Access::read()).unwrap().pa,
        GuestPhysAddr(0x1234)
    );
    // A fetch of the same address: TBID0 keeps the top byte, which is
    // above the PA size: an address size fault at level 0.
    let f = w.translate(&t.mem, va, Access::fetch()).unwrap_err();
    assert_eq!(
        f.code,
        FaultCode::Aarch64Abort {
            esr: 0x21 << 26 | 1 << 25
        }
    );
    let f = a.translate(&t.mem, va, Access::fetch()).unwrap_err();
    assert_eq!((f.kind, f.level), (Aarch64FaultKind::AddressSize, 0));
    // Through a cache, the data read is cached and the fetch still faults.
    let mut c = WalkCache::new();
    let opts = WalkOptions::default();
    let got = w.translate_with(&t.mem, va, Access::read(), opts, Some(&mut c));
    assert_eq!(got.unwrap().pa, GuestPhysAddr(0x1234));
    let f = w.translate_with(&t.mem, va, Access::fetch(), opts, Some(&mut c));
    assert!(
        f.is_err(),
        "a tagged fetch under TBID faults, cached or not"
    );
}

/// A TTBR whose base is above the output-address size gives every address
/// of its range an address size fault at level 0, so the listing must not
/// list mappings through it.
#[test]
fn listing_skips_a_range_whose_root_is_above_the_oa_size() {
    let mut ram = low_ram();
    ram.push((GuestPhysAddr(0x1_0000_0000), 1 << 20));
    let mut t = Tables::new(&ram);
    let root = 0x1_0000_0000;
    t.map(
        Granule::K4,
        root,
        0x40_0000,
        3,
        0x20_0000 | TABLE | AF | AP1,
    );
    let mut r = Aarch64Paging::new(Granule::K4, root, 0);
    // IPS = 0b000: a 32-bit output-address size; TTBR1 walks disabled.
    r.tcr = (r.tcr & !(7 << 32)) | TCR_EPD1;
    let w = Walker::new(r).unwrap();
    let f = w
        .translate(&t.mem, GuestVirtAddr(0x40_0000), Access::read())
        .unwrap_err();
    // Data abort from EL1, address size fault at level 0.
    assert_eq!(
        f.code,
        FaultCode::Aarch64Abort {
            esr: 0x25 << 26 | 1 << 25
        }
    );
    let items: Vec<_> = w.mappings(&t.mem).collect();
    assert!(
        items.iter().all(Result::is_err),
        "listed what translate refuses: {items:?}"
    );
    assert!(
        items
            .iter()
            .any(|i| matches!(i, Err(f) if matches!(f.reason, FaultReason::Reserved { .. }))),
        "the listing says why the range is unreachable: {items:?}"
    );
}

/// The TLB holds translations of untagged addresses: TLBI VAE1 names
/// `VA[55:12]` and drops the page whatever tag a pointer to it carried. A
/// cache that keeps a tagged address's translation apart must drop it
/// with the page, or it answers from a stale entry.
#[test]
fn invalidating_a_page_drops_its_tagged_aliases() {
    let mut t = Tables::new(&low_ram());
    let root = t.alloc(Granule::K4);
    let leaf = t.map(Granule::K4, root, 0x40_0000, 3, 0x20_0000 | TABLE | AF);
    let mut r = Aarch64Paging::new(Granule::K4, root, 0);
    r.tcr |= TCR_TBI0 | TCR_EPD1;
    let w = Walker::new(r).unwrap();
    let tagged = GuestVirtAddr(0x3b00_0000_0040_0000);
    let opts = WalkOptions::default();
    let mut c = WalkCache::new();
    let first = w.translate_with(&t.mem, tagged, Access::read(), opts, Some(&mut c));
    assert_eq!(first.unwrap().pa, GuestPhysAddr(0x20_0000));
    // The guest remaps the page and invalidates it (TLBI VAE1).
    t.mem
        .write_obj(GuestPhysAddr(leaf), 0x30_0000 | TABLE | AF)
        .unwrap();
    c.invalidate_page(w.space(), GuestVirtAddr(0x40_0000));
    let cached = w.translate_with(&t.mem, tagged, Access::read(), opts, Some(&mut c));
    let uncached = w.translate(&t.mem, tagged, Access::read());
    assert_eq!(cached.unwrap().pa, uncached.unwrap().pa);
    let pa = c
        .bind(&w)
        .translate_pa(&t.mem, tagged, Access::read(), opts)
        .unwrap();
    assert_eq!(pa, GuestPhysAddr(0x30_0000));
}

/// The two ranges may use different granules, so the same upper-level
/// tag (`va >> index_shift(level + 1)`) can name a table of either range:
/// a lower-range walk must never start from an upper-range table.
#[test]
fn upper_level_entries_of_one_range_never_start_a_walk_in_the_other() {
    let mut t = Tables::new(&low_ram());
    let (lo, hi) = (Granule::K4, Granule::K64);
    let root0 = t.alloc(lo);
    let root1 = t.alloc(hi);
    // A tagged upper-range address (top byte 0x00 under TBI1) whose
    // level-2 (64 KiB) tag equals a lower-range address's level-2 (4 KiB)
    // tag: va_hi >> 29 == va_lo >> 21.
    let va_hi = 0x00ff_8000_0000_0000u64;
    let va_lo = (va_hi >> 29) << 21;
    assert_eq!(va_lo, 0x0000_ff80_0000_0000);
    t.map(hi, root1, va_hi, 3, 0x50_0000 | TABLE | AF);
    t.map(lo, root0, va_lo, 3, 0x60_0000 | TABLE | AF);
    let r = Aarch64Paging {
        tcr: 16 | lo.tg0() << 14 | 16 << 16 | hi.tg1() << 30 | 5 << 32 | TCR_TBI1,
        ..Aarch64Paging::new(lo, root0, root1)
    };
    let w = Walker::new(r).unwrap();
    let opts = WalkOptions::default();
    let mut c = WalkCache::new();
    let (a, b) = (GuestVirtAddr(va_hi), GuestVirtAddr(va_lo));
    let got_hi = w.translate_with(&t.mem, a, Access::read(), opts, Some(&mut c));
    assert_eq!(got_hi.unwrap().pa, GuestPhysAddr(0x50_0000));
    let got_lo = w.translate_with(&t.mem, b, Access::read(), opts, Some(&mut c));
    let want_lo = w.translate(&t.mem, b, Access::read()).unwrap();
    assert_eq!(want_lo.pa, GuestPhysAddr(0x60_0000));
    assert_eq!(
        got_lo.unwrap().pa,
        want_lo.pa,
        "cached walk started in TTBR1's table"
    );
}

/// TCR_EL1.E0PD1 (bit 56, FEAT_E0PD, which Linux sets where the CPU has
/// it): every EL0 access to the TTBR1 range takes a level 0 translation
/// fault, whatever the descriptors say, cached or not. (E0PD0, bit 55,
/// likewise for TTBR0.)
#[test]
fn e0pd_faults_every_el0_access_to_its_range_at_level_0() {
    const TCR_E0PD1: u64 = 1 << 56;
    const HIGH: u64 = 0xffff_8000_0000_0000;
    let mut t = Tables::new(&low_ram());
    let root1 = t.alloc(Granule::K4);
    // An EL0-readable page and a kernel-only page in the upper range.
    t.map(
        Granule::K4,
        root1,
        HIGH | 0x1000,
        3,
        0x20_0000 | TABLE | AF | AP1,
    );
    t.map(Granule::K4, root1, HIGH | 0x2000, 3, 0x21_0000 | TABLE | AF);
    let mut r = Aarch64Paging::new(Granule::K4, 0, root1);
    r.tcr |= TCR_E0PD1 | pagefold::paging::aarch64::regs::TCR_EPD0;
    let w = Walker::new(r).unwrap();
    let a = Aarch64Walker::new(r).unwrap();
    // Data abort from EL0 (EC 0x24), translation fault at level 0.
    let esr = 0x24 << 26 | 1 << 25 | 0b00_0100;
    let opts = WalkOptions::default();
    let mut c = WalkCache::new();
    for va in [HIGH | 0x1000, HIGH | 0x2000] {
        let va = GuestVirtAddr(va);
        // EL1 reads are fine (and fill the cache).
        w.translate_with(&t.mem, va, Access::read(), opts, Some(&mut c))
            .unwrap();
        let f = a.translate(&t.mem, va, Access::read().user()).unwrap_err();
        assert_eq!(
            (f.kind, f.level),
            (Aarch64FaultKind::Translation, 0),
            "{va:#x}"
        );
        let f = w.translate(&t.mem, va, Access::read().user()).unwrap_err();
        assert_eq!(f.code, FaultCode::Aarch64Abort { esr }, "{va:#x}");
        let f = w
            .translate_with(&t.mem, va, Access::read().user(), opts, Some(&mut c))
            .unwrap_err();
        assert_eq!(f.code, FaultCode::Aarch64Abort { esr }, "{va:#x} cached");
    }
    // The listing does not report EL0 access to the range either.
    for m in w.mappings(&t.mem) {
        let m = m.unwrap();
        assert!(!m.permissions.user && !m.permissions.user_execute, "{m:?}");
    }
}

/// With 16 KiB and 64 KiB granules a table spans several 4 KiB pages; a
/// `TableWatch` must learn of the page holding each entry a cached walk
/// read, or a library write to that entry leaves the cache stale.
#[test]
fn a_watched_cache_sees_writes_to_any_page_of_a_large_granule_table() {
    use pagefold::paging::TableWatch;
    let g = Granule::K64;
    let mut t = Tables::new(&low_ram());
    let root = t.alloc(g);
    // Level-3 index 600: the entry is 4800 bytes into its 64 KiB table,
    // in the table's second 4 KiB page.
    let va = 600u64 << 16;
    let leaf = t.map(g, root, va, 3, 0x50_0000 | TABLE | AF);
    assert_ne!(leaf >> 12, (leaf & !0xffff) >> 12);
    let watch = TableWatch::new();
    t.mem.set_write_observer(watch.clone()).unwrap();
    let r = Aarch64Paging {
        tcr: Aarch64Paging::new(g, root, 0).tcr | TCR_EPD1,
        ..Aarch64Paging::new(g, root, 0)
    };
    let w = Walker::new(r).unwrap();
    let mut c = WalkCache::new();
    c.attach_watch(watch);
    let opts = WalkOptions::default();
    let va = GuestVirtAddr(va);
    let first = w.translate_with(&t.mem, va, Access::read(), opts, Some(&mut c));
    assert_eq!(first.unwrap().pa, GuestPhysAddr(0x50_0000));
    // A library write of the leaf: the watch is told.
    t.mem
        .write_obj(GuestPhysAddr(leaf), 0x60_0000u64 | TABLE | AF)
        .unwrap();
    let got = w.translate_with(&t.mem, va, Access::read(), opts, Some(&mut c));
    assert_eq!(
        got.unwrap().pa,
        GuestPhysAddr(0x60_0000),
        "stale after a watched write"
    );
}

/// The last page of the address space (the top of the TTBR1 range; x86's
/// too) is a whole page to `translate_range`: `[va, va + len)` may end
/// exactly at 2^64.
#[test]
fn a_range_may_end_at_the_top_of_the_address_space() {
    let mut t = Tables::new(&low_ram());
    let root1 = t.alloc(Granule::K4);
    let top = 0xffff_ffff_ffff_f000u64;
    t.map(Granule::K4, root1, top, 3, 0x20_0000 | TABLE | AF);
    let mut r = Aarch64Paging::new(Granule::K4, 0, root1);
    r.tcr |= pagefold::paging::aarch64::regs::TCR_EPD0;
    let w = Walker::new(r).unwrap();
    let segs: Vec<_> = w
        .translate_range(&t.mem, GuestVirtAddr(top), 0x1000, Access::read())
        .collect();
    let lens: Vec<u64> = segs.iter().map(|s| s.as_ref().unwrap().len).collect();
    assert_eq!(lens, [0x1000], "{segs:?}");
    let mut buf = [0u8; 0x1000];
    let opts = WalkOptions::default();
    w.read_virt(
        &t.mem,
        GuestVirtAddr(top),
        &mut buf,
        Access::read(),
        opts,
        None,
    )
    .unwrap();
}

/// SCTLR_EL1.EE (bit 25) makes EL1&0 stage-1 table walks big-endian; a
/// walker that reads descriptors little-endian would answer for other
/// tables than the guest's, so it must refuse the registers (naming the
/// field) rather than translate.
#[test]
fn big_endian_table_walks_are_refused_not_misread() {
    const SCTLR_EE: u64 = 1 << 25;
    let mut r = Aarch64Paging::new(Granule::K4, 0x1000, 0x2000);
    r.sctlr |= SCTLR_EE;
    let e = Walker::new(r).unwrap_err();
    assert!(e.to_string().contains("SCTLR_EL1.EE"), "{e}");
    assert!(Aarch64Walker::new(r).is_err());
    // With stage 1 off there is no walk: nothing to refuse.
    r.sctlr = SCTLR_EE;
    assert!(Walker::new(r).is_ok());
}

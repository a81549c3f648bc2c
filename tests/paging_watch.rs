//! The walk cache's page-table watch: a library write to a page-table page
//! invalidates every attached cache; accessed/dirty updates by the walker
//! and writes elsewhere do not.

#![allow(clippy::unwrap_used)]

use pagefold::{
    paging::{
        x86::{CR4_PCIDE, CR4_PGE},
        Access, PhysMemory, TableWatch, WalkCache, WalkOptions, Walker, X86Paging,
    },
    GuestMemory, GuestPhysAddr, GuestVirtAddr,
};

/// 4-level tables at 0x1000..0x4000 mapping 0x40_0000 to 0x5000.
fn guest() -> GuestMemory {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 20)]).unwrap();
    mem.write_obj(GuestPhysAddr(0x1000), 0x2003u64).unwrap();
    mem.write_obj(GuestPhysAddr(0x2000), 0x3003u64).unwrap();
    mem.write_obj(GuestPhysAddr(0x3000 + 2 * 8), 0x4003u64)
        .unwrap();
    mem.write_obj(GuestPhysAddr(0x4000), 0x5003u64).unwrap();
    mem
}

#[test]
fn table_writes_invalidate_attached_caches() {
    let mem = guest();
    let watch = TableWatch::new();
    mem.set_write_observer(watch.clone()).unwrap();
    let w = Walker::new(X86Paging::long_mode(0x1000)).unwrap();
    let mut cache = WalkCache::new();
    cache.attach_watch(watch.clone());
    let t = |cache: &mut WalkCache, opts| {
        w.translate_with(
            &mem,
            GuestVirtAddr(0x40_0010),
            Access::write(),
            opts,
            Some(cache),
        )
        .unwrap()
    };

    assert_eq!(t(&mut cache, WalkOptions::default()).memory_refs, 4);
    assert_eq!(t(&mut cache, WalkOptions::default()).memory_refs, 0);

    // Accessed/dirty updates are the walker's own: no flush.
    let ad = WalkOptions {
        set_accessed_dirty: true,
    };
    assert!(t(&mut cache, ad).memory_refs > 0);
    assert_eq!(t(&mut cache, ad).memory_refs, 0);
    assert_eq!(cache.stats().watch_flushes, 0);

    // A data write elsewhere: no flush (the filter knows the table pages).
    mem.write_obj(GuestPhysAddr(0x9000), 1u64).unwrap();
    assert_eq!(t(&mut cache, WalkOptions::default()).memory_refs, 0);

    // The guest remaps the page through the library: the next translation
    // sees it, with no explicit invalidation.
    mem.write_obj(GuestPhysAddr(0x4000), 0x7003u64).unwrap();
    let after = t(&mut cache, WalkOptions::default());
    assert_eq!(after.gpa, GuestPhysAddr(0x7010));
    assert_eq!(cache.stats().watch_flushes, 1);

    // Without the watch, the cache keeps the stale translation (as a TLB
    // does until INVLPG).
    let mut plain = WalkCache::new();
    assert_eq!(
        t(&mut plain, WalkOptions::default()).gpa,
        GuestPhysAddr(0x7010)
    );
    mem.write_obj(GuestPhysAddr(0x4000), 0x8003u64).unwrap();
    assert_eq!(
        t(&mut plain, WalkOptions::default()).gpa,
        GuestPhysAddr(0x7010)
    );
    plain.invalidate_page(w.space(), GuestVirtAddr(0x40_0000));
    assert_eq!(
        t(&mut plain, WalkOptions::default()).gpa,
        GuestPhysAddr(0x8010)
    );
}

#[test]
fn one_observer_per_memory() {
    let mem = guest();
    mem.set_write_observer(TableWatch::new()).unwrap();
    assert!(mem.set_write_observer(TableWatch::new()).is_err());
}

#[test]
fn cached_rights_follow_wp_and_keys() {
    use pagefold::paging::x86::{CR0_WP, CR4_PKE};
    // The page at 0x40_0000 is read-only (entry bit 1 clear at the leaf).
    let mem = guest();
    mem.write_obj(GuestPhysAddr(0x4000), 0x5001u64 | 4).unwrap();
    let wp_on = X86Paging::long_mode(0x1000);
    let mut wp_off = wp_on;
    wp_off.cr0 &= !CR0_WP;
    let on = Walker::new(wp_on).unwrap();
    let off = Walker::new(wp_off).unwrap();
    assert_eq!(
        on.space(),
        off.space(),
        "CR0.WP is not part of the space tag"
    );
    let mut cache = WalkCache::new();
    let opts = WalkOptions::default();
    // CR0.WP=0: a supervisor write to a read-only page is allowed; cached.
    off.translate_with(
        &mem,
        GuestVirtAddr(0x40_0000),
        Access::write(),
        opts,
        Some(&mut cache),
    )
    .unwrap();
    assert_eq!(
        off.translate_with(
            &mem,
            GuestVirtAddr(0x40_0000),
            Access::write(),
            opts,
            Some(&mut cache)
        )
        .unwrap()
        .memory_refs,
        0
    );
    // CR0.WP=1 on the same cache: the cached rights must not answer.
    let f = on
        .translate_with(
            &mem,
            GuestVirtAddr(0x40_0000),
            Access::write(),
            opts,
            Some(&mut cache),
        )
        .unwrap_err();
    assert_eq!(f.reason, pagefold::paging::FaultReason::Permission);
    // And back: allowed again.
    off.translate_with(
        &mem,
        GuestVirtAddr(0x40_0000),
        Access::write(),
        opts,
        Some(&mut cache),
    )
    .unwrap();

    // Protection keys: PKRU write-disable for key 0 denies a user write.
    let mut keys = X86Paging::long_mode(0x1000);
    keys.cr4 |= CR4_PKE;
    // User pages all the way down.
    for (at, v) in [
        (0x1000u64, 0x2007u64),
        (0x2000, 0x3007),
        (0x3010, 0x4007),
        (0x4000, 0x5007),
    ] {
        mem.write_obj(GuestPhysAddr(at), v).unwrap();
    }
    cache.invalidate_all();
    let open = Walker::new(keys).unwrap();
    keys.pkru = 0b10;
    let closed = Walker::new(keys).unwrap();
    let user_write = Access::write().user();
    open.translate_with(
        &mem,
        GuestVirtAddr(0x40_0000),
        user_write,
        opts,
        Some(&mut cache),
    )
    .unwrap();
    let f = closed
        .translate_with(
            &mem,
            GuestVirtAddr(0x40_0000),
            user_write,
            opts,
            Some(&mut cache),
        )
        .unwrap_err();
    assert_eq!(
        f.reason,
        pagefold::paging::FaultReason::ProtectionKey { key: 0 }
    );
}

#[test]
fn walkers_that_decode_differently_never_share_cache_entries() {
    use pagefold::paging::{EptConfig, FaultCode, SecondLevel};
    // Guest tables as in `guest()`, now mapping 0x40_0000 to guest-physical
    // 0x40_0000; an EPT (PML4 0x8000, PDPT 0x9000, PD 0xa000) of 2 MiB pages:
    // the first, holding the guest tables, read/write/execute; the one at
    // 4 MiB execute-only, which is fine where the CPU supports execute-only
    // entries and a misconfiguration where it does not.
    let mem = guest();
    mem.write_obj(GuestPhysAddr(0x4000), 0x40_0003u64).unwrap();
    mem.write_obj(GuestPhysAddr(0x8000), 0x9007u64).unwrap();
    mem.write_obj(GuestPhysAddr(0x9000), 0xa007u64).unwrap();
    mem.write_obj(GuestPhysAddr(0xa000), 0x7u64 | (6 << 3) | 0x80)
        .unwrap();
    mem.write_obj(GuestPhysAddr(0xa010), 0x40_0004u64 | (6 << 3) | 0x80)
        .unwrap();
    let with = |execute_only| {
        let mut ept = EptConfig::four_level(GuestPhysAddr(0x8000), false);
        ept.execute_only = execute_only;
        Walker::new(X86Paging::long_mode(0x1000))
            .and_then(|w| w.with_second_level(SecondLevel::Ept(ept)))
            .unwrap()
    };
    let (xo, no_xo) = (with(true), with(false));
    let mut cache = WalkCache::new();
    let opts = WalkOptions::default();
    let t = xo
        .translate_with(
            &mem,
            GuestVirtAddr(0x40_0000),
            Access::fetch(),
            opts,
            Some(&mut cache),
        )
        .unwrap();
    assert_eq!(t.pa, GuestPhysAddr(0x40_0000));
    assert_eq!(
        xo.translate_with(
            &mem,
            GuestVirtAddr(0x40_0000),
            Access::fetch(),
            opts,
            Some(&mut cache)
        )
        .unwrap()
        .memory_refs,
        0,
        "cached for the walker that filled it"
    );
    // Same CR3, same EPTP, one capability apart: no cached answer.
    let f = no_xo
        .translate_with(
            &mem,
            GuestVirtAddr(0x40_0000),
            Access::fetch(),
            opts,
            Some(&mut cache),
        )
        .unwrap_err();
    assert_eq!(f.code, FaultCode::EptMisconfig, "{f}");
}

#[test]
fn attaching_a_watch_drops_what_was_cached_before() {
    // Tables read before the watch was attached are unknown to it, so a
    // cache keeping their translations could never see them change.
    let mem = guest();
    let watch = TableWatch::new();
    mem.set_write_observer(watch.clone()).unwrap();
    let w = Walker::new(X86Paging::long_mode(0x1000)).unwrap();
    let mut cache = WalkCache::new();
    let t = |c: &mut WalkCache| {
        w.translate_with(
            &mem,
            GuestVirtAddr(0x40_0010),
            Access::read(),
            WalkOptions::default(),
            Some(c),
        )
        .unwrap()
        .gpa
    };
    assert_eq!(t(&mut cache), GuestPhysAddr(0x5010));
    cache.attach_watch(watch.clone());
    mem.write_obj(GuestPhysAddr(0x4000), 0x7003u64).unwrap();
    assert_eq!(t(&mut cache), GuestPhysAddr(0x7010));
}

/// Guest memory whose first read of `racy` is followed, at once, by a
/// write of `new` there through the library: a vCPU thread's write landing
/// between a walk's read of an entry and the cache's insertion.
struct Racy<'a> {
    mem: &'a GuestMemory,
    racy: u64,
    new: u64,
    fired: std::cell::Cell<bool>,
}

impl PhysMemory for Racy<'_> {
    fn read_u64(&self, pa: u64) -> Option<u64> {
        let v = self.mem.read_u64(pa);
        if pa == self.racy && !self.fired.replace(true) {
            self.mem.write_obj(GuestPhysAddr(pa), self.new).unwrap();
        }
        v
    }
    fn read_u32(&self, pa: u64) -> Option<u32> {
        self.mem.read_u32(pa)
    }
    fn compare_exchange_u64(&self, pa: u64, old: u64, new: u64) -> Option<Result<(), u64>> {
        self.mem.compare_exchange_u64(pa, old, new)
    }
    fn compare_exchange_u32(&self, pa: u64, old: u32, new: u32) -> Option<Result<(), u32>> {
        self.mem.compare_exchange_u32(pa, old, new)
    }
    fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), u64> {
        self.mem.read_bytes(pa, buf)
    }
    fn write_bytes(&self, pa: u64, data: &[u8]) -> Result<(), u64> {
        self.mem.write_bytes(pa, data)
    }
}

#[test]
fn a_table_write_racing_a_walk_is_never_cached_stale() {
    // The racing write lands after the walk read the entry, before anything
    // was cached: that translation may give either page, but the next ones
    // through the cache must see the write (it was told to the watch).
    // Raced: the leaf itself, and the PDE (pointed at another page table
    // whose entry maps 0x7000).
    for (racy, new) in [(0x4000u64, 0x7003u64), (0x3000 + 2 * 8, 0x9003)] {
        let mem = guest();
        mem.write_obj(GuestPhysAddr(0x9000), 0x7003u64).unwrap();
        let watch = TableWatch::new();
        mem.set_write_observer(watch.clone()).unwrap();
        let w = Walker::new(X86Paging::long_mode(0x1000)).unwrap();
        let mut cache = WalkCache::new();
        cache.attach_watch(watch.clone());
        let racing = Racy {
            mem: &mem,
            racy,
            new,
            fired: std::cell::Cell::new(false),
        };
        let opts = WalkOptions::default();
        let first = w
            .translate_with(
                &racing,
                GuestVirtAddr(0x40_0010),
                Access::read(),
                opts,
                Some(&mut cache),
            )
            .unwrap();
        assert!(racing.fired.get());
        assert!(first.gpa == GuestPhysAddr(0x5010) || first.gpa == GuestPhysAddr(0x7010));
        for _ in 0..3 {
            let later = w
                .translate_with(
                    &mem,
                    GuestVirtAddr(0x40_0010),
                    Access::read(),
                    opts,
                    Some(&mut cache),
                )
                .unwrap();
            assert_eq!(
                later.gpa,
                GuestPhysAddr(0x7010),
                "entry {racy:#x}: a racing write was lost"
            );
            assert_eq!(
                cache
                    .bind(&w)
                    .translate_pa(&mem, GuestVirtAddr(0x40_0010), Access::read(), opts),
                Ok(GuestPhysAddr(0x7010))
            );
        }
    }
}

#[test]
fn invlpg_drops_a_global_page_in_every_address_space() {
    // Two processes (PCIDs 1 and 2) share the kernel's tables; the kernel
    // page is global. INVLPG in one drops the page for both (SDM 4.10.4.1):
    // the other, switched to with a no-flush MOV CR3, sees the new entry.
    let mem = guest();
    mem.write_obj(GuestPhysAddr(0x4000), 0x5103u64).unwrap(); // G
    mem.write_obj(GuestPhysAddr(0x8000), 0x2003u64).unwrap(); // B's PML4E
    let mut ra = X86Paging::long_mode(0x1001);
    ra.cr4 |= CR4_PCIDE | CR4_PGE;
    let mut rb = X86Paging::long_mode(0x8002);
    rb.cr4 |= CR4_PCIDE | CR4_PGE;
    let (a, b) = (Walker::new(ra).unwrap(), Walker::new(rb).unwrap());
    assert_ne!(a.space(), b.space());
    let mut cache = WalkCache::new();
    let t = |w: &Walker, c: &mut WalkCache| {
        w.translate_with(
            &mem,
            GuestVirtAddr(0x40_0010),
            Access::read(),
            WalkOptions::default(),
            Some(c),
        )
        .unwrap()
        .gpa
    };
    assert_eq!(t(&a, &mut cache), GuestPhysAddr(0x5010));
    assert_eq!(t(&b, &mut cache), GuestPhysAddr(0x5010));
    mem.write_obj(GuestPhysAddr(0x4000), 0x7103u64).unwrap();
    cache.invalidate_page(a.space(), GuestVirtAddr(0x40_0010));
    assert_eq!(t(&b, &mut cache), GuestPhysAddr(0x7010));
    assert_eq!(t(&a, &mut cache), GuestPhysAddr(0x7010));
    // The lean path agrees.
    assert_eq!(
        cache.bind(&b).translate_pa(
            &mem,
            GuestVirtAddr(0x40_0010),
            Access::read(),
            WalkOptions::default()
        ),
        Ok(GuestPhysAddr(0x7010))
    );
}

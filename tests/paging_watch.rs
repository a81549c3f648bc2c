//! The walk cache's page-table watch: a library write to a page-table page
//! invalidates every attached cache; accessed/dirty updates by the walker
//! and writes elsewhere do not.

#![allow(clippy::unwrap_used)]

use pagefold::{
    paging::{Access, TableWatch, WalkCache, WalkOptions, Walker, X86Paging},
    GuestMemory, GuestPhysAddr,
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
        w.translate_with(&mem, 0x40_0010, Access::write(), opts, Some(cache))
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
    assert_eq!(after.gpa, 0x7010);
    assert_eq!(cache.stats().watch_flushes, 1);

    // Without the watch, the cache keeps the stale translation (as a TLB
    // does until INVLPG).
    let mut plain = WalkCache::new();
    assert_eq!(t(&mut plain, WalkOptions::default()).gpa, 0x7010);
    mem.write_obj(GuestPhysAddr(0x4000), 0x8003u64).unwrap();
    assert_eq!(t(&mut plain, WalkOptions::default()).gpa, 0x7010);
    plain.invalidate_page(w.space(), 0x40_0000);
    assert_eq!(t(&mut plain, WalkOptions::default()).gpa, 0x8010);
}

#[test]
fn one_observer_per_memory() {
    let mem = guest();
    mem.set_write_observer(TableWatch::new()).unwrap();
    assert!(mem.set_write_observer(TableWatch::new()).is_err());
}

//! `merge_now` in batches, and resolving write faults while a merged
//! stretch is taken back (found by review of the batched pass).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{DedupHost, FrameStore, GuestPhysAddr, VmOptions, PAGE_SIZE};

mod common;
use common::small_vms::{blank, put};

/// One content on page 0 (the first batch) and on pages 33,000 and 33,001
/// (a later one): all three end on one frame, as in one list of every page
/// (found by review: the earlier page was left out once the later ones
/// formed a group).
#[test]
fn a_page_of_an_earlier_batch_joins_a_later_batchs_group() {
    let store = Arc::new(FrameStore::memfd().unwrap());
    let m = blank(&store, 40_000);
    for i in [0, 33_000, 33_001] {
        put(&m, i, 7);
    }
    // Two unique pages so that nothing else interferes.
    put(&m, 10, 1);
    put(&m, 34_000, 2);
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    host.register(Arc::clone(&m), VmOptions::default()).unwrap();
    let r = host.merge_now().unwrap();
    let s = host.stats().unwrap();
    let _ = r;
    assert_eq!(s.pages_shared, 1, "{s:?}");
    assert_eq!(s.pages_sharing, 2, "all three pages of one content: {s:?}");
}

/// With the budget spent, a resolve takes part of the merged stretch back,
/// a piece at a time from its far end, so the page asked for goes back
/// last; a second resolve of the same page meanwhile must not count it
/// too (found by review: both said "merged", two COW breaks).
#[test]
fn racing_resolves_of_one_page_in_a_stretch_count_one_break() {
    let n = 4096;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let a = blank(&store, n);
    let b = blank(&store, n + 16);
    for i in 0..n {
        put(&a, i, 5000 + i as u64);
        put(&b, i, 5000 + i as u64);
    }
    for i in n..n + 16 {
        put(&b, i, 900_000 + i as u64); // b's own pages after the stretch
    }
    let host = Arc::new(DedupHost::new(Arc::clone(&store)).unwrap());
    host.register(Arc::clone(&a), VmOptions::default()).unwrap();
    let vb = host.register(Arc::clone(&b), VmOptions::default()).unwrap();
    host.merge_now().unwrap();
    let before = host.stats().unwrap().cow_breaks;
    store.map_budget().set_headroom(u64::MAX); // nothing left to split with
    let t = 2;
    let barrier = Arc::new(std::sync::Barrier::new(t));
    let threads: Vec<_> = (0..t)
        .map(|_| {
            let host = Arc::clone(&host);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                host.resolve_write_fault(vb, GuestPhysAddr(5 * PAGE_SIZE as u64))
                    .unwrap()
            })
        })
        .collect();
    let said: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let s = host.stats().unwrap();
    assert_eq!(
        said.iter().filter(|m| **m).count(),
        1,
        "one 'merged' for one page"
    );
    assert_eq!(s.cow_breaks - before, 1, "one COW break for one page");
}

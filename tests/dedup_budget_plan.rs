//! A mapping budget too small for every merge buys the merges that save
//! most, each new shared frame with all its pages or none (found from
//! outside: merging in page order gave the budget to the first VM's
//! canonical pages, whose duplicates in later VMs never got a mapping, and
//! the frames saved nothing). Alone in its binary: it sets the budget from
//! the process's mapping count.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{DedupHost, DedupOptions, FrameStore, VmOptions};

mod common;
use common::small_vms::{self, blank, put, vm};

fn maps() -> u64 {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count() as u64
}

/// The budget is the process's: one test at a time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A host whose budget is about `budget` mappings now.
fn host_with_budget(store: &Arc<FrameStore>, budget: u64) -> DedupHost {
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    DedupHost::with_options(
        Arc::clone(store),
        DedupOptions {
            map_headroom: max - maps() - budget,
        },
    )
    .unwrap()
}

/// Four clones with a page of their own every 20 pages: with mappings for
/// about a tenth of the runs, every shared frame made is mapped by all four
/// clones (before: the budget went to VM 0, frames with one page each).
#[test]
fn clones_get_whole_units_not_canonical_pages() {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let n = 4000;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms: Vec<_> = (0..4)
        .map(|v| {
            vm(&store, n, |i| {
                if i % 20 == 19 {
                    (v * 64 + 7) as u8 // each clone's own page
                } else {
                    (i % 200) as u8 + 1
                }
            })
        })
        .collect();
    let host = host_with_budget(&store, 400);
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    let r = host.merge_now().unwrap();
    let s = host.stats().unwrap();
    assert!(r.map_limit > 0, "the budget is short: {r:?}");
    assert!(s.pages_shared > 0, "something merged: {s:?}");
    // Every frame has its four pages: three saved per frame.
    assert_eq!(s.pages_sharing, 3 * s.pages_shared, "{s:?}");
    // 400 mappings, 8 per unit of 19 pages in 4 clones: about 50 units.
    assert!(s.pages_sharing >= 40 * 3 * 19, "{s:?}");
}

/// Scattered pairs (every 10th page repeats a page far away): each pair is
/// merged whole or not at all, so no shared frame is left with one page.
#[test]
fn scattered_pairs_merge_whole_or_not_at_all() {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let n = 8000;
    let store = Arc::new(FrameStore::memfd().unwrap());
    // Page i (i % 10 == 0) repeats page (i + n / 2) % n, which is not
    // itself a repeat; everything else is distinct (numbered).
    let mem = vm(&store, n, |i| (i % 251) as u8);
    for i in (0..n).step_by(10) {
        let j = (i + n / 2 + 5) % n;
        let mut page = [0u8; pagefold::PAGE_SIZE];
        mem.read(small_vms::gpa(j), &mut page).unwrap();
        mem.write(small_vms::gpa(i), &page).unwrap();
    }
    let host = host_with_budget(&store, 200);
    host.register(Arc::clone(&mem), VmOptions::default())
        .unwrap();
    let r = host.merge_now().unwrap();
    let s = host.stats().unwrap();
    assert!(r.map_limit > 0, "the budget is short: {r:?}");
    assert!(s.pages_shared > 0, "{s:?}");
    assert_eq!(s.pages_sharing, s.pages_shared, "pairs only: {s:?}");
    // 200 mappings at 4 a pair.
    assert!(s.pages_shared >= 40, "{s:?}");
}

/// The first batch: 200 scattered pairs (4 mappings a page saved); a later
/// one: a run of 2,000 pages repeated once (4 mappings for 2,000 pages). A
/// budget of 200 mappings buys the long run (found by review: the first
/// batch of a pass spent it all on pairs).
#[test]
fn a_later_batchs_better_units_get_their_share() {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let store = Arc::new(FrameStore::memfd().unwrap());
    let m = blank(&store, 65_536);
    for i in 0..200usize {
        put(&m, i * 10, 1000 + i as u64);
        put(&m, i * 10 + 5, 1000 + i as u64);
    }
    for k in 0..2000usize {
        put(&m, 32_768 + k, 100_000 + k as u64);
        put(&m, 40_000 + k, 100_000 + k as u64);
    }
    let host = host_with_budget(&store, 200);
    host.register(Arc::clone(&m), VmOptions::default()).unwrap();
    let r = host.merge_now().unwrap();
    let s = host.stats().unwrap();
    let _ = r;
    assert!(
        s.pages_sharing >= 2000,
        "the long run was worth most: {s:?}"
    );
}

/// Four clones of 8,192 distinct pages: one run per clone, one unit. A run
/// longer than a merge window (2,048 pages) is remapped once per window;
/// the remaps that continue a run join its mapping and cost nothing, as the
/// plan counts (found by review: each was charged 2, and with 20 mappings
/// the merge spent them on VM 0's run, leaving frames with one page).
#[test]
fn a_run_longer_than_a_window_costs_its_plan_once() {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let n = 8192;
    let store = Arc::new(FrameStore::memfd().unwrap());
    let vms: Vec<_> = (0..4)
        .map(|_| {
            let m = blank(&store, n);
            for i in 0..n {
                put(&m, i, 70_000 + i as u64);
            }
            m
        })
        .collect();
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default()).unwrap();
    }
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    store.map_budget().set_headroom(max - maps() - 20);
    let r = host.merge_now().unwrap();
    let s = host.stats().unwrap();
    let _ = r;
    assert_eq!(
        s.pages_sharing,
        3 * s.pages_shared,
        "every frame has its four pages: {s:?}"
    );
}

/// A copy of 3,000 pages one batch later: the deferred earlier pages are
/// set aside two mappings a run, as the plan counts them, so the batch's
/// own pages get theirs, one pass does it all, and the budget claims no
/// mapping it does not have (found by review: two a page were set aside,
/// more than was left, and given back in full).
#[test]
fn deferred_pages_are_set_aside_by_the_run() {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let store = Arc::new(FrameStore::memfd().unwrap());
    let n = 40_000;
    let m = blank(&store, n);
    for i in 0..3000 {
        put(&m, i, 1_000 + i as u64);
        put(&m, 20_000 + i, 1_000 + i as u64);
    }
    let host = host_with_budget(&store, 2000);
    host.register(Arc::clone(&m), VmOptions::default()).unwrap();
    let r = host.merge_now().unwrap();
    let claimed = store.map_budget().left();
    store.map_budget().refresh();
    let real = store.map_budget().left();
    let s = host.stats().unwrap();
    assert_eq!(s.pages_sharing, 3000, "{s:?}");
    assert_eq!(r.pages_scanned, n as u64, "one pass: {r:?}");
    assert!(claimed <= real + 16, "claimed {claimed}, real {real}");
}

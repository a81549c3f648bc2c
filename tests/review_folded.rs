//! Review of the folded restore (`snapshot/folded.rs`, `dedup/fold_in.rs`):
//! each test a defect found by reading the code, shown end to end on real
//! memfd frames.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use pagefold::{
    frames::StoreOptions,
    snapshot::{restore_folded_with, FoldLayout},
    DedupHost, FrameStore, GuestPhysAddr, VmOptions, PAGE_SIZE,
};

mod common;
use common::{folded::*, temp_dir::TempDir};

const PAGE: u64 = PAGE_SIZE as u64;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The partial image a short budget chose for eight planned clones (and
/// the count of clones restored) outlived every one of those clones: a
/// clone restored after all of them were unregistered still mapped a new
/// partial image of the old plan, storing the snapshot's duplicates again,
/// where a host that never saw the old clones maps a frame per content
/// within the same budget. And one entry per snapshot ever restored stayed
/// in the host for good.
#[test]
fn a_plan_ends_with_its_last_clone() {
    let _s = serial();
    let dir = TempDir::new("plan");
    let (src, _) = source(13);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    // What one clone maps with this budget on a host that saw no other.
    let (fresh_store, fresh) = host_with_mappings(100);
    let alone = restore_folded_with(&fresh, VmOptions::default(), &snap, &planned(1)).unwrap();
    let alone_bytes = fresh_store.allocated_bytes().unwrap();
    assert_eq!(image(&alone.memory), want);
    drop(alone);
    drop(fresh);

    let (store, host) = host_with_mappings(100);
    let clones: Vec<_> = (0..8)
        .map(|_| restore_folded_with(&host, VmOptions::default(), &snap, &planned(8)).unwrap())
        .collect();
    assert!(
        clones[0].stats.image && clones[0].stats.remaps > 2,
        "{:?}",
        clones[0].stats
    );
    for c in clones {
        let mem = host.unregister(c.vm).unwrap();
        assert_eq!(image(&mem), want);
    }
    assert_eq!(store.allocated_bytes().unwrap(), 0, "nothing left");
    let next = restore_folded_with(&host, VmOptions::default(), &snap, &planned(1)).unwrap();
    assert_eq!(image(&next.memory), want);
    assert_eq!(
        store.allocated_bytes().unwrap(),
        alone_bytes,
        "a new plan, as on a fresh host: {:?}",
        next.stats
    );
}

/// On a host store that populates its mappings (`MAP_POPULATE`), a clone
/// restored folded by contents kept a page of memory for each of its zero
/// pages: their own frames were filled by the populate, and only marked
/// released, not punched. The clone's memory is the distinct contents
/// alone, as on a store that does not populate.
#[test]
fn zero_pages_hold_no_memory_on_a_populating_store() {
    let _s = serial();
    let dir = TempDir::new("populate");
    let (src, _) = source(14);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    let store = Arc::new(
        FrameStore::new(StoreOptions {
            populate: true,
            ..StoreOptions::default()
        })
        .unwrap(),
    );
    let host = DedupHost::new(Arc::clone(&store)).unwrap();
    let c = restore_folded_with(
        &host,
        VmOptions::default(),
        &snap,
        &laid(FoldLayout::Contents),
    )
    .unwrap();
    let s = c.stats;
    assert_eq!((s.copied_pages, s.zero_pages), (0, 24), "{s:?}");
    assert_eq!(
        store.allocated_bytes().unwrap(),
        s.contents * PAGE,
        "the contents alone: {s:?}"
    );
    assert_eq!(image(&c.memory), want);
    // Copied pages' zero pages too: an excluded region is copied.
    let e = restore_folded_with(
        &host,
        VmOptions {
            exclude: vec![GuestPhysAddr(0x10_0000)],
            ..VmOptions::default()
        },
        &snap,
        &laid(FoldLayout::Contents),
    )
    .unwrap();
    let copied = e.stats.copied_pages;
    assert!(copied > 0, "{:?}", e.stats);
    assert_eq!(
        store.allocated_bytes().unwrap(),
        (s.contents + copied) * PAGE,
        "and the pages copied: {:?}",
        e.stats
    );
    assert_eq!(image(&e.memory), want);
}

/// The first clone into an empty domain finds nothing there: a partial
/// image's contents mapped by content that the restore had just read into
/// its own new image were counted as contents the domain held already.
#[test]
fn a_new_partial_image_is_not_counted_as_found() {
    let _s = serial();
    let dir = TempDir::new("found");
    let (src, _) = source(13);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host_with_mappings(100);
    let first = restore_folded_with(&host, VmOptions::default(), &snap, &planned(8)).unwrap();
    let s = first.stats;
    assert!(s.image && s.remaps > 2, "a partial image: {s:?}");
    assert_eq!(s.contents_found, 0, "the domain held nothing: {s:?}");
    // What it read is what the store holds (before a read of a zero page
    // mapped onto the image gives a hole of it a page).
    assert_eq!(
        store.allocated_bytes().unwrap(),
        s.contents_read * PAGE,
        "{s:?}"
    );
    assert_eq!(image(&first.memory), want);
}

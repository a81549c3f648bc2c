//! Review of `restore_folded_lazy` onto a published image (the whole-image
//! branch), on real memfd memory, the real userfaultfd and a real dedup
//! host: a clone mapping the image at once is registered as an ordinary VM
//! while the regions left off the image still arrive; what a merge pass
//! meanwhile, its stats, and dropping it before `wait` leave.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use pagefold::{
    dedup::VmOptions,
    snapshot::{restore_folded_lazy, LazyFoldOptions},
    PAGE_SIZE,
};

mod common;
use common::{
    folded::{host, image, layout, nonzero, saved, source},
    lazy::gated_options,
    temp_dir::TempDir,
};

fn excluding_second() -> VmOptions {
    VmOptions {
        exclude: vec![layout()[1].0],
        ..VmOptions::default()
    }
}

/// Checked sound: clone A excluding the second region arrives and
/// publishes the image of the first; clone B (same exclusion) maps it at
/// once and only the second region arrives, into its own frames. A merge
/// pass while that region is held back breaks nothing; before a page of
/// the second region arrives `pages_done` counts the first region's
/// pages; `wait`'s stats count the first region as found and the second
/// as fetched, zero pages of both once; every page reads as the snapshot
/// has it, after a second pass too.
#[test]
fn a_clone_excluding_a_region_of_a_published_image_counts_and_survives_a_pass() {
    let dir = TempDir::new("review-lazy-folded2-exclude");
    let (orig, _) = source(21);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (store, host) = host();
    let a = restore_folded_lazy(
        &host,
        excluding_second(),
        Arc::clone(&snap),
        LazyFoldOptions::default(),
    )
    .unwrap();
    let a_mem = Arc::clone(&a.memory);
    a.wait().unwrap();
    assert!(image(&a_mem) == want);
    let before = store.allocated_bytes().unwrap();
    let gate = Arc::new(AtomicBool::new(false));
    let b = restore_folded_lazy(
        &host,
        excluding_second(),
        Arc::clone(&snap),
        gated_options(&gate),
    )
    .unwrap();
    let b_mem = Arc::clone(&b.memory);
    let first = (layout()[0].1 / PAGE_SIZE as u64) as usize;
    // The first region is there; the fetch may have placed a page or
    // two of the second before its hook held it.
    let done = b.pages_done();
    assert!(done >= first as u64 && done <= want.len() as u64, "{done}");
    // A pass while B's second region is held back.
    let pass = host.merge_now();
    gate.store(true, Ordering::Release);
    let stats = b.wait().unwrap();
    pass.unwrap();
    let in_first = nonzero(&want[..first]) as u64;
    let in_second = nonzero(&want[first..]) as u64;
    // B's own second region (its stored pages), nothing more of the
    // first. Measured before reading B: a read of a zero page through
    // its shmem mapping allocates it.
    let after = store.allocated_bytes().unwrap();
    assert_eq!(after, before + in_second * PAGE_SIZE as u64);
    let zeros = want.len() as u64 - in_first - in_second;
    assert_eq!(stats.pages, want.len() as u64, "{stats:?}");
    assert_eq!(stats.found, in_first, "{stats:?}");
    assert_eq!(stats.fetched + stats.on_fault, in_second, "{stats:?}");
    assert_eq!(stats.zero_pages, zeros, "{stats:?}");
    assert!(image(&b_mem) == want, "B after the pass");
    host.merge_now().unwrap();
    assert!(image(&b_mem) == want, "B after a second pass");
    assert!(image(&a_mem) == want, "A after the passes");
}

/// Checked sound: B (as above) dropped before `wait` while its second
/// region is held back: it is out of the host, its memory discarded, the
/// image's pins and references it held gone (the store is back where it
/// was), and a clone C restored afterwards maps the image whole.
#[test]
fn a_clone_of_a_published_image_dropped_before_wait_is_taken_out() {
    let dir = TempDir::new("review-lazy-folded2-drop");
    let (orig, _) = source(22);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (store, host) = host();
    for options in [excluding_second(), VmOptions::default()] {
        let a = restore_folded_lazy(
            &host,
            options.clone(),
            Arc::clone(&snap),
            LazyFoldOptions::default(),
        )
        .unwrap();
        let a_mem = Arc::clone(&a.memory);
        a.wait().unwrap();
        let vms = host.stats().unwrap();
        let before = store.allocated_bytes().unwrap();
        let gate = Arc::new(AtomicBool::new(false));
        let b = restore_folded_lazy(
            &host,
            options.clone(),
            Arc::clone(&snap),
            gated_options(&gate),
        )
        .unwrap();
        let b_vm = b.vm;
        let b_mem = Arc::clone(&b.memory);
        drop(b);
        gate.store(true, Ordering::Release);
        assert!(host.memory(b_vm).is_err(), "B is out of the host");
        let after = host.stats().unwrap();
        assert_eq!(
            (vms.pages_total, vms.pages_shared, vms.pages_sharing),
            (after.pages_total, after.pages_shared, after.pages_sharing),
            "{options:?}"
        );
        assert!(
            image(&b_mem).iter().all(|p| p.iter().all(|&x| x == 0)),
            "B's memory is discarded"
        );
        host.merge_now().unwrap();
        assert_eq!(store.allocated_bytes().unwrap(), before, "{options:?}");
        let c = restore_folded_lazy(
            &host,
            options,
            Arc::clone(&snap),
            LazyFoldOptions::default(),
        )
        .unwrap();
        let c_mem = Arc::clone(&c.memory);
        c.wait().unwrap();
        assert!(image(&c_mem) == want);
        assert!(image(&a_mem) == want);
    }
}

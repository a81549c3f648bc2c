//! Folded restore end to end on real memfd frames: VMs restored from one
//! snapshot (or from several with content in common) share each content's
//! frame from the first moment, and the kernel's count of the store's
//! memory is the distinct content, not a copy per VM; every page reads
//! back as saved; writes copy on write into one VM alone and none is lost
//! while merge passes and unmerges run; a damaged snapshot is a typed
//! error that leaves the host as it was; merge passes, reconciliation and
//! unregistering work on restored VMs; domains share nothing; and with no
//! mapping budget left the pages are copied instead.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use pagefold::{
    dedup::DedupOptions,
    snapshot::{
        restore_folded, restore_folded_with, restore_into, save, save_incremental, FoldLayout,
        FoldOptions, FoldedRestore, Part, SaveOptions, SnapshotError, SnapshotReader,
    },
    DedupHost, DirtyRun, DomainId, FrameStore, GuestMemory, GuestPhysAddr, RegionSet, VmOptions,
    PAGE_SIZE,
};

mod common;
use common::{folded::*, temp_dir::TempDir};

const PAGE: u64 = PAGE_SIZE as u64;

/// One test at a time: one reads the process's count of kernel mappings,
/// which the threads of others would move.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn four_clones_share_every_content_from_the_first_moment() {
    let _serial = serial();
    let dir = TempDir::new("folded-four");
    let (src, distinct) = source(1);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host();
    let clones: Vec<FoldedRestore> = (0..4)
        .map(|_| restore_folded(&host, VmOptions::default(), &snap).unwrap())
        .collect();
    let full = nonzero(&want);
    for (k, c) in clones.iter().enumerate() {
        assert_eq!(image(&c.memory), want, "clone {k} reads as saved");
        let s = c.stats;
        assert_eq!(s.pages, want.len() as u64);
        assert_eq!(s.zero_pages as usize, want.len() - full);
        assert_eq!(
            s.shared_pages as usize, full,
            "clone {k}: every page shared"
        );
        assert_eq!(s.copied_pages, 0);
        assert_eq!(s.contents as usize, distinct);
        // The first read every content; the others found them all.
        let read = if k == 0 { distinct } else { 0 };
        assert_eq!(s.contents_read as usize, read, "clone {k}");
        assert_eq!(s.contents_found as usize, distinct - read, "clone {k}");
    }
    // The kernel holds the distinct content once: own frames are holes.
    assert_eq!(
        store.allocated_bytes().unwrap(),
        distinct as u64 * PAGE,
        "memory of the store: the distinct content, not four copies"
    );
    let st = host.stats().unwrap();
    assert_eq!(st.pages_shared as usize, distinct);
    assert_eq!(st.pages_sharing as usize, 4 * full - distinct);
    for c in &clones {
        let vs = host.vm_stats(c.vm).unwrap();
        assert_eq!(vs.pages_merged as usize, full);
    }
    // Reading every page allocated nothing.
    assert_eq!(store.allocated_bytes().unwrap(), distinct as u64 * PAGE);
}

#[test]
fn writes_copy_on_write_into_one_vm_and_none_is_lost() {
    let _serial = serial();
    let dir = TempDir::new("folded-writes");
    let (src, distinct) = source(2);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host();
    let a = restore_folded(&host, VmOptions::default(), &snap).unwrap();
    let b = restore_folded(&host, VmOptions::default(), &snap).unwrap();
    let mut model_a = want.clone();
    let mut model_b = want.clone();
    // A library write to a shared page of A, a raw write (a vCPU's or a
    // device's) to a shared page of B, a write to a zero page of A.
    let shared_page = 3usize;
    a.memory
        .write(GuestPhysAddr(shared_page as u64 * PAGE + 100), b"hello")
        .unwrap();
    model_a[shared_page][100..105].copy_from_slice(b"hello");
    let hva = b.memory.host_address(GuestPhysAddr(5 * PAGE)).unwrap();
    // SAFETY: page 5 of B's first region lies inside its live mapping.
    unsafe { std::ptr::write_volatile(hva.0 as *mut u64, 0xdead_beef) };
    model_b[5][..8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
    a.memory.write_obj(GuestPhysAddr(0), 42u64).unwrap();
    model_a[0][..8].copy_from_slice(&42u64.to_le_bytes());
    assert_eq!(image(&a.memory), model_a);
    assert_eq!(image(&b.memory), model_b);
    let st = host.stats().unwrap();
    assert_eq!(st.cow_breaks, 2, "the kernel's two copies are noticed");
    assert_eq!(st.pages_shared as usize, distinct, "no frame freed early");

    // Writers on every page of A while merge passes and unmerges run: no
    // write is lost.
    let stop = &AtomicBool::new(false);
    let gpas = &pages(&a.memory);
    let mem_a = &a.memory;
    std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for (i, &g) in gpas.iter().enumerate().step_by(3) {
                    mem_a.write_obj(GuestPhysAddr(g.0 + 64), round).unwrap();
                    model_a[i][64..72].copy_from_slice(&round.to_le_bytes());
                }
            }
            model_a
        });
        for _ in 0..3 {
            host.merge_now().unwrap();
            host.unmerge_all().unwrap();
        }
        host.merge_now().unwrap();
        stop.store(true, Ordering::Relaxed);
        let model_a = writer.join().unwrap();
        assert_eq!(image(&a.memory), model_a, "every write of A is there");
    });
    assert_eq!(image(&b.memory), model_b, "B saw none of A's writes");
    // Unregistered, A gets its own frames back, whole.
    let ma = host.unregister(a.vm).unwrap();
    assert_eq!(ma.census().shared, 0);
    drop(ma);
    drop(a);
    assert_eq!(image(&b.memory), model_b);
    drop(b);
    drop(host);
    assert_eq!(store.allocated_frames(), 0, "every frame given back");
}

#[test]
fn two_snapshots_with_content_in_common_share_it() {
    let _serial = serial();
    let dir = TempDir::new("folded-two");
    let (one, d1) = source(3);
    let (two, _) = source(3);
    // `two` differs from `one` in its last eight pages.
    let last = pages(&two).into_iter().rev().take(8).collect::<Vec<_>>();
    for (k, &g) in last.iter().enumerate() {
        two.write(g, &filled(9_000 + k as u64)).unwrap();
    }
    let mut all: HashSet<Vec<u8>> = image(&one).into_iter().collect();
    all.extend(image(&two));
    all.retain(|p| p.iter().any(|&b| b != 0));
    let (w1, w2) = (image(&one), image(&two));
    let (s1, s2) = (saved(&dir, "1.snap", &one), saved(&dir, "2.snap", &two));
    assert_ne!(s1.id(), s2.id());
    let (store, host) = host();
    let a = restore_folded(&host, VmOptions::default(), &s1).unwrap();
    let b = restore_folded(&host, VmOptions::default(), &s2).unwrap();
    assert_eq!(image(&a.memory), w1);
    assert_eq!(image(&b.memory), w2);
    assert_eq!(a.stats.contents_read as usize, d1);
    assert!(b.stats.contents_found > 0);
    assert_eq!(
        (a.stats.contents_read + b.stats.contents_read) as usize,
        all.len(),
        "each content read once over both snapshots"
    );
    assert_eq!(store.allocated_bytes().unwrap(), all.len() as u64 * PAGE);
}

#[test]
fn an_incremental_chain_restores_folded() {
    let _serial = serial();
    let dir = TempDir::new("folded-chain");
    let (src, _) = source(4);
    save(&src, dir.path("0.snap"), &SaveOptions::default()).unwrap();
    let g = pages(&src);
    src.write(g[1], &filled(55)).unwrap();
    src.write(g[9], &filled(4_000_004)).unwrap(); // page 4's, stored in the parent
    src.fill(g[10], 0, PAGE_SIZE).unwrap();
    let mut runs: Vec<DirtyRun> = Vec::new();
    src.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    let r0 = SnapshotReader::open(dir.path("0.snap")).unwrap();
    save_incremental(&src, &r0, &runs, dir.path("1.snap")).unwrap();
    let chain = SnapshotReader::open_chain(&[dir.path("0.snap"), dir.path("1.snap")]).unwrap();
    let (_store, host) = host();
    let a = restore_folded(&host, VmOptions::default(), &chain).unwrap();
    assert_eq!(image(&a.memory), image(&src));
    // A child opened without its parent is an error, and nothing stays.
    let alone = SnapshotReader::open(dir.path("1.snap")).unwrap();
    let frames = host.frame_store().allocated_frames();
    assert!(matches!(
        restore_folded(&host, VmOptions::default(), &alone),
        Err(SnapshotError::ParentMissing { .. })
    ));
    assert_eq!(host.frame_store().allocated_frames(), frames);
}

#[test]
fn a_damaged_snapshot_is_an_error_and_leaves_the_host_as_it_was() {
    let _serial = serial();
    let dir = TempDir::new("folded-damaged");
    let (src, distinct) = source(5);
    let want = image(&src);
    let path = dir.path("a.snap");
    save(&src, &path, &SaveOptions { track_dirty: false }).unwrap();
    let good = SnapshotReader::open(&path).unwrap();
    let (store, host) = host();
    // One VM first, so the host has frames and a VM to keep.
    let (other, _) = source(6);
    let first =
        restore_folded(&host, VmOptions::default(), &saved(&dir, "o.snap", &other)).unwrap();
    let frames = store.allocated_frames();
    let bytes = store.allocated_bytes().unwrap();
    // Damage a stored page: the content area starts at 4 KiB (the header
    // is smaller), and the map and table still check.
    let mut raw = std::fs::read(&path).unwrap();
    let at = 4096 + 5 * PAGE_SIZE + 17;
    raw[at] ^= 0x40;
    let bad_path = dir.path("bad.snap");
    std::fs::write(&bad_path, &raw).unwrap();
    let bad = SnapshotReader::open(&bad_path).unwrap();
    for fold in [FoldLayout::Contents, FoldLayout::Image] {
        let err = restore_folded_with(&host, VmOptions::default(), &bad, &laid(fold)).unwrap_err();
        match &err {
            SnapshotError::ContentHash { at: place, slot } => {
                assert_eq!(place.part, Part::Content);
                assert_eq!(*slot, 5);
            }
            e => panic!("expected a content hash error, got {e}"),
        }
        assert_eq!(store.allocated_frames(), frames, "no frame left behind");
        assert_eq!(store.allocated_bytes().unwrap(), bytes);
    }
    let st = host.stats().unwrap();
    assert_eq!(st.pages_total, first.stats.pages, "nothing registered");
    // The host goes on: the good file restores, and the first VM is whole.
    let ok = restore_folded(&host, VmOptions::default(), &good).unwrap();
    assert_eq!(image(&ok.memory), want);
    assert_eq!(ok.stats.contents as usize, distinct);
    assert_eq!(image(&first.memory), image(&other));
}

#[test]
fn merge_passes_and_reconciliation_work_on_restored_vms() {
    let _serial = serial();
    let dir = TempDir::new("folded-merge");
    let (src, distinct) = source(7);
    let want = image(&src);
    let full = nonzero(&want);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host();
    let vms: Vec<FoldedRestore> = (0..3)
        .map(|_| restore_folded(&host, VmOptions::default(), &snap).unwrap())
        .collect();
    // VM 0 writes four shared pages: each a copy of its own now.
    let written = [2usize, 3, 4, 12];
    for &p in &written {
        vms[0]
            .memory
            .write_obj(GuestPhysAddr(p as u64 * PAGE), 7u64)
            .unwrap();
    }
    let st = host.stats().unwrap();
    assert_eq!(st.cow_breaks as usize, written.len());
    assert_eq!(
        st.pages_sharing as usize,
        3 * full - distinct - written.len()
    );
    assert_eq!(
        host.vm_stats(vms[0].vm).unwrap().pages_merged as usize,
        full - written.len()
    );
    // VM 0 writes the saved bytes back: a merge pass folds those pages
    // onto the frames the restore filled (found by their keyed hash).
    for &p in &written {
        vms[0]
            .memory
            .write(GuestPhysAddr(p as u64 * PAGE), &want[p])
            .unwrap();
    }
    host.merge_now().unwrap();
    let st = host.stats().unwrap();
    assert_eq!(st.pages_shared as usize, distinct, "no new frame");
    assert_eq!(st.pages_sharing as usize, 3 * full - distinct);
    // A VM restored by copy and registered merges onto them too.
    let copy =
        Arc::new(GuestMemory::with_store(Arc::clone(&store), &snap.region_layout()).unwrap());
    restore_into(&snap, &copy).unwrap();
    host.register(Arc::clone(&copy), VmOptions::default())
        .unwrap();
    host.merge_now().unwrap();
    let st = host.stats().unwrap();
    assert_eq!(st.pages_shared as usize, distinct);
    assert_eq!(st.pages_sharing as usize, 4 * full - distinct);
    assert_eq!(store.allocated_bytes().unwrap(), distinct as u64 * PAGE);
    for v in &vms {
        assert_eq!(image(&v.memory), want);
    }
    assert_eq!(image(&copy), want);
    // Unmerging everything frees every shared frame.
    host.unmerge_all().unwrap();
    assert_eq!(host.stats().unwrap().pages_shared, 0);
    for v in &vms {
        assert_eq!(image(&v.memory), want);
    }
}

#[test]
fn domains_share_nothing() {
    let _serial = serial();
    let dir = TempDir::new("folded-domains");
    let (src, distinct) = source(8);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host();
    let in_domain = |d| VmOptions {
        domain: DomainId(d),
        ..VmOptions::default()
    };
    let a = restore_folded(&host, in_domain(1), &snap).unwrap();
    let b = restore_folded(&host, in_domain(2), &snap).unwrap();
    let c = restore_folded(&host, in_domain(1), &snap).unwrap();
    assert_eq!(a.stats.contents_read as usize, distinct);
    assert_eq!(
        b.stats.contents_read as usize, distinct,
        "no frame of domain 1"
    );
    assert_eq!(c.stats.contents_read, 0);
    assert_eq!(store.allocated_bytes().unwrap(), 2 * distinct as u64 * PAGE);
}

#[test]
fn with_no_mapping_budget_pages_are_copied_instead() {
    let _serial = serial();
    let dir = TempDir::new("folded-budget");
    let (src, _) = source(9);
    let want = image(&src);
    let full = nonzero(&want);
    let snap = saved(&dir, "a.snap", &src);
    let store = Arc::new(FrameStore::memfd().unwrap());
    // A headroom as large as the whole budget leaves nothing for remaps.
    let host = DedupHost::with_options(
        Arc::clone(&store),
        DedupOptions {
            map_headroom: u64::MAX / 2,
        },
    )
    .unwrap();
    let a = restore_folded(&host, VmOptions::default(), &snap).unwrap();
    assert_eq!(a.stats.shared_pages, 0);
    assert_eq!(a.stats.copied_pages as usize, full);
    assert_eq!(a.stats.remaps, 0);
    assert_eq!(image(&a.memory), want);
    // No page maps the frames the restore filled: they are gone again.
    assert_eq!(host.stats().unwrap().pages_shared, 0);
    assert_eq!(store.allocated_bytes().unwrap(), full as u64 * PAGE);
    a.memory.write_obj(GuestPhysAddr(8 * PAGE), 1u64).unwrap();
    assert_eq!(
        a.memory.read_obj::<u64>(GuestPhysAddr(8 * PAGE)).unwrap(),
        1
    );
}

#[test]
fn an_excluded_region_is_copied_and_the_rest_shared() {
    let _serial = serial();
    let dir = TempDir::new("folded-exclude");
    let (src, _) = source(10);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    let (_store, host) = host();
    let excluded = GuestPhysAddr(0x10_0000);
    let opts = VmOptions {
        exclude: vec![excluded],
        ..VmOptions::default()
    };
    let a = restore_folded(&host, opts, &snap).unwrap();
    assert_eq!(image(&a.memory), want);
    let r = a.memory.find_region(excluded).unwrap();
    assert_eq!(a.memory.regions()[r].census().shared, 0);
    let in_excluded = nonzero(&want[64..]);
    assert_eq!(a.stats.copied_pages as usize, in_excluded);
    assert_eq!(a.stats.shared_pages as usize, nonzero(&want) - in_excluded);
    // A region that is not the VM's is refused, and nothing stays.
    let frames = host.frame_store().allocated_frames();
    let bad = VmOptions {
        exclude: vec![GuestPhysAddr(0x20_0000)],
        ..VmOptions::default()
    };
    assert!(matches!(
        restore_folded(&host, bad, &snap),
        Err(SnapshotError::Dedup(pagefold::DedupError::NoSuchRegion(_)))
    ));
    assert_eq!(host.frame_store().allocated_frames(), frames);
}

/// With a budget for a few runs, the longest runs are remapped and the
/// rest copied. The source has at least twelve runs of four pages or more
/// onto consecutive frames (pages 4..8 of each group of eight, longer
/// where a first appearance continues them), and many of one page.
#[test]
fn a_short_budget_buys_the_longest_runs_first() {
    let _serial = serial();
    let dir = TempDir::new("folded-short");
    let (src, _) = source(11);
    let want = image(&src);
    let full = nonzero(&want);
    let snap = saved(&dir, "a.snap", &src);
    let store = Arc::new(FrameStore::memfd().unwrap());
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let now = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count() as u64;
    // About 20 mappings left: ten runs (other tests' threads come and go).
    let host = DedupHost::with_options(
        Arc::clone(&store),
        DedupOptions {
            map_headroom: max.saturating_sub(now + 20),
        },
    )
    .unwrap();
    let a = restore_folded_with(
        &host,
        VmOptions::default(),
        &snap,
        &laid(FoldLayout::Contents),
    )
    .unwrap();
    assert_eq!(image(&a.memory), want);
    let s = a.stats;
    assert!(s.remaps > 0 && s.copied_pages > 0, "{s:?}");
    assert_eq!(s.shared_pages + s.copied_pages, full as u64);
    assert!(
        s.shared_pages >= 4 * s.remaps.min(12),
        "longest runs first: {s:?}"
    );
}

/// Clones mapping an image of the snapshot (its pages in page order): one
/// remap per region, the image's pages with content held once, writes
/// copied on write, and merge passes, reconciliation and unregistering as
/// for any merged page.
#[test]
fn clones_of_an_image_share_it_with_a_remap_per_region() {
    let _serial = serial();
    let dir = TempDir::new("folded-image");
    let (src, _) = source(12);
    let want = image(&src);
    let full = nonzero(&want);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host();
    let clones: Vec<FoldedRestore> = (0..4)
        .map(|_| {
            restore_folded_with(&host, VmOptions::default(), &snap, &laid(FoldLayout::Image))
                .unwrap()
        })
        .collect();
    for (k, c) in clones.iter().enumerate() {
        let s = c.stats;
        assert!(s.image);
        assert_eq!(s.remaps, 2, "one remap per region");
        assert_eq!(s.copied_pages, 0);
        // Zero pages map the image's holes: neither stored nor shared.
        assert_eq!(s.shared_pages, full as u64);
        assert_eq!(s.zero_pages, (want.len() - full) as u64);
        assert_eq!(s.pages, s.zero_pages + s.shared_pages + s.copied_pages);
        let read = if k == 0 { full as u64 } else { 0 };
        assert_eq!(s.contents_read, read, "clone {k}");
    }
    // The image's pages with content, once; its zero pages are holes.
    assert_eq!(store.allocated_bytes().unwrap(), full as u64 * PAGE);
    // The automatic layout keeps to the image this snapshot has.
    let auto = restore_folded(&host, VmOptions::default(), &snap).unwrap();
    assert!(auto.stats.image && auto.stats.contents_read == 0);
    assert_eq!(image(&auto.memory), want);
    drop(auto);
    for c in &clones {
        assert_eq!(image(&c.memory), want);
    }
    // Reading a hole may give the image a page of zeros, once for all.
    assert!(store.allocated_bytes().unwrap() <= want.len() as u64 * PAGE);
    let mut model = want.clone();
    clones[0]
        .memory
        .write_obj(GuestPhysAddr(3 * PAGE), 5u64)
        .unwrap();
    clones[0].memory.write_obj(GuestPhysAddr(0), 6u64).unwrap(); // a zero page
    model[3][..8].copy_from_slice(&5u64.to_le_bytes());
    model[0][..8].copy_from_slice(&6u64.to_le_bytes());
    assert_eq!(image(&clones[0].memory), model);
    for c in &clones[1..] {
        assert_eq!(image(&c.memory), want, "the write stayed in clone 0");
    }
    assert_eq!(host.stats().unwrap().cow_breaks, 2);
    host.merge_now().unwrap();
    let m0 = host.unregister(clones[0].vm).unwrap();
    assert_eq!(image(&m0), model);
    for c in &clones[1..] {
        assert_eq!(image(&c.memory), want);
    }
    host.unmerge_all().unwrap();
    assert_eq!(host.stats().unwrap().pages_shared, 0);
    for c in &clones[1..] {
        assert_eq!(image(&c.memory), want);
    }
}

/// With too few mappings left for a frame per content run in the clones
/// planned, the automatic layout maps an image (of the pages the runs
/// worth most to the budget leave, the rest by content), which every
/// later clone maps too, each within its share of the budget, storing
/// less than a whole image; with the default budget the same snapshot
/// and plan map a frame per content.
#[test]
fn a_budget_short_for_the_planned_clones_chooses_an_image() {
    let _serial = serial();
    let dir = TempDir::new("folded-auto");
    let (src, _) = source(13);
    let want = image(&src);
    let full = nonzero(&want) as u64;
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host_with_mappings(100);
    let clones: Vec<FoldedRestore> = (0..8)
        .map(|_| restore_folded_with(&host, VmOptions::default(), &snap, &planned(8)).unwrap())
        .collect();
    // Less than a whole image (before a read fills a hole of it).
    let held = store.allocated_bytes().unwrap();
    assert!(held < full * PAGE, "{held} bytes");
    for (k, c) in clones.iter().enumerate() {
        let s = c.stats;
        assert!(s.image, "clone {k}: {s:?}");
        assert_eq!(
            (s.shared_pages, s.copied_pages),
            (full, 0),
            "clone {k}: {s:?}"
        );
        if k > 0 {
            assert_eq!(s.contents_read, 0, "clone {k} maps the first one's frames");
        }
        assert_eq!(image(&c.memory), want);
    }
    assert!(
        clones[0].stats.remaps > 2,
        "some runs by content: {:?}",
        clones[0].stats
    );
    // A write to every page of one clone (by content, on the image, on a
    // hole) stays in it, and none is lost.
    let mut model = want.clone();
    for (p, g) in pages(&clones[0].memory).into_iter().enumerate() {
        clones[0].memory.write_obj(g, p as u64 + 1).unwrap();
        model[p][..8].copy_from_slice(&(p as u64 + 1).to_le_bytes());
    }
    assert_eq!(image(&clones[0].memory), model);
    for c in &clones[1..] {
        assert_eq!(image(&c.memory), want);
    }
    // Another domain of the same host shares none of it.
    let other = VmOptions {
        domain: DomainId(2),
        ..VmOptions::default()
    };
    let d = restore_folded_with(&host, other, &snap, &planned(8)).unwrap();
    assert!(
        d.stats.contents_found == 0 && d.stats.contents_read > 0,
        "{:?}",
        d.stats
    );
    assert_eq!(image(&d.memory), want);
    let (_store, roomy) = host_pair();
    let b = restore_folded_with(&roomy, VmOptions::default(), &snap, &planned(8)).unwrap();
    assert!(!b.stats.image);
    assert_eq!(image(&b.memory), want);
}

/// Four snapshots with content in common, two clones planned of each,
/// all in one domain: where the budget allows it the automatic layout
/// maps a frame per content for every clone, as `Contents` does, and the
/// store holds the distinct content of all four once, however many
/// clones. Each clone reads back its snapshot's bytes, and a write stays
/// in the clone that made it.
#[test]
fn auto_maps_contents_across_snapshots_where_the_budget_allows() {
    let _serial = serial();
    let dir = TempDir::new("folded-auto-contents");
    let (common, _) = source(20);
    let mut snaps = Vec::new();
    let mut wants = Vec::new();
    let mut distinct = HashSet::new();
    for k in 0..4u64 {
        // Common pages, and a quarter of the pages the snapshot's own.
        let mem = GuestMemory::new(&layout()).unwrap();
        let mut img = image(&common);
        for (i, p) in img.iter_mut().enumerate() {
            if i % 4 == k as usize {
                *p = filled(7_000 + 100 * k + i as u64);
            }
        }
        for (g, p) in pages(&mem).into_iter().zip(&img) {
            mem.write(g, p).unwrap();
        }
        distinct.extend(img.iter().filter(|p| p.iter().any(|&b| b != 0)).cloned());
        snaps.push(saved(&dir, &format!("{k}.snap"), &mem));
        wants.push(img);
    }
    let (store, host) = host();
    let mut clones = Vec::new();
    for (k, snap) in snaps.iter().enumerate() {
        for _ in 0..2 {
            let c = restore_folded_with(&host, VmOptions::default(), snap, &planned(2)).unwrap();
            let s = c.stats;
            assert!(!s.image, "clone of {k}: {s:?}");
            assert_eq!(s.copied_pages, 0, "{s:?}");
            assert_eq!(s.shared_pages, nonzero(&wants[k]) as u64);
            assert_eq!(s.pages, s.zero_pages + s.shared_pages);
            clones.push((k, c));
        }
    }
    assert_eq!(
        store.allocated_bytes().unwrap(),
        distinct.len() as u64 * PAGE,
        "the distinct content of all four, once"
    );
    // The same clones laid out by contents by order: the same memory.
    let (other, by_contents) = host_pair();
    for snap in &snaps {
        for _ in 0..2 {
            restore_folded_with(
                &by_contents,
                VmOptions::default(),
                snap,
                &laid(FoldLayout::Contents),
            )
            .unwrap();
        }
    }
    assert_eq!(
        other.allocated_bytes().unwrap(),
        store.allocated_bytes().unwrap()
    );
    for (k, c) in &clones {
        assert_eq!(image(&c.memory), wants[*k]);
    }
    // A write to a page common to all four stays in its clone.
    let at = GuestPhysAddr(5 * PAGE);
    clones[3].1.memory.write_obj(at, 0xfeed_u64).unwrap();
    for (i, (k, c)) in clones.iter().enumerate() {
        let mut want = wants[*k].clone();
        if i == 3 {
            want[5][..8].copy_from_slice(&0xfeed_u64.to_le_bytes());
        }
        assert_eq!(image(&c.memory), want, "clone {i}");
    }
}

/// Clones past a small mapping budget degrade rather than fail: with more
/// planned, an image (a remap per region); the one clone planned of a
/// snapshot whose contents are held maps them (copying what the budget
/// cannot pay for) rather than store an image of its own. Every clone
/// reads back its bytes and keeps its writes.
#[test]
fn clones_past_a_small_budget_degrade_without_failing() {
    let _serial = serial();
    let dir = TempDir::new("folded-degrade");
    let (src, _) = source(21);
    let want = image(&src);
    let full = nonzero(&want) as u64;
    let snap = saved(&dir, "a.snap", &src);
    // Another snapshot of the same contents (one page a copy of another).
    let mut other_want = want.clone();
    other_want[10] = want[11].clone();
    let other_src = GuestMemory::new(&layout()).unwrap();
    for (g, p) in pages(&other_src).into_iter().zip(&other_want) {
        other_src.write(g, p).unwrap();
    }
    let other = saved(&dir, "b.snap", &other_src);
    let (_store, host) = host_with_mappings(30);
    let clones: Vec<FoldedRestore> = (0..6)
        .map(|_| restore_folded_with(&host, VmOptions::default(), &snap, &planned(6)).unwrap())
        .collect();
    for c in &clones {
        let s = c.stats;
        assert!(s.image, "{s:?}");
        assert_eq!(s.shared_pages + s.copied_pages, full, "{s:?}");
        assert_eq!(s.pages, s.zero_pages + s.shared_pages + s.copied_pages);
    }
    // One clone planned of another snapshot whose contents the image
    // holds: contents (no new memory but what the budget cannot pay for),
    // not an image of its own.
    let last = restore_folded_with(&host, VmOptions::default(), &other, &planned(1)).unwrap();
    let s = last.stats;
    assert!(!s.image, "{s:?}");
    assert_eq!((s.contents_found, s.contents_read), (s.contents, 0));
    assert_eq!(s.shared_pages + s.copied_pages, nonzero(&other_want) as u64);
    assert_eq!(s.pages, s.zero_pages + s.shared_pages + s.copied_pages);
    assert_eq!(image(&last.memory), other_want);
    for (k, c) in clones.iter().enumerate() {
        c.memory
            .write_obj(GuestPhysAddr(9 * PAGE), k as u64 + 1)
            .unwrap();
    }
    for (k, c) in clones.iter().enumerate() {
        let mut w = want.clone();
        w[9][..8].copy_from_slice(&(k as u64 + 1).to_le_bytes());
        assert_eq!(image(&c.memory), w, "clone {k}");
    }
    assert_eq!(image(&last.memory), other_want);
}

/// Without a plan, the automatic layout plans for as many clones again as
/// were restored: the first clones take contents while they fit, and once
/// the budget is short the next ones share an image instead of copying
/// every page each.
#[test]
fn without_a_plan_clones_past_the_budget_share_an_image() {
    let _serial = serial();
    let dir = TempDir::new("folded-unplanned");
    let (src, _) = source(23);
    let want = image(&src);
    let snap = saved(&dir, "a.snap", &src);
    let (_store, host) = host_with_mappings(60);
    let clones: Vec<FoldedRestore> = (0..5)
        .map(|_| restore_folded(&host, VmOptions::default(), &snap).unwrap())
        .collect();
    let images = clones.iter().filter(|c| c.stats.image).count();
    assert!(
        images >= 3,
        "{:?}",
        clones.iter().map(|c| c.stats).collect::<Vec<_>>()
    );
    assert!(clones.last().is_some_and(|c| c.stats.image));
    for c in &clones {
        assert_eq!(image(&c.memory), want);
    }
}

/// A guest larger than the caller's limit is refused from the header,
/// before any page is looked at or any frame allocated.
#[test]
fn a_guest_over_the_size_limit_is_refused_before_any_work() {
    let _serial = serial();
    let dir = TempDir::new("folded-limit");
    let (src, _) = source(24);
    let snap = saved(&dir, "a.snap", &src);
    let (store, host) = host();
    let size: u64 = layout().iter().map(|r| r.1).sum();
    let small = FoldOptions {
        max_guest_bytes: size - 1,
        ..FoldOptions::default()
    };
    match restore_folded_with(&host, VmOptions::default(), &snap, &small) {
        Err(SnapshotError::TooLarge { bytes, max }) => {
            assert_eq!((bytes, max), (size, size - 1));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.allocated_frames(), 0);
    assert_eq!(host.stats().unwrap().pages_total, 0, "nothing registered");
    let exact = FoldOptions {
        max_guest_bytes: size,
        ..FoldOptions::default()
    };
    let a = restore_folded_with(&host, VmOptions::default(), &snap, &exact).unwrap();
    assert_eq!(image(&a.memory), image(&src));
}

/// The stats count every page once: zero pages as zero (in an image too,
/// where they map its holes), pages with content as shared or copied.
#[test]
fn stats_count_each_page_once() {
    let _serial = serial();
    let dir = TempDir::new("folded-stats");
    let (src, distinct) = source(25);
    let want = image(&src);
    let full = nonzero(&want) as u64;
    let zero = want.len() as u64 - full;
    let snap = saved(&dir, "a.snap", &src);
    for layout in [FoldLayout::Contents, FoldLayout::Image, FoldLayout::Auto] {
        let (_store, host) = host();
        let a = restore_folded_with(&host, VmOptions::default(), &snap, &laid(layout)).unwrap();
        let b = restore_folded_with(&host, VmOptions::default(), &snap, &laid(layout)).unwrap();
        for (k, s) in [a.stats, b.stats].into_iter().enumerate() {
            assert_eq!(s.pages, want.len() as u64, "{layout:?}");
            assert_eq!(s.zero_pages, zero, "{layout:?}");
            assert_eq!(s.shared_pages, full, "{layout:?}");
            assert_eq!(s.copied_pages, 0, "{layout:?}");
            assert_eq!(s.contents, distinct as u64, "{layout:?}");
            if k == 0 {
                assert_eq!(s.contents_found, 0, "{layout:?}");
            } else {
                assert_eq!(s.contents_read, 0, "{layout:?}");
            }
        }
        assert_eq!(a.stats.image, layout == FoldLayout::Image);
        if !a.stats.image {
            // Zero pages are holes, the rest merged.
            let c = a.memory.census();
            assert_eq!((c.shared, c.zero), (full, zero), "{layout:?}");
        }
    }
}

fn host_pair() -> (Arc<FrameStore>, DedupHost) {
    host()
}

//! Review of the lazy restore folded on arrival (`restore_folded_lazy`), on
//! real memfd memory, the real userfaultfd and a real dedup host: what a
//! clone abandoned while another still arrives leaves in their shared
//! image, and what a clone whose host went away leaves mapped.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    dedup::VmOptions,
    snapshot::{
        restore_folded_lazy, save, LazyFoldOptions, LazyOptions, SaveOptions, SnapshotReader,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

mod common;
use common::{
    folded::{host, image, pages, saved, source},
    lazy::{gated_options, touch},
    temp_dir::TempDir,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// Options whose fetch never starts within a test (dropping the restore
/// stops the wait at once): every page arrives on fault.
fn faults_only() -> LazyFoldOptions {
    LazyFoldOptions {
        lazy: LazyOptions {
            fetch_delay: Duration::from_secs(600),
            ..LazyOptions::default()
        },
        ..LazyFoldOptions::default()
    }
}

/// A guest of `pages` pages, each with bytes of its own (none zero), saved
/// in `dir`; and each page's bytes.
fn big_snapshot(dir: &TempDir, pages: u64) -> (Arc<SnapshotReader>, Vec<Vec<u8>>) {
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), pages * PAGE)]).unwrap();
    let mut want = Vec::with_capacity(pages as usize);
    for k in 0..pages {
        let page: Vec<u8> = (0..PAGE_SIZE / 8)
            .flat_map(|i| (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1)).to_le_bytes())
            .collect();
        mem.write(GuestPhysAddr(k * PAGE), &page).unwrap();
        want.push(page);
    }
    let path = dir.path("big.snap");
    save(&mem, &path, &SaveOptions { track_dirty: false }).unwrap();
    (Arc::new(SnapshotReader::open(&path).unwrap()), want)
}

/// Clone A is dropped (abandoned: the VMM gave up on it) while its vCPU
/// still touches its memory, and clone B of the same snapshot still
/// arrives on the same image. A's restore unregisters its ranges, then
/// stops its fault server (which polls for up to 20 ms), and only then
/// does its host discard A's pages off the image: an access of A in that
/// window to a page not yet in the image is no longer a fault, so shmem
/// fills the image's frame with a page of zeros. The frame is then
/// present, so B's first touch of the page does not fault either: B reads
/// zeros where the snapshot has bytes (and a write of B then copies the
/// zeros, losing the page for good).
#[test]
fn a_clone_abandoned_while_another_arrives_leaves_no_zeros_in_their_image() {
    let dir = TempDir::new("review-lazy-folded-abandon");
    let n = 4096u64;
    let (snap, want) = big_snapshot(&dir, n);
    let (_store, host) = host();
    let mut wrong = 0usize;
    for _round in 0..3 {
        let a = restore_folded_lazy(
            &host,
            VmOptions::default(),
            Arc::clone(&snap),
            faults_only(),
        )
        .unwrap();
        let b = restore_folded_lazy(
            &host,
            VmOptions::default(),
            Arc::clone(&snap),
            faults_only(),
        )
        .unwrap();
        let a_mem = Arc::clone(&a.memory);
        let progress = Arc::new(AtomicUsize::new(0));
        // A's "vCPU": reads every page once, in order, a byte each.
        let reader = {
            let (mem, progress) = (Arc::clone(&a_mem), Arc::clone(&progress));
            std::thread::spawn(move || {
                for k in 0..n {
                    let hva = mem.host_address(GuestPhysAddr(k * PAGE)).unwrap().0 as *const u8;
                    // SAFETY: a live mapping of the memory, which the
                    // thread holds.
                    let _ = unsafe { std::ptr::read_volatile(hva) };
                    progress.store(k as usize + 1, Ordering::Release);
                }
            })
        };
        let t0 = Instant::now();
        while progress.load(Ordering::Acquire) < 64 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::yield_now();
        }
        drop(a);
        reader.join().unwrap();
        // B reads every page (a page not in the image faults and is served).
        for k in 0..n {
            if touch(&b.memory, GuestPhysAddr(k * PAGE)) != want[k as usize] {
                wrong += 1;
            }
        }
        drop(b);
    }
    assert_eq!(wrong, 0, "pages B read wrong after A was abandoned");
}

/// The host is dropped while a clone arrives; the restore then fails at
/// `wait` (its host is gone), and its image, never published, is freed
/// into the store. Nothing discarded the clone's pages (its host's side,
/// `Arrival`, discards only through the host), so its memory, still in the
/// VMM's hands, maps frames the store hands out again: another user of
/// the store writes them, and the clone reads that user's bytes.
#[test]
fn a_clone_whose_host_is_dropped_maps_no_frame_the_store_hands_out_again() {
    let dir = TempDir::new("review-lazy-folded-host-gone");
    let (orig, _) = source(11);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let c = restore_folded_lazy(&host, VmOptions::default(), snap, gated_options(&gate)).unwrap();
    for (k, g) in pages(&orig).into_iter().enumerate().step_by(2) {
        assert!(touch(&c.memory, g) == want[k], "page {g}");
    }
    let memory = Arc::clone(&c.memory);
    drop(host);
    gate.store(true, Ordering::Release);
    // Its host gone, the clone cannot arrive: the wait says so.
    assert!(c.wait().is_err());
    // Another user of the store takes frames and fills them.
    let mark = vec![0xa5u8; PAGE_SIZE];
    let mut taken = Vec::new();
    for _ in 0..512 {
        let r = store.allocate(1).unwrap();
        for f in 0..r.count {
            store
                .write_frames(pagefold::FrameNumber(r.start.0 + f), &mark)
                .unwrap();
        }
        taken.push(r);
    }
    let seen = pages(&orig)
        .into_iter()
        .filter(|&g| touch(&memory, g) == mark)
        .count();
    assert_eq!(seen, 0, "pages of the clone showing another user's frames");
    for r in taken {
        store.free(r).unwrap();
    }
}

/// A page of zeros discarded (a balloon) while the VM arrives: its own
/// frame's hole is put back under it, so the fetch's `UFFDIO_ZEROPAGE`
/// over its run of zero pages fails there (the page is no longer
/// registered), and page by page the discarded one was never counted:
/// `on_fault + fetched + found + zero_untouched + damaged` fell short of
/// `pages`. (The same path lost pages a run's ioctl zeroed before it met
/// one the fault handler had placed: each then answered "present".)
#[test]
fn a_zero_page_discarded_while_arriving_is_still_counted() {
    let dir = TempDir::new("review-lazy-folded-discard");
    let (orig, _) = source(12);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (_store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let c = restore_folded_lazy(&host, VmOptions::default(), snap, gated_options(&gate)).unwrap();
    // Page 0 is a zero page of the fixture (and so is page 1).
    assert!(want[0].iter().all(|&b| b == 0) && want[1].iter().all(|&b| b == 0));
    c.memory.discard(GuestPhysAddr(0), PAGE).unwrap();
    let memory = Arc::clone(&c.memory);
    gate.store(true, Ordering::Release);
    let s = c.wait().unwrap();
    assert_eq!(
        s.on_fault + s.fetched + s.found + s.zero_untouched + s.damaged,
        s.pages,
        "{s:?}"
    );
    assert!(image(&memory) == want);
}

/// A second clone excluding a region, restored after the first one (same
/// exclusion) arrived: the first one's image is published, so the
/// registry of arriving images no longer hands it out, and a clone that
/// excludes regions never looks for a whole image: it reserves a new
/// image and fetches every page again. Each such clone holds its own
/// copy of the shared region's contents, where clones restored together
/// (or without exclusions) share one.
#[test]
fn clones_excluding_a_region_share_one_image_when_restored_one_after_another() {
    let dir = TempDir::new("review-lazy-folded-exclude-later");
    let (orig, _) = source(13);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (store, host) = host();
    let second = common::folded::layout()[1].0;
    let options = VmOptions {
        exclude: vec![second],
        ..VmOptions::default()
    };
    let mut memories = Vec::new();
    for _ in 0..2 {
        let c = restore_folded_lazy(
            &host,
            options.clone(),
            Arc::clone(&snap),
            LazyFoldOptions::default(),
        )
        .unwrap();
        memories.push(Arc::clone(&c.memory));
        c.wait().unwrap();
    }
    let first_pages = (common::folded::layout()[0].1 / PAGE) as usize;
    let in_first = common::folded::nonzero(&want[..first_pages]) as u64;
    let in_second = common::folded::nonzero(&want[first_pages..]) as u64;
    // The first region's contents once (one image), the excluded region's
    // once per clone.
    assert_eq!(
        store.allocated_bytes().unwrap() / PAGE,
        in_first + 2 * in_second
    );
    for m in &memories {
        assert!(image(m) == want);
    }
}

/// Checked sound: an incremental snapshot (its parent attached) restored
/// lazily folded by two clones at once, touched before the fetch, then a
/// third that maps the published image: every page as the chain has it.
#[test]
fn a_snapshot_chain_restored_lazily_folded_reads_the_newest_pages() {
    let dir = TempDir::new("review-lazy-folded-chain");
    let (orig, _) = source(14);
    let p0 = dir.path("s0.snap");
    save(&orig, &p0, &SaveOptions::default()).unwrap();
    let r0 = SnapshotReader::open(&p0).unwrap();
    // A zero page gets content, a page with content becomes zeros, one
    // changes, one takes the content another page has in the parent.
    orig.write(GuestPhysAddr(0), &[0x11; PAGE_SIZE]).unwrap();
    orig.write(GuestPhysAddr(3 * PAGE), &[0; PAGE_SIZE])
        .unwrap();
    orig.write(GuestPhysAddr(5 * PAGE), &[0x22; PAGE_SIZE])
        .unwrap();
    let mut moved = vec![0u8; PAGE_SIZE];
    orig.read(GuestPhysAddr(0x10_0000 + 4 * PAGE), &mut moved)
        .unwrap();
    orig.write(GuestPhysAddr(6 * PAGE), &moved).unwrap();
    let mut runs = Vec::new();
    orig.harvest_dirty(pagefold::RegionSet::All, &mut runs)
        .unwrap();
    let p1 = dir.path("s1.snap");
    pagefold::snapshot::save_incremental(&orig, &r0, &runs, &p1).unwrap();
    let chain = Arc::new(SnapshotReader::open_chain(&[&p0, &p1]).unwrap());
    let want = image(&orig);
    let (_store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let clones: Vec<_> = (0..2)
        .map(|_| {
            restore_folded_lazy(
                &host,
                VmOptions::default(),
                Arc::clone(&chain),
                gated_options(&gate),
            )
            .unwrap()
        })
        .collect();
    for c in &clones {
        for (k, g) in pages(&orig).into_iter().enumerate().step_by(2) {
            assert!(touch(&c.memory, g) == want[k], "page {g}");
        }
    }
    gate.store(true, Ordering::Release);
    let memories: Vec<_> = clones.iter().map(|c| Arc::clone(&c.memory)).collect();
    for c in clones {
        let s = c.wait().unwrap();
        assert_eq!(
            s.on_fault + s.fetched + s.found + s.zero_untouched + s.damaged,
            s.pages,
            "{s:?}"
        );
    }
    let third = restore_folded_lazy(
        &host,
        VmOptions::default(),
        chain,
        LazyFoldOptions::default(),
    )
    .unwrap();
    let m3 = Arc::clone(&third.memory);
    third.wait().unwrap();
    for m in memories.iter().chain([&m3]) {
        assert!(image(m) == want);
    }
}

/// Checked sound: two domains restoring one snapshot at the same time
/// each fill an image of their own (an arriving image is never found
/// from another domain), and each reads the snapshot's bytes.
#[test]
fn two_domains_restoring_one_snapshot_at_once_share_nothing() {
    let dir = TempDir::new("review-lazy-folded-domains");
    let (orig, _) = source(15);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let clones: Vec<_> = [0u32, 1, 0, 1]
        .iter()
        .map(|&d| {
            let options = VmOptions {
                domain: pagefold::dedup::DomainId(d),
                ..VmOptions::default()
            };
            restore_folded_lazy(&host, options, Arc::clone(&snap), gated_options(&gate)).unwrap()
        })
        .collect();
    // Domain 0's first clone touches every page: domain 1's clones still
    // fault on each (their image is not domain 0's).
    for (k, g) in pages(&orig).into_iter().enumerate() {
        assert!(touch(&clones[0].memory, g) == want[k], "page {g}");
    }
    gate.store(true, Ordering::Release);
    for c in clones {
        let m = Arc::clone(&c.memory);
        c.wait().unwrap();
        assert!(image(&m) == want);
    }
    let stored = common::folded::nonzero(&want) as u64;
    // Two images, one per domain (and no private copies: nothing wrote).
    assert_eq!(store.allocated_bytes().unwrap() / PAGE, 2 * stored);
}

/// A host whose store populates its mappings (`StoreOptions::populate`):
/// a clone's memory is mapped populated, so the pages of a region it
/// does not remap onto the image (an excluded region, or one the mapping
/// budget could not pay for) are present from the start, zeros, and
/// never fault: the lazy restore's `UFFDIO_COPY` finds them present and
/// skips them, the guest reads zeros, and `wait` says all is well.
#[test]
fn an_excluded_region_on_a_populating_store_reads_the_snapshot() {
    let dir = TempDir::new("review-lazy-folded-populate");
    let (orig, _) = source(16);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let store = Arc::new(
        pagefold::FrameStore::new(pagefold::frames::StoreOptions {
            populate: true,
            ..pagefold::frames::StoreOptions::default()
        })
        .unwrap(),
    );
    let host = pagefold::DedupHost::new(Arc::clone(&store)).unwrap();
    let second = common::folded::layout()[1].0;
    let options = VmOptions {
        exclude: vec![second],
        ..VmOptions::default()
    };
    let c = restore_folded_lazy(&host, options, snap, LazyFoldOptions::default()).unwrap();
    let memory = Arc::clone(&c.memory);
    let waited = c.wait();
    let wrong: Vec<usize> = image(&memory)
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(k, _)| k)
        .collect();
    let adds_up = waited
        .as_ref()
        .is_ok_and(|s| s.on_fault + s.fetched + s.found + s.zero_untouched + s.damaged == s.pages);
    assert!(
        adds_up && wrong.is_empty(),
        "wait: {waited:?}; pages read wrong: {wrong:?}"
    );
}

/// Checked sound: while two clones arrive on one image, a write through
/// `GuestMemory::write` to a page not there yet and a discard of another
/// stay the writer's: the other clone, and a third restored from the
/// published image, read the snapshot's bytes.
#[test]
fn writes_and_discards_while_arriving_stay_private() {
    let dir = TempDir::new("review-lazy-folded-write");
    let (orig, _) = source(17);
    let want = image(&orig);
    let snap = Arc::new(saved(&dir, "a.snap", &orig));
    let (_store, host) = host();
    let gate = Arc::new(AtomicBool::new(false));
    let a = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        gated_options(&gate),
    )
    .unwrap();
    let b = restore_folded_lazy(
        &host,
        VmOptions::default(),
        Arc::clone(&snap),
        gated_options(&gate),
    )
    .unwrap();
    // Page 4 and 5 have content of their own in the fixture.
    let (w, d) = (GuestPhysAddr(4 * PAGE), GuestPhysAddr(5 * PAGE));
    a.memory.write(w, b"written by a").unwrap();
    a.memory.discard(d, PAGE).unwrap();
    let mut expect_a = want.clone();
    expect_a[4][..12].copy_from_slice(b"written by a");
    expect_a[5] = vec![0; PAGE_SIZE];
    assert!(touch(&b.memory, w) == want[4]);
    assert!(touch(&b.memory, d) == want[5]);
    gate.store(true, Ordering::Release);
    let (ma, mb) = (Arc::clone(&a.memory), Arc::clone(&b.memory));
    a.wait().unwrap();
    b.wait().unwrap();
    assert!(image(&ma) == expect_a);
    assert!(image(&mb) == want);
    let c = restore_folded_lazy(
        &host,
        VmOptions::default(),
        snap,
        LazyFoldOptions::default(),
    )
    .unwrap();
    let mc = Arc::clone(&c.memory);
    c.wait().unwrap();
    assert!(image(&mc) == want);
    host.merge_now().unwrap();
    assert!(image(&ma) == expect_a && image(&mb) == want && image(&mc) == want);
}

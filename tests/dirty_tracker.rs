//! The raw-write tracker (userfaultfd asynchronous write protection and
//! `PAGEMAP_SCAN`): writes through raw host pointers are found, including
//! while another thread collects and harvests in a loop. Prints a SKIP line
//! and passes where the kernel lacks the features (before Linux 6.7).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use pagefold::{
    DedupHost, DirtyError, DirtyRun, GuestMemory, GuestPhysAddr, RawWriteTracker, RegionSet,
    PAGE_SIZE,
};

const P: u64 = PAGE_SIZE as u64;

/// A tracker over all of `m`, or `None` (with a SKIP line) where the kernel
/// cannot run one.
fn tracker(m: &Arc<GuestMemory>, test: &str) -> Option<RawWriteTracker> {
    match RawWriteTracker::new(Arc::clone(m), RegionSet::All) {
        Ok(t) => Some(t),
        Err(DirtyError::TrackerUnavailable { reason }) => {
            println!("SKIP {test}: raw-write tracker unavailable on this kernel: {reason}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn pages_of(runs: &[DirtyRun]) -> Vec<u64> {
    runs.iter()
        .flat_map(|r| (0..r.pages).map(move |k| r.start.0 / P + k))
        .collect()
}

/// Raw pointer to guest-physical `a`.
fn host(m: &GuestMemory, a: u64) -> *mut u64 {
    m.host_address(GuestPhysAddr(a)).unwrap().0 as *mut u64
}

#[test]
fn raw_writes_are_found_and_reprotected() {
    let m = Arc::new(
        GuestMemory::new(&[(GuestPhysAddr(0), 64 * P), (GuestPhysAddr(100 * P), 64 * P)]).unwrap(),
    );
    // A page populated before tracking starts, and one read (populated
    // read-only) after: neither is a write.
    m.write(GuestPhysAddr(5 * P), &[1]).unwrap();
    let Some(t) = tracker(&m, "raw_writes_are_found_and_reprotected") else {
        return;
    };
    assert_eq!(t.collect().unwrap(), 0, "nothing written yet");
    let _ = m.read_obj::<u64>(GuestPhysAddr(6 * P)).unwrap();
    for a in [5 * P, 7 * P + 8, 8 * P, 130 * P + 4000] {
        // SAFETY: inside a region's live mapping, aligned; racing nothing.
        unsafe { host(&m, a).write_volatile(0xfeed) };
    }
    assert_eq!(t.collect().unwrap(), 4);
    let mut runs = Vec::new();
    m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    assert_eq!(pages_of(&runs), vec![5, 7, 8, 130]);
    assert_eq!(t.collect().unwrap(), 0, "re-protected by the scan");
    // SAFETY: as above.
    unsafe { host(&m, 7 * P).write_volatile(1) };
    assert_eq!(t.collect().unwrap(), 1, "a second write to a reported page");
    // SAFETY: inside a region's live mapping, aligned.
    let back = unsafe { host(&m, 7 * P + 8).read_volatile() };
    assert_eq!(back, 0xfeed, "writes landed");
}

#[test]
fn tracker_and_dedup_refuse_each_other() {
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), 16 * P)]).unwrap());
    let Some(t) = tracker(&m, "tracker_and_dedup_refuse_each_other") else {
        return;
    };
    assert!(matches!(
        RawWriteTracker::new(Arc::clone(&m), RegionSet::All),
        Err(DirtyError::UserfaultTaken)
    ));
    if let Ok(host) = DedupHost::new(Arc::clone(m.frame_store())) {
        assert!(host.register(Arc::clone(&m), Default::default()).is_err());
    }
    drop(t);
    assert!(
        RawWriteTracker::new(Arc::clone(&m), RegionSet::All).is_ok(),
        "released on drop"
    );
}

/// Raw-pointer writer threads while another thread collects and harvests
/// in a loop: every page written is reported at least once.
#[test]
fn raw_writers_racing_a_collector_lose_nothing() {
    const PAGES: u64 = 2048;
    let m = Arc::new(GuestMemory::new(&[(GuestPhysAddr(0), PAGES * P)]).unwrap());
    let Some(t) = tracker(&m, "raw_writers_racing_a_collector_lose_nothing") else {
        return;
    };
    let base = m.host_address(GuestPhysAddr(0)).unwrap().0 as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut written = vec![false; PAGES as usize];
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ k;
                for i in 0..100_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = if i % 2 == 0 { x % 32 } else { x % PAGES };
                    let p = (base + (page * P + (x >> 50) % 512 * 8) as usize) as *mut u64;
                    // SAFETY: inside the region's live mapping (the memory
                    // outlives the threads), 8-byte aligned.
                    unsafe { p.write_volatile(i) };
                    written[page as usize] = true;
                }
                written
            })
        })
        .collect();
    let mut seen = vec![false; PAGES as usize];
    let mut runs = Vec::new();
    let mut rounds = 0;
    let done = |w: &[std::thread::JoinHandle<Vec<bool>>]| w.iter().all(|h| h.is_finished());
    while !done(&writers) {
        t.collect().unwrap();
        runs.clear();
        m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
        for p in pages_of(&runs) {
            seen[p as usize] = true;
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Release);
    let mut written = vec![false; PAGES as usize];
    for w in writers {
        for (a, b) in written.iter_mut().zip(w.join().unwrap()) {
            *a |= b;
        }
    }
    t.collect().unwrap();
    runs.clear();
    m.harvest_dirty(RegionSet::All, &mut runs).unwrap();
    for p in pages_of(&runs) {
        seen[p as usize] = true;
    }
    println!("{rounds} collect+harvest rounds during the writes");
    assert_eq!(seen, written);
}

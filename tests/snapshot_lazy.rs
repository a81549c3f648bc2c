//! Lazy restore end to end, on real memory and the real userfaultfd: pages
//! touched through raw host pointers from several threads while the fetch
//! thread runs read exactly what was saved; the stats add up; a working set
//! recorded by one restore is fetched first by the next; a damaged page is
//! a typed error from `wait` with no hang; dropping a restore mid-way ends
//! its threads.
//!
//! The tests run one at a time (a lock): the thread-count check of the drop
//! test looks at the whole process.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use pagefold::{
    snapshot::{
        restore_lazy, save, LazyError, LazyOptions, PageSource, SaveOptions, SnapshotError,
        SnapshotReader,
    },
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};
use rand::{seq::SliceRandom, Rng, SeedableRng};

mod common;
use common::temp_dir::TempDir;

const PAGE: u64 = PAGE_SIZE as u64;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Two regions with a hole between them.
fn layout() -> Vec<(GuestPhysAddr, u64)> {
    vec![
        (GuestPhysAddr(0), 1024 * PAGE),
        (GuestPhysAddr(0x100_0000), 1024 * PAGE),
    ]
}

fn pages(mem: &GuestMemory) -> Vec<GuestPhysAddr> {
    mem.regions()
        .iter()
        .flat_map(|r| (0..r.size() / PAGE).map(move |i| GuestPhysAddr(r.start().0 + i * PAGE)))
        .collect()
}

/// Zero, duplicate and random pages.
fn fill(mem: &GuestMemory, seed: u64) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for gpa in pages(mem) {
        let page: Vec<u8> = match rng.gen_range(0..4) {
            0 => continue,
            1 => vec![0xa0 + rng.gen_range(0..4u8); PAGE_SIZE],
            _ => (0..PAGE_SIZE).map(|_| rng.gen()).collect(),
        };
        mem.write(gpa, &page).unwrap();
    }
}

/// A memory saved to `dir/name`: the original and the open snapshot.
fn saved(dir: &TempDir, name: &str) -> (GuestMemory, PathBuf) {
    let mem = GuestMemory::new(&layout()).unwrap();
    fill(&mem, 7);
    let path = dir.path(name);
    save(&mem, &path, &SaveOptions::default()).unwrap();
    (mem, path)
}

/// Reads a page through its raw host pointer (faulting it in).
fn touch(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let hva = mem.host_address(gpa).unwrap().0 as *const u8;
    let mut out = vec![0u8; PAGE_SIZE];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: `hva` is the page's host address in a live mapping of
        // the memory, which outlives this call.
        *b = unsafe { std::ptr::read_volatile(hva.add(i)) };
    }
    out
}

fn page_of(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    mem.read(gpa, &mut p).unwrap();
    p
}

/// A hook that holds the fetch thread until `gate` opens, so the touches
/// before it are served by the fault handler.
fn gated(gate: &Arc<AtomicBool>) -> pagefold::snapshot::FetchHook {
    let gate = Arc::clone(gate);
    Arc::new(move |_| {
        let t0 = std::time::Instant::now();
        while !gate.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

#[test]
fn touched_from_threads_while_fetching_every_byte_restored() {
    let _s = serial();
    let dir = TempDir::new("lazy-touch");
    let (orig, path) = saved(&dir, "a.snap");
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let gate = Arc::new(AtomicBool::new(false));
    let opts = LazyOptions {
        on_fetch: Some(gated(&gate)),
        ..LazyOptions::default()
    };
    let lazy = restore_lazy(Arc::clone(&snap), &mem, opts).unwrap();
    let mut all = pages(&mem);
    all.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(3));
    std::thread::scope(|sc| {
        for chunk in all.chunks(all.len() / 4) {
            let (mem, orig) = (&mem, &orig);
            sc.spawn(move || {
                for &gpa in chunk {
                    assert!(touch(mem, gpa) == page_of(orig, gpa), "page {gpa}");
                }
            });
        }
    });
    gate.store(true, Ordering::Release);
    let stats = lazy.wait().unwrap();
    assert_eq!(stats.pages, all.len() as u64);
    assert_eq!(
        stats.on_fault + stats.fetched + stats.zero_untouched + stats.damaged,
        stats.pages
    );
    assert_eq!(stats.damaged, 0);
    // The fetch thread placed at most a batch before the gate held it.
    assert!(stats.on_fault > stats.pages / 2, "{stats:?}");
    for gpa in pages(&orig) {
        assert!(page_of(&mem, gpa) == page_of(&orig, gpa), "page {gpa}");
    }
}

#[test]
fn untouched_restore_fetches_everything_and_memory_is_exact() {
    let _s = serial();
    let dir = TempDir::new("lazy-fetch");
    let (orig, path) = saved(&dir, "a.snap");
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let lazy = restore_lazy(Arc::clone(&snap), &mem, LazyOptions::default()).unwrap();
    // Touch a few while the fetch runs, from one thread.
    for gpa in pages(&orig).into_iter().step_by(97) {
        assert!(touch(&mem, gpa) == page_of(&orig, gpa));
    }
    let stats = lazy.wait().unwrap();
    assert_eq!(
        stats.on_fault + stats.fetched + stats.zero_untouched,
        stats.pages
    );
    let zeros = pages(&orig)
        .into_iter()
        .filter(|&g| snap.source(g).unwrap() == PageSource::Zero)
        .count() as u64;
    assert_eq!(stats.zero_pages, zeros);
    for gpa in pages(&orig) {
        assert!(touch(&mem, gpa) == page_of(&orig, gpa), "page {gpa}");
    }
}

#[test]
fn working_set_of_one_restore_is_fetched_first_by_the_next() {
    let _s = serial();
    let dir = TempDir::new("lazy-ws");
    let (orig, path) = saved(&dir, "a.snap");
    let ws = dir.path("a.ws");
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    // Pages of the second region, in a scrambled order, stored ones only.
    let mut want: Vec<GuestPhysAddr> = pages(&orig)
        .into_iter()
        .skip(1500)
        .filter(|&g| snap.source(g).unwrap() != PageSource::Zero)
        .take(40)
        .collect();
    want.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(5));

    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let gate = Arc::new(AtomicBool::new(false));
    let lazy = restore_lazy(
        Arc::clone(&snap),
        &mem,
        LazyOptions {
            working_set: Some(ws.clone()),
            record_pages: 40,
            on_fetch: Some(gated(&gate)),
            ..LazyOptions::default()
        },
    )
    .unwrap();
    for &gpa in &want {
        assert!(touch(&mem, gpa) == page_of(&orig, gpa));
    }
    gate.store(true, Ordering::Release);
    let first = lazy.wait().unwrap();
    assert_eq!(first.working_set, 0);
    assert!(ws.exists());

    let mem2 = GuestMemory::new(&snap.region_layout()).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = Arc::clone(&order);
    let lazy = restore_lazy(
        Arc::clone(&snap),
        &mem2,
        LazyOptions {
            working_set: Some(ws.clone()),
            record_pages: 0,
            on_fetch: Some(Arc::new(move |g| o.lock().unwrap().push(g))),
            ..LazyOptions::default()
        },
    )
    .unwrap();
    let stats = lazy.wait().unwrap();
    assert_eq!(stats.working_set, want.len() as u64);
    let order = order.lock().unwrap();
    assert_eq!(&order[..want.len()], &want[..]);
    for gpa in pages(&orig) {
        assert!(page_of(&mem2, gpa) == page_of(&orig, gpa), "page {gpa}");
    }
}

#[test]
fn damaged_working_set_file_is_a_typed_error() {
    let _s = serial();
    let dir = TempDir::new("lazy-wsbad");
    let (_orig, path) = saved(&dir, "a.snap");
    let ws = dir.path("bad.ws");
    std::fs::write(&ws, b"not a working set").unwrap();
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let opts = LazyOptions {
        working_set: Some(ws),
        ..LazyOptions::default()
    };
    let e = restore_lazy(snap, &mem, opts).unwrap_err();
    assert!(matches!(e, LazyError::WorkingSet { .. }), "{e}");
}

#[test]
fn damaged_page_is_a_typed_error_from_wait_and_no_hang() {
    let _s = serial();
    let dir = TempDir::new("lazy-bad");
    let (orig, path) = saved(&dir, "a.snap");
    let snap = SnapshotReader::open(&path).unwrap();
    // Slot 0 is the first page of the content area (4 KiB after the
    // start: the header and its padding take one page).
    let bad_gpa = pages(&orig)
        .into_iter()
        .find(|&g| snap.source(g).unwrap() == PageSource::Content(0))
        .unwrap();
    drop(snap);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let lazy = restore_lazy(Arc::clone(&snap), &mem, LazyOptions::default()).unwrap();
    // Other pages still read right while the error is pending (not those
    // of the damaged content: poisoned, a touch would be SIGBUS).
    let good: Vec<_> = pages(&orig)
        .into_iter()
        .filter(|&g| snap.source(g).unwrap() != PageSource::Content(0))
        .collect();
    assert!(!good.contains(&bad_gpa));
    for &gpa in good.iter().step_by(13) {
        assert!(touch(&mem, gpa) == page_of(&orig, gpa), "page {gpa}");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(lazy.wait());
    });
    let res = rx.recv_timeout(Duration::from_secs(60)).expect("wait hung");
    match res {
        Err(LazyError::Snapshot(SnapshotError::ContentHash { slot: 0, at })) => {
            assert_eq!(at.offset, 4096);
        }
        other => panic!("expected a content hash error, got {other:?}"),
    }
}

/// Threads of this process whose name starts with `pagefold-lazy`.
fn lazy_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("pagefold-lazy"))
        .count()
}

/// Waits (up to 10 s) until [`lazy_threads`] is at least `n` (or, for
/// `n == 0`, none): a thread names itself once running, and a joined
/// thread's task lingers a moment in `/proc`.
fn lazy_threads_become(n: usize) -> usize {
    let t0 = std::time::Instant::now();
    loop {
        let now = lazy_threads();
        if (n == 0 && now == 0) || (n > 0 && now >= n) || t0.elapsed() > Duration::from_secs(10) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn dropping_mid_way_ends_its_threads() {
    let _s = serial();
    let dir = TempDir::new("lazy-drop");
    let (_orig, path) = saved(&dir, "a.snap");
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let placed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = Arc::clone(&placed);
    let slow: pagefold::snapshot::FetchHook = Arc::new(move |_| {
        p.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
    });
    let lazy = restore_lazy(
        Arc::clone(&snap),
        &mem,
        LazyOptions {
            on_fetch: Some(slow),
            ..LazyOptions::default()
        },
    )
    .unwrap();
    assert_eq!(lazy_threads_become(2), 2);
    // Until a page is placed (the hook runs after its copy).
    let t0 = std::time::Instant::now();
    while placed.load(Ordering::Relaxed) == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(placed.load(Ordering::Relaxed) > 0);
    assert!(lazy.pages_done() < snap.pages());
    drop(lazy);
    assert_eq!(lazy_threads_become(0), 0);
    // The claim is given back, but pages are populated now: a second lazy
    // restore into this memory is refused as not fresh.
    let e = restore_lazy(snap, &mem, LazyOptions::default()).unwrap_err();
    assert!(matches!(e, LazyError::NotFresh { .. }), "{e}");
}

#[test]
fn memory_a_dedup_host_holds_is_refused_and_a_restore_blocks_dedup() {
    let _s = serial();
    let dir = TempDir::new("lazy-claim");
    let (_orig, path) = saved(&dir, "a.snap");
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let store = Arc::new(pagefold::FrameStore::memfd().unwrap());
    let host = pagefold::DedupHost::new(Arc::clone(&store)).unwrap();
    let held =
        Arc::new(GuestMemory::with_store(Arc::clone(&store), &snap.region_layout()).unwrap());
    host.register(Arc::clone(&held), pagefold::VmOptions::default())
        .unwrap();
    let e = restore_lazy(Arc::clone(&snap), &held, LazyOptions::default()).unwrap_err();
    assert!(matches!(e, LazyError::Claimed), "{e}");

    // And while a lazy restore runs, a dedup host cannot take the memory.
    let mem = Arc::new(GuestMemory::with_store(Arc::clone(&store), &snap.region_layout()).unwrap());
    let lazy = restore_lazy(Arc::clone(&snap), &mem, LazyOptions::default()).unwrap();
    assert!(host
        .register(Arc::clone(&mem), pagefold::VmOptions::default())
        .is_err());
    lazy.wait().unwrap();
}

/// Saves a snapshot in `dir` and damages the content of slot 0; returns
/// its path and a page whose content that is.
fn damaged(dir: &TempDir) -> (PathBuf, GuestPhysAddr) {
    let (orig, path) = saved(dir, "bad.snap");
    let snap = SnapshotReader::open(&path).unwrap();
    let gpa = pages(&orig)
        .into_iter()
        .find(|&g| snap.source(g).unwrap() == PageSource::Content(0))
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    (path, gpa)
}

const CHILD: &str = "PAGEFOLD_LAZY_TOUCH_DAMAGED";

/// Run as a child process by the next test (does nothing otherwise):
/// touches a damaged page through its raw pointer, which must end in
/// SIGBUS (the page is poisoned), not a hang and not zeros.
#[test]
fn child_touches_a_damaged_page() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    let gpa = GuestPhysAddr(
        std::env::var(format!("{CHILD}_GPA"))
            .unwrap()
            .parse()
            .unwrap(),
    );
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = GuestMemory::new(&snap.region_layout()).unwrap();
    let _lazy = restore_lazy(snap, &mem, LazyOptions::default()).unwrap();
    let page = touch(&mem, gpa);
    // Reached only if the kernel could not poison (zero-filled instead).
    assert!(page.iter().all(|&b| b == 0));
    std::process::exit(3);
}

#[test]
fn touching_a_damaged_page_is_a_memory_error_not_a_hang() {
    use std::os::unix::process::ExitStatusExt;
    let _s = serial();
    let dir = TempDir::new("lazy-touchbad");
    let (path, gpa) = damaged(&dir);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_touches_a_damaged_page",
            "--test-threads=1",
        ])
        .env(CHILD, &path)
        .env(format!("{CHILD}_GPA"), gpa.0.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the touch of a damaged page hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("child ended: {status:?}");
    // SIGBUS where the kernel has UFFDIO_POISON (6.6+), else exit 3
    // (zeros after the error was recorded).
    assert!(
        status.signal() == Some(libc::SIGBUS) || status.code() == Some(3),
        "{status:?}"
    );
}

/// Touches from rayon's global pool: every worker may wait in a fault, and
/// the handler (which never waits on that pool) still serves them all.
#[test]
fn touches_from_every_rayon_worker_are_served() {
    use rayon::prelude::*;
    let _s = serial();
    let dir = TempDir::new("lazy-rayon");
    let (orig, path) = saved(&dir, "a.snap");
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let mem = Arc::new(GuestMemory::new(&snap.region_layout()).unwrap());
    let orig = Arc::new(orig);
    let gate = Arc::new(AtomicBool::new(false));
    let opts = LazyOptions {
        on_fetch: Some(gated(&gate)),
        ..LazyOptions::default()
    };
    let lazy = restore_lazy(Arc::clone(&snap), &mem, opts).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (m, o) = (Arc::clone(&mem), Arc::clone(&orig));
    std::thread::spawn(move || {
        let ok = pages(&o)
            .par_iter()
            .all(|&gpa| touch(&m, gpa) == page_of(&o, gpa));
        let _ = tx.send(ok);
    });
    let ok = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("touches from rayon workers hung");
    assert!(ok);
    gate.store(true, Ordering::Release);
    let stats = lazy.wait().unwrap();
    assert!(stats.on_fault > stats.pages / 2, "{stats:?}");
}

/// Memory on huge pages is refused up front, with a typed error, before
/// anything is registered or touched (a missing fault there would be
/// served a huge page at a time, which 4 KiB snapshot pages do not fill).
#[test]
fn hugetlb_memory_is_refused_up_front() {
    use pagefold::{
        frames::{Backing, StoreOptions},
        FrameStore, PageSize,
    };
    let _s = serial();
    let dir = TempDir::new("lazy-huge");
    let mem = GuestMemory::new(&[(GuestPhysAddr(0), 4 << 20)]).unwrap();
    mem.write(GuestPhysAddr(0x5000), &[7u8; PAGE_SIZE]).unwrap();
    let path = dir.path("h.snap");
    save(&mem, &path, &SaveOptions::default()).unwrap();
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let store = match FrameStore::new(StoreOptions {
        backing: Backing::Hugetlb(PageSize::Size2M),
        ..StoreOptions::default()
    }) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("SKIPPED hugetlb lazy refusal: {e}");
            return;
        }
    };
    let huge = match GuestMemory::with_store(store, &[(GuestPhysAddr(0), 4 << 20)]) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED hugetlb lazy refusal (no huge pages reserved?): {e}");
            return;
        }
    };
    let e = restore_lazy(snap, &huge, LazyOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            LazyError::HugePages {
                granule: PageSize::Size2M
            }
        ),
        "{e}"
    );
}

#[test]
fn a_delayed_fetch_serves_faults_first_and_a_drop_ends_it_at_once() {
    let _g = serial();
    let dir = TempDir::new("lazy-delay");
    let (src, path) = saved(&dir, "delay.snap");
    let fetched = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&fetched);
    let hook: pagefold::snapshot::FetchHook = Arc::new(move |_| seen.store(true, Ordering::SeqCst));
    let opts = |delay| LazyOptions {
        on_fetch: Some(Arc::clone(&hook)),
        fetch_delay: Duration::from_secs(delay),
        ..LazyOptions::default()
    };
    // Touches while the fetch waits are served on fault, byte for byte.
    let snap = Arc::new(SnapshotReader::open(&path).unwrap());
    let dst = GuestMemory::new(&layout()).unwrap();
    let lazy = restore_lazy(Arc::clone(&snap), &dst, opts(3600)).unwrap();
    for gpa in pages(&src).into_iter().step_by(7) {
        assert_eq!(touch(&dst, gpa), page_of(&src, gpa), "{gpa:?}");
    }
    assert!(!fetched.load(Ordering::SeqCst), "the fetch started early");
    // Dropped while the fetch still waits: the drop joins its thread,
    // which ends now, not in an hour.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(lazy);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(60)).is_ok(),
        "dropping a restore whose fetch waits hangs"
    );
    // A short delay still completes the restore.
    let dst = GuestMemory::new(&layout()).unwrap();
    let stats = restore_lazy(
        snap,
        &dst,
        LazyOptions {
            fetch_delay: Duration::from_millis(20),
            ..LazyOptions::default()
        },
    )
    .unwrap()
    .wait()
    .unwrap();
    assert!(stats.fetched > 0, "{stats:?}");
    for gpa in pages(&src) {
        assert_eq!(page_of(&dst, gpa), page_of(&src, gpa), "{gpa:?}");
    }
}

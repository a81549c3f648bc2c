//! Dedup's bookkeeping per tracked page, measured as the process's
//! anonymous memory (`RssAnon`: guest memory is shmem and not in it), on
//! four clones of `GIB` GiB (nine pages in ten the same in every clone,
//! one its own): after a full merge, at its peak (sampled every
//! millisecond while `merge_now` runs), after `malloc_trim`, and after two
//! incremental full scans; and the library's own figure (`profit_bytes`'
//! metadata: saved bytes less profit). Target: at most 24 bytes per page,
//! peak included (Linux KSM: about 64).
//!
//! `cargo run --release --example dedup_metadata [GIB]`
//! (`benches/dedup_budget.sh` runs it.)

#![allow(clippy::cast_possible_truncation)] // sizes and fill bytes of a benchmark

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use pagefold::{
    DedupHost, FrameStore, GuestMemory, GuestPhysAddr, ScanBudget, VmOptions, PAGE_SIZE,
};

/// The system allocator, counting the bytes live now and at their peak:
/// what the library holds, whatever the allocator keeps besides.
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters only observe sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            let now =
                LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded: `ptr` came from `alloc` with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            let now = LIVE.fetch_add(new as u64, Ordering::Relaxed) + new as u64;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1.0);
    let n = (gib * f64::from(1u32 << 18)) as u64;
    // Build one page at a time: no buffer the size of a VM.
    let base = rss_anon();
    let base_live = LIVE.load(Ordering::Relaxed);
    let store = Arc::new(FrameStore::memfd()?);
    let mut vms = Vec::new();
    for v in 0..4u64 {
        let mem = GuestMemory::with_store(Arc::clone(&store), &[(GuestPhysAddr(0), n << 12)])?;
        let mut p = [0u8; PAGE_SIZE];
        for i in 0..n {
            let own = i % 10 == 9;
            p.fill(if own {
                0x80 + v as u8
            } else {
                (i % 200) as u8 + 1
            });
            p[0..8].copy_from_slice(&(i + 1).to_le_bytes());
            mem.write(GuestPhysAddr(i << 12), &p)?;
        }
        vms.push(Arc::new(mem));
    }
    let pages = 4 * n;
    let host = DedupHost::new(Arc::clone(&store))?;
    for m in &vms {
        host.register(Arc::clone(m), VmOptions::default())?;
    }
    let before = rss_anon();
    let live_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(live_before, Ordering::Relaxed);
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let t = std::time::Instant::now();
    host.merge_now()?;
    let merge_secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let after = rss_anon();
    let merge_peak = PEAK.load(Ordering::Relaxed);
    let s = host.stats()?;
    let saved = (s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64;
    let own_figure = saved as i64 - s.profit_bytes;
    let per = |b: u64| b.saturating_sub(base) as f64 / pages as f64;
    println!(
        "four {gib} GiB clones, {pages} pages: pages_shared {} pages_sharing {}, merge_now {merge_secs:.3} s",
        s.pages_shared, s.pages_sharing
    );
    println!(
        "bytes per tracked page: after merge_now {:.1}, peak {:.1}, library's own figure {:.1}",
        per(after),
        per(peak.load(Ordering::Relaxed)),
        own_figure as f64 / pages as f64
    );
    // Heap bytes the library holds (live allocations), page-state tables
    // included (allocated with the guest memory, counted from `base_live`).
    let live = |b: u64| b.saturating_sub(base_live) as f64 / pages as f64;
    println!(
        "allocated by the library, bytes per tracked page: after merge_now {:.1}, peak {:.1}",
        live(LIVE.load(Ordering::Relaxed)),
        live(merge_peak)
    );
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    println!(
        "bytes per tracked page after malloc_trim: {:.1}",
        per(rss_anon())
    );
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    for _ in 0..2 {
        loop {
            let r = host.scan_step(ScanBudget::Pages(1 << 16))?;
            if r.full_scan_completed {
                break;
            }
        }
    }
    println!(
        "bytes per tracked page after two incremental full scans: {:.1}, allocated {:.1}, \
         peak allocated while scanning {:.1} (before registering: {:.1})",
        per(rss_anon()),
        live(LIVE.load(Ordering::Relaxed)),
        live(PEAK.load(Ordering::Relaxed)),
        per(before)
    );
    Ok(())
}

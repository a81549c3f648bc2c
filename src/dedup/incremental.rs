//! The incremental scan: a step over the next pages with a budget of pages
//! or time, and the background scanner's step, spent a batch at a time.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use super::{
    error::DedupError,
    locks::{lock, read},
    options::ScanBudget,
    pipeline, reconcile, scan,
    scan::next_pages,
    state::Inner,
    stats::ScanReport,
};

/// The background scanner's step: `budget` spent in steps of one batch
/// each, so the scan lock is free between batches (statistics,
/// `merge_now`, unmerging and registration get in even when the budget
/// is many full scans), and `stop` ends it between batches.
pub(super) fn background_step(
    inner: &Inner,
    budget: ScanBudget,
    stop: &AtomicBool,
) -> Result<(), DedupError> {
    const BATCH: u64 = 4096;
    let started = Instant::now();
    let mut left = match budget {
        ScanBudget::Pages(n) => n,
        ScanBudget::Time(_) => u64::MAX,
    };
    // The mapping budget is read at the start of a step and then at
    // most every 100 ms (it reads /proc/self/maps, which takes the mmap
    // lock the vCPUs' faults need; per batch was measured too dear), so
    // a step with a budget of many full scans still sees mappings the
    // rest of the process made or freed (found by review: an endless
    // step merged past the headroom, or stayed stopped after it).
    const MAP_REFRESH: Duration = Duration::from_millis(100);
    inner.refresh_map_budget();
    let mut refreshed = Instant::now();
    while left > 0 && !stop.load(Ordering::Relaxed) {
        if refreshed.elapsed() >= MAP_REFRESH {
            inner.refresh_map_budget();
            refreshed = Instant::now();
        }
        let r = scan_step(inner, ScanBudget::Pages(left.min(BATCH)), Some(stop), false)?;
        if r.pages_scanned == 0 {
            return Ok(()); // nothing to scan
        }
        left = left.saturating_sub(r.pages_scanned);
        if let ScanBudget::Time(d) = budget {
            if started.elapsed() >= d {
                return Ok(());
            }
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// One step; `stop` (the background scanner's flag) ends it between
/// batches; `refresh` re-reads the mapping budget first.
pub(super) fn scan_step(
    inner: &Inner,
    budget: ScanBudget,
    stop: Option<&AtomicBool>,
    refresh: bool,
) -> Result<ScanReport, DedupError> {
    const BATCH: usize = 4096;
    let started = Instant::now();
    let mut scan = lock(&inner.scan);
    let vms = read(&inner.vms).clone();
    if refresh {
        inner.refresh_map_budget();
    }
    let mut total = ScanReport::default();
    let mut left = match budget {
        ScanBudget::Pages(n) => n,
        ScanBudget::Time(_) => u64::MAX,
    };
    while left > 0 && !vms.is_empty() {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        if let ScanBudget::Time(d) = budget {
            // At least one batch, however short the budget.
            if started.elapsed() >= d && total.pages_scanned > 0 {
                break;
            }
        }
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(BATCH);
        let (refs, wrapped) = next_pages(&mut scan.cursor, &vms, want);
        let visited = refs.len();
        left = left.saturating_sub(visited as u64);
        let incremental = scan::Mode {
            volatility: true,
            unstable: true,
            share: (1, 1),
            batch: None,
        };
        let r = pipeline::process(inner, &mut scan, &vms, refs, incremental, None)?;
        inner
            .map_limit_hits
            .fetch_add(r.map_limit, Ordering::Relaxed);
        total.add(&r);
        if wrapped {
            inner.full_scans.fetch_add(1, Ordering::Relaxed);
            scan.unstable.clear();
            scan.volatile_last_scan = std::mem::take(&mut scan.volatile_this_scan);
            reconcile::reconcile(inner, &mut scan, &vms)?;
            lock(&inner.shared).trim();
            total.full_scan_completed = true;
        }
        if visited == 0 {
            // Nothing to scan at all (every region excluded).
            break;
        }
    }
    Ok(total)
}

//! Dedup statistics with KSM's meanings, and the kernel's own view of the
//! memory (store blocks, RSS/PSS, mappings) that every saving is checked
//! against.

use super::error::DedupError;
use crate::{frames::FrameStore, host::proc};

/// Host-wide dedup statistics (names and meanings as in
/// `/sys/kernel/mm/ksm/`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Pages of all registered VMs.
    pub pages_total: u64,
    /// Shared frames in use.
    pub pages_shared: u64,
    /// Guest pages mapping a shared frame beyond the first of each: the
    /// pages saved by sharing.
    pub pages_sharing: u64,
    /// Pages seen stable this full scan with no match (incremental mode).
    pub pages_unshared: u64,
    /// Pages whose content changed between visits (last full scan).
    pub pages_volatile: u64,
    /// Zero pages released (no frame, no shared copy).
    pub zero_pages: u64,
    /// Full passes over all VMs.
    pub full_scans: u64,
    /// Writes to merged pages that made a private copy.
    pub cow_breaks: u64,
    /// Pages not merged because the process neared `vm.max_map_count`.
    pub map_limit_hits: u64,
    /// Write faults the userfaultfd handler saw (writers that met a merge
    /// in progress).
    pub write_faults_seen: u64,
    /// Background scan steps that failed (see `DedupHost::start_background`).
    pub background_errors: u64,
    /// Bytes saved minus [`metadata_bytes`](Self::metadata_bytes) (KSM's
    /// general_profit).
    pub profit_bytes: i64,
    /// Bytes of bookkeeping allocated now, as allocated (capacities, not
    /// lengths): the page-state tables of the registered VMs, the hash each
    /// page left at its last visit, the unstable index and the shared-frame
    /// table.
    pub metadata_bytes: u64,
}

/// Per-VM statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Pages of the VM.
    pub pages: u64,
    /// Pages mapping a shared frame.
    pub pages_merged: u64,
    /// Zero pages released.
    pub zero_pages: u64,
    /// Writes to merged pages that made a private copy.
    pub cow_breaks: u64,
}

/// What one `merge_now` (all its passes; `map_limit` from the last) or scan step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Pages visited.
    pub pages_scanned: u64,
    /// Pages newly mapped onto a shared frame.
    pub merged_shared: u64,
    /// Zero pages newly released.
    pub merged_zero: u64,
    /// Pages skipped because their hash changed since the last visit.
    pub volatile: u64,
    /// Pages whose bytes changed between hashing and merging.
    pub changed: u64,
    /// Pages another operation held.
    pub busy: u64,
    /// Pages not merged for lack of kernel mappings.
    pub map_limit: u64,
    /// Remap calls made.
    pub remaps: u64,
    /// Pages read and hashed.
    pub pages_hashed: u64,
    /// Wall-clock nanoseconds spent hashing.
    pub hash_nanos: u64,
    /// Threads that hashed in parallel.
    pub hash_threads: u64,
    /// Wall-clock nanoseconds spent grouping and comparing candidates.
    pub group_nanos: u64,
    /// Wall-clock nanoseconds spent merging (protect, compare, remap, punch).
    pub merge_nanos: u64,
    /// Whether a full pass over all VMs ended in this call.
    pub full_scan_completed: bool,
}

impl ScanReport {
    pub(crate) fn add(&mut self, o: &ScanReport) {
        self.pages_scanned += o.pages_scanned;
        self.merged_shared += o.merged_shared;
        self.merged_zero += o.merged_zero;
        self.volatile += o.volatile;
        self.changed += o.changed;
        self.busy += o.busy;
        self.map_limit += o.map_limit;
        self.remaps += o.remaps;
        self.pages_hashed += o.pages_hashed;
        self.hash_nanos += o.hash_nanos;
        self.hash_threads = self.hash_threads.max(o.hash_threads);
        self.group_nanos += o.group_nanos;
        self.merge_nanos += o.merge_nanos;
        self.full_scan_completed |= o.full_scan_completed;
    }
}

/// The kernel's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Bytes the frame store's memfd really holds.
    pub store_bytes: u64,
    /// Resident set of the process.
    pub rss_bytes: u64,
    /// Proportional set of the process (shared pages divided by sharers).
    pub pss_bytes: u64,
    /// Anonymous memory of the process (includes pages the kernel copied on
    /// write to a merged page).
    pub anon_bytes: u64,
    /// Mappings (VMAs) of the whole process.
    pub mappings: u64,
    /// Mappings covering registered guest memory.
    pub guest_mappings: u64,
}

pub(super) fn kernel_view(
    stores: &[&std::sync::Arc<FrameStore>],
    ranges: &[(u64, u64)],
) -> Result<KernelView, DedupError> {
    let proc_err = |what| move |source| DedupError::Proc { what, source };
    let rollup = proc::rollup().map_err(proc_err(proc::SMAPS_ROLLUP))?;
    let maps = proc::mappings().map_err(proc_err(proc::MAPS))?;
    let mappings = maps.len() as u64;
    let guest_mappings = maps
        .iter()
        .flatten()
        .filter(|&&(a, b)| ranges.iter().any(|&(s, e)| a < e && b > s))
        .count() as u64;
    Ok(KernelView {
        store_bytes: stores.iter().try_fold(0u64, |sum, s| {
            s.allocated_bytes().map(|b| sum.saturating_add(b))
        })?,
        rss_bytes: rollup.rss,
        pss_bytes: rollup.pss,
        anon_bytes: rollup.anon,
        mappings,
        guest_mappings,
    })
}

/// Nanoseconds since `t`, saturating (the phase timers of a report).
pub(super) fn nanos_since(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

//! Who takes part in deduplication and how: merge domains, VM ids, per-VM
//! and per-host options, and the budget of an incremental step.

use std::time::Duration;

use crate::addr::GuestPhysAddr;

/// A merge domain (tenant). Pages of different domains are never shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub u32);

/// A VM registered with a [`DedupHost`](super::DedupHost).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub u64);

/// How a VM takes part in deduplication.
#[derive(Clone, Debug, Default)]
pub struct VmOptions {
    /// Its merge domain.
    pub domain: DomainId,
    /// Start addresses of regions to leave alone (device memory, regions
    /// shared with another process through their fd).
    pub exclude: Vec<GuestPhysAddr>,
}

/// How much one [`DedupHost::scan_step`](super::DedupHost::scan_step) may do.
#[derive(Clone, Copy, Debug)]
pub enum ScanBudget {
    /// Visit at most this many pages.
    Pages(u64),
    /// Stop starting new batches after this long.
    Time(Duration),
}

/// Options of a dedup host.
#[derive(Clone, Debug)]
pub struct DedupOptions {
    /// Kernel mappings (VMAs) kept for the rest of the process, in the frame
    /// store's [`MapBudget`](crate::frames::MapBudget), which every remap of
    /// its guest pages spends from: below it merging stops, an unmerge takes
    /// back part of a merged stretch instead of splitting it, and a discard
    /// leaves merged pages merged.
    pub map_headroom: u64,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions { map_headroom: 4096 }
    }
}

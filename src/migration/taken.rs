//! The pages a migration sender took from the dirty log, put back into
//! the log when the sender ends. The log is the record of what changed
//! since the last snapshot as well as what a migration must send: a
//! sender that was cancelled, failed, or finished on a source that keeps
//! running must not leave an incremental snapshot on that last snapshot
//! missing the pages its rounds took (found by review: a cancelled
//! migration left the next incremental snapshot restoring old bytes).

use crate::{addr::PAGE_SHIFT, dirty::DirtyRun, memory::GuestMemory};

/// One bit per page of each region: set once a harvest took the page.
pub(super) struct TakenPages {
    bitmaps: Vec<Vec<u64>>,
}

impl TakenPages {
    /// Nothing taken yet from `mem`'s regions.
    pub(super) fn new(mem: &GuestMemory) -> Self {
        TakenPages {
            bitmaps: mem
                .regions()
                .iter()
                .map(|r| vec![0u64; r.pages().div_ceil(64)])
                .collect(),
        }
    }

    /// Records `runs` (as a harvest of `mem` returns them: each within
    /// one region).
    pub(super) fn record(&mut self, mem: &GuestMemory, runs: &[DirtyRun]) {
        for run in runs {
            let Some(index) = mem.find_region(run.start) else {
                continue;
            };
            let region = &mem.regions()[index];
            let Some(map) = self.bitmaps.get_mut(index) else {
                continue;
            };
            let first = ((run.start.0 - region.start().0) >> PAGE_SHIFT) as usize;
            let end = first
                .saturating_add(usize::try_from(run.pages).unwrap_or(usize::MAX))
                .min(region.pages());
            for page in first..end {
                map[page / 64] |= 1 << (page % 64);
            }
        }
    }

    /// Marks every page taken dirty again in `mem`'s log (whether its
    /// tracking is on or not), leaving nothing recorded.
    pub(super) fn put_back(&mut self, mem: &GuestMemory) {
        for (index, map) in self.bitmaps.iter_mut().enumerate() {
            if map.iter().any(|&w| w != 0) {
                // Sized from the region's pages with no bit past its last
                // page: the merge cannot refuse it.
                let _ = mem.merge_dirty_bitmap(index, map);
                map.fill(0);
            }
        }
    }
}

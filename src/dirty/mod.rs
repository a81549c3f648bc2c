//! The dirty log: which guest pages changed since the last harvest, for
//! live migration and snapshots.
//!
//! Each region has a two-level atomic bitmap (`memory/dirty_bitmap.rs`, in
//! the region's `RegionLog`, `memory/dirty_log.rs`: one bit per
//! 4 KiB page, and a summary bit per 64-page word), so a harvest costs what
//! is dirty, not what is mapped. Three sources feed it:
//!
//! - every write through [`GuestMemory`]'s API (`write`, `write_obj`,
//!   `fill`, atomic `store`/`swap`/successful `compare_exchange`, the page
//!   walker's accessed/dirty updates, `discard`), while tracking is on for
//!   the region ([`GuestMemory::set_dirty_tracking`]);
//! - bitmaps handed over by the VMM, e.g. KVM's `KVM_GET_DIRTY_LOG`
//!   ([`GuestMemory::merge_dirty_bitmap`]);
//! - [`RawWriteTracker`]: writes through raw host pointers (device models,
//!   vCPUs), found with userfaultfd asynchronous write protection and the
//!   `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! [`GuestMemory::harvest_dirty`] takes the marked pages as runs and clears
//! them; a write that races with a harvest is reported by that harvest or
//! the next, never lost (the argument is in `memory/dirty_bitmap.rs`).
//!
//! This module never changes guest memory or page backing: it only reads
//! and clears bits.

mod barrier;
mod tracker;

pub use tracker::RawWriteTracker;

use crate::{
    addr::{usize_from, GuestFrame, GuestPhysAddr, HostVirtAddr, PAGE_SHIFT},
    memory::{DirtyBitmap, GuestMemory, RegionLog},
    userfault::UserfaultError,
};

/// Errors of the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A region index is not below the number of regions.
    #[error("region index {index} is not below the region count {count}")]
    NoSuchRegion {
        /// The index asked for.
        index: usize,
        /// Regions in the memory.
        count: usize,
    },
    /// The bitmap of a region could not be allocated.
    #[error("cannot allocate the dirty bitmap of region {index} ({pages} pages)")]
    OutOfMemory {
        /// The region.
        index: usize,
        /// Its pages.
        pages: usize,
    },
    /// A merged bitmap does not have one bit per page of the region, rounded
    /// up to whole 64-bit words (KVM's layout), or sets bits past the end.
    #[error("bitmap for region {index} has {words} words or bits past page {pages}; it needs {pages} bits in {} words", pages.div_ceil(64))]
    BitmapSize {
        /// The region.
        index: usize,
        /// Pages in the region.
        pages: usize,
        /// Words handed over.
        words: usize,
    },
    /// The raw-write tracker cannot run on this kernel: no userfaultfd, no
    /// asynchronous write protection (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+)
    /// or no `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap`. Library writes,
    /// KVM bitmaps and the rest of the log work without it.
    #[error("raw-write tracking unavailable: {reason}")]
    TrackerUnavailable {
        /// What is missing.
        reason: String,
    },
    /// The memory's userfaultfd registration is taken: it is registered
    /// with a dedup host (which write-protects and remaps pages with its own
    /// synchronous userfaultfd; a mapping can be registered with one
    /// userfaultfd only, and a remap would drop the tracker's protection)
    /// or already has a raw-write tracker.
    #[error("the guest memory is registered with a dedup host or another raw-write tracker; raw-write tracking and dedup cannot share its userfaultfd registration")]
    UserfaultTaken,
    /// A migration sender holds the log of region `index`: its rounds
    /// send what they harvest, so a harvest now would take pages the
    /// destination then never gets. Harvest once the sender is done (it
    /// puts back every page it took, so the log misses nothing).
    #[error("region {index}'s dirty log is held by a migration sender; a harvest now would take pages it must send")]
    LogInUse {
        /// The first region of the harvest a sender holds.
        index: usize,
    },
    /// An address is in no region.
    #[error("guest-physical address {addr} is in no region")]
    Unmapped {
        /// The address.
        addr: GuestPhysAddr,
    },
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Userfault(#[from] UserfaultError),
    /// `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN on [{start:#x}, {end:#x}) failed: {source}")]
    Scan {
        /// Host range start.
        start: HostVirtAddr,
        /// Host range end.
        end: HostVirtAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Which regions an operation applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionSet {
    /// Every region of the memory.
    All,
    /// The region with this index (regions are numbered in address order).
    One(usize),
}

/// A run of consecutive dirty pages: `pages` 4 KiB pages from `start`.
/// Runs never cross a region's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyRun {
    /// Guest-physical address of the first page.
    pub start: GuestPhysAddr,
    /// Number of pages.
    pub pages: u64,
}

impl DirtyRun {
    /// The guest-physical address of each page of the run, in order.
    pub fn addrs(&self) -> impl Iterator<Item = GuestPhysAddr> {
        let first = self.start.frame();
        (0..self.pages).map(move |i| GuestFrame(first.0 + i).addr())
    }
}

/// The bitmap of region `index`'s log, allocated on first use.
/// [`GuestMemory::merge_dirty_bitmap`] into one region (`index` names it
/// in errors): for KVM slots of regions added after their VM was made.
pub(crate) fn merge_region_bitmap(
    r: &crate::memory::GuestRegion,
    index: usize,
    bitmap: &[u64],
) -> Result<(), DirtyError> {
    let pages = r.pages();
    let tail_ok = match bitmap.last() {
        Some(&last) if pages % 64 != 0 => last >> (pages % 64) == 0,
        _ => true,
    };
    if bitmap.len() != pages.div_ceil(64) || !tail_ok {
        return Err(DirtyError::BitmapSize {
            index,
            pages,
            words: bitmap.len(),
        });
    }
    region_bitmap(r.dirty_log(), index)?.merge(bitmap);
    Ok(())
}

pub(crate) fn region_bitmap(log: &RegionLog, index: usize) -> Result<&DirtyBitmap, DirtyError> {
    log.bitmap().ok_or(DirtyError::OutOfMemory {
        index,
        pages: log.pages(),
    })
}

impl GuestMemory {
    fn region_indices(&self, which: RegionSet) -> Result<std::ops::Range<usize>, DirtyError> {
        let count = self.regions().len();
        match which {
            RegionSet::All => Ok(0..count),
            RegionSet::One(index) if index < count => Ok(index..index + 1),
            RegionSet::One(index) => Err(DirtyError::NoSuchRegion { index, count }),
        }
    }

    /// Starts (`on`) or stops dirty tracking of library writes for the
    /// regions in `which`. Starting is cheap whatever the region's size: the
    /// bitmap is allocated zeroed on first use (the kernel backs it with
    /// zero pages as bits are set; 512 KiB of address space per 16 GiB).
    ///
    /// Every library write that *returns* after `set_dirty_tracking(_,
    /// true)` returns is logged, and so is any write still in flight whose
    /// bytes a copy made after this call could miss: the call ends with a
    /// process-wide memory barrier, so a writer that read the flag as off
    /// had its bytes globally visible by then.
    ///
    /// Stopping drops nothing: pages already logged stay logged until a
    /// harvest takes them (a migration that pauses tracking must not lose
    /// what was dirtied before); writes after the stop are not logged.
    pub fn set_dirty_tracking(&self, which: RegionSet, on: bool) -> Result<(), DirtyError> {
        let range = self.region_indices(which)?;
        for i in range.clone() {
            if on {
                region_bitmap(self.regions()[i].dirty_log(), i)?;
            }
        }
        for i in range {
            self.regions()[i].dirty_log().set_on(on);
        }
        if on {
            barrier::heavy();
        }
        Ok(())
    }

    /// Whether library writes to region `index` are logged now.
    pub fn dirty_tracking(&self, index: usize) -> Result<bool, DirtyError> {
        let count = self.regions().len();
        let r = self
            .regions()
            .get(index)
            .ok_or(DirtyError::NoSuchRegion { index, count })?;
        Ok(r.dirty_log().is_on())
    }

    /// Takes the dirty pages of the regions in `which`: appends them to
    /// `out` as runs in address order and clears them, word by word. Returns
    /// the number of pages. A write racing with the harvest is reported by
    /// this harvest or the next; the bytes of every reported write are
    /// visible to a copy made after this returns. Regions that were never
    /// tracked and never merged into report nothing.
    ///
    /// The log has one reader at a time: while a migration sender holds a
    /// region, a harvest of it is [`DirtyError::LogInUse`].
    pub fn harvest_dirty(
        &self,
        which: RegionSet,
        out: &mut Vec<DirtyRun>,
    ) -> Result<u64, DirtyError> {
        let range = self.region_indices(which)?;
        if let Some(index) = range.clone().find(|&i| self.region_migrating(i)) {
            return Err(DirtyError::LogInUse { index });
        }
        self.take_dirty(which, out)
    }

    /// [`harvest_dirty`](Self::harvest_dirty) for the holder of the
    /// migration claim (a sender's rounds, a save's clearing harvest).
    pub(crate) fn take_dirty(
        &self,
        which: RegionSet,
        out: &mut Vec<DirtyRun>,
    ) -> Result<u64, DirtyError> {
        let range = self.region_indices(which)?;
        let mut total = 0u64;
        for i in range {
            let r = &self.regions()[i];
            let Some(b) = r.dirty_log().allocated_bitmap() else {
                continue;
            };
            let base = r.start().0;
            total += b.take(|first, count| {
                out.push(DirtyRun {
                    start: GuestPhysAddr(base + ((first as u64) << PAGE_SHIFT)),
                    pages: count as u64,
                });
            }) as u64;
        }
        if total != 0 {
            // Writers that skipped an already-set bit rely on this barrier
            // for their bytes to be visible to the caller's copies.
            barrier::heavy();
        }
        Ok(total)
    }

    /// ORs a dirty bitmap from another source into region `index`'s log:
    /// bit `i` (bit `i % 64` of word `i / 64`, little-endian words, as
    /// `KVM_GET_DIRTY_LOG` returns them) is page `i` of the region. The
    /// bitmap must have exactly `ceil(pages / 64)` words and no bit set past
    /// the last page. Works whether or not tracking is on.
    pub fn merge_dirty_bitmap(&self, index: usize, bitmap: &[u64]) -> Result<(), DirtyError> {
        let count = self.regions().len();
        let r = self
            .regions()
            .get(index)
            .ok_or(DirtyError::NoSuchRegion { index, count })?;
        merge_region_bitmap(r, index, bitmap)
    }

    /// Marks `pages` pages from the page holding `start` dirty, whether or
    /// not tracking is on: for writes the log cannot see (a DMA a device
    /// model made through a raw pointer without the tracker), or to put
    /// back runs a caller took but could not use. The range may span
    /// adjacent regions; a hole is `Unmapped` and nothing is marked.
    pub fn mark_dirty(&self, start: GuestPhysAddr, pages: u64) -> Result<(), DirtyError> {
        let first = start.frame();
        let end = first
            .checked_add(pages)
            .filter(|e| e.start().is_some())
            .ok_or(DirtyError::Unmapped { addr: start })?;
        // Check the whole span first, then mark.
        for pass in 0..2 {
            let mut page = first;
            while page < end {
                let addr = page.addr();
                let i = self
                    .find_region(addr)
                    .ok_or(DirtyError::Unmapped { addr })?;
                let r = &self.regions()[i];
                let off = (addr.0 - r.start().0) >> PAGE_SHIFT;
                let n = (end.0 - page.0).min(r.pages() as u64 - off);
                if pass == 1 {
                    region_bitmap(r.dirty_log(), i)?.mark_pages(usize_from(off), usize_from(n));
                }
                page = GuestFrame(page.0 + n);
            }
        }
        Ok(())
    }

    /// Whether page `gpa` is logged dirty now (a snapshot, without
    /// clearing; `false` for an address in no region).
    pub fn is_dirty(&self, gpa: GuestPhysAddr) -> bool {
        let Some(i) = self.find_region(gpa) else {
            return false;
        };
        let r = &self.regions()[i];
        r.dirty_log()
            .allocated_bitmap()
            .is_some_and(|b| b.is_marked(((gpa.0 - r.start().0) >> PAGE_SHIFT) as usize))
    }
}

/// The mechanism behind the process-wide barrier (`"membarrier"`, or a
/// fallback), for diagnostics and test output.
pub fn barrier_mechanism() -> &'static str {
    barrier::mechanism()
}

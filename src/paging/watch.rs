//! `TableWatch`: the one signal from writers of guest memory to walk
//! caches that a page holding page tables changed. Writers (a
//! [`crate::memory::WriteObserver`], or the VMM by hand) tell it what they
//! wrote; caches mark the table pages they read and flush when its
//! generation moves. It knows nothing of caches or walks.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use crate::addr::{GuestPhysAddr, PAGE_SHIFT};

/// Signals writes to guest page-table pages. Install one on guest memory
/// ([`crate::GuestMemory::set_write_observer`]: every library write then
/// reaches it) or call [`TableWatch::note_write`] yourself, and attach it to
/// every vCPU's `WalkCache`; a cache checks it on each translation (one
/// atomic load) and drops everything after a write to a page it has read
/// tables from. The walker's own accessed/dirty updates do not count.
#[derive(Debug)]
pub struct TableWatch {
    generation: AtomicU64,
    /// A 4096-bit filter of table frames read by any attached cache: a
    /// write to a frame whose bit is clear is certainly not a table.
    filter: [AtomicU64; 64],
}

impl TableWatch {
    /// A new watch.
    pub fn new() -> Arc<Self> {
        Arc::new(TableWatch {
            generation: AtomicU64::new(0),
            filter: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    #[inline]
    fn bit(gpa: u64) -> (usize, u64) {
        let frame = gpa >> PAGE_SHIFT;
        let h = frame.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52;
        ((h >> 6) as usize & 63, 1u64 << (h & 63))
    }

    /// Records that tables are read from the page holding `gpa`; `true`
    /// if its bit was clear until now. A read-modify-write in sequential
    /// consistency, paired with the fence in `note_write`: of a walk that
    /// reads the page's entries after this and a write to them that is
    /// followed by `note_write`, either the walk reads the new bytes or the
    /// writer sees the bit (and flushes the caches).
    pub(crate) fn note_table(&self, gpa: u64) -> bool {
        let (w, b) = Self::bit(gpa);
        self.filter[w].fetch_or(b, Ordering::SeqCst) & b == 0
    }

    /// Tells the watch that `[gpa, gpa + len)` was written. If any page of
    /// the range may hold a page table an attached cache used, every
    /// attached cache flushes before its next translation.
    pub fn note_write(&self, gpa: GuestPhysAddr, len: u64) {
        if len == 0 {
            return;
        }
        // The write's bytes are stored; order them before the filter's
        // loads (see `note_table`).
        std::sync::atomic::fence(Ordering::SeqCst);
        let first = gpa.0 >> PAGE_SHIFT;
        let last = gpa.0.saturating_add(len - 1) >> PAGE_SHIFT;
        // Bounded: past 64 pages, flush rather than test each.
        let hit = last - first >= 64
            || (first..=last).any(|f| {
                let (w, b) = Self::bit(f << PAGE_SHIFT);
                self.filter[w].load(Ordering::SeqCst) & b != 0
            });
        if hit {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Bumped by every write that may have hit a table.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl crate::memory::WriteObserver for TableWatch {
    fn wrote(&self, gpa: GuestPhysAddr, len: u64) {
        self.note_write(gpa, len);
    }
}

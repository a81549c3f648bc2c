//! A region's dirty log: whether library writes mark it, and its bitmap
//! (`dirty_bitmap.rs`). It lives with the region, below the `dirty` layer
//! that harvests, merges and tracks raw writes, because every library write
//! of this layer marks it.

use std::sync::{
    atomic::{compiler_fence, AtomicBool, Ordering},
    OnceLock,
};

use super::dirty_bitmap::DirtyBitmap;
use crate::addr::PAGE_SHIFT;

/// A region's dirty log: whether library writes mark it, and the bitmap,
/// allocated on first use. Public only as the type vm-memory's traits name
/// (`GuestMemoryRegion::B`, feature `vm-memory`): outside the crate it is
/// reached through vm-memory's `Bitmap` trait, and harvested through
/// [`GuestMemory::harvest_dirty`](crate::GuestMemory::harvest_dirty).
#[derive(Debug)]
pub struct RegionLog {
    on: AtomicBool,
    bitmap: OnceLock<DirtyBitmap>,
    pages: usize,
}

impl RegionLog {
    pub(crate) fn new(pages: usize) -> Self {
        RegionLog {
            on: AtomicBool::new(false),
            bitmap: OnceLock::new(),
            pages,
        }
    }

    /// Called after every library write of `len` bytes at region offset
    /// `off`, once the bytes are stored. With tracking off this is one
    /// load. The compiler fence keeps the load after the store of the
    /// bytes in program order; `set_dirty_tracking`'s process-wide barrier
    /// does the CPU's half (see `enable`).
    #[inline(always)]
    pub(crate) fn note_write(&self, off: u64, len: u64) {
        compiler_fence(Ordering::SeqCst);
        if self.on.load(Ordering::Acquire) {
            self.mark(off, len);
        }
    }

    #[inline]
    fn mark(&self, off: u64, len: u64) {
        if let Some(b) = self.bitmap.get() {
            let first = (off >> PAGE_SHIFT) as usize;
            let last = (off.saturating_add(len.max(1)) - 1) >> PAGE_SHIFT;
            if last as usize == first {
                if first < b.pages() {
                    b.mark_page(first);
                }
            } else {
                b.mark_pages(first, last as usize - first + 1);
            }
        }
    }

    /// The bitmap, allocated (zeroed, lazily backed) on first use; `None`
    /// if it cannot be.
    pub(crate) fn bitmap(&self) -> Option<&DirtyBitmap> {
        if let Some(b) = self.bitmap.get() {
            return Some(b);
        }
        // A racing initialiser wins; ours is dropped, both were empty.
        let _ = self.bitmap.set(DirtyBitmap::new(self.pages)?);
        self.bitmap.get()
    }

    /// The bitmap if it was allocated.
    pub(crate) fn allocated_bitmap(&self) -> Option<&DirtyBitmap> {
        self.bitmap.get()
    }

    /// Pages the log covers.
    pub(crate) fn pages(&self) -> usize {
        self.pages
    }

    /// Turns marking by library writes on or off.
    pub(crate) fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }
}

#[cfg(feature = "vm-memory")]
impl RegionLog {
    /// Whether the page holding region offset `off` is marked now (a
    /// snapshot; `false` before the bitmap exists).
    pub(crate) fn is_marked_at(&self, off: u64) -> bool {
        self.bitmap
            .get()
            .is_some_and(|b| b.is_marked(usize::try_from(off >> PAGE_SHIFT).unwrap_or(usize::MAX)))
    }
}

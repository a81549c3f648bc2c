//! A region's dirty log as vm-memory's `Bitmap`: the type vm-memory's
//! volatile slices mark after every write, so writes through vm-memory land
//! in the same log library writes and KVM's bitmaps do.

use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};

use crate::memory::RegionLog;

impl<'a> WithBitmapSlice<'a> for RegionLog {
    type S = DirtyLogSlice<'a>;
}

impl Bitmap for RegionLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // vm-memory marks zero-length accesses too; they wrote nothing.
        if len != 0 {
            self.note_write(offset as u64, len as u64);
        }
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.is_marked_at(offset as u64)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> DirtyLogSlice<'_> {
        DirtyLogSlice {
            log: self,
            base: offset,
        }
    }
}

/// A view of a region's dirty log from byte `base` of the region on: what
/// a vm-memory `VolatileSlice` of pagefold memory carries and marks.
#[derive(Clone, Copy, Debug)]
pub struct DirtyLogSlice<'a> {
    log: &'a RegionLog,
    base: usize,
}

impl<'b> WithBitmapSlice<'b> for DirtyLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for DirtyLogSlice<'_> {}

impl Bitmap for DirtyLogSlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // An offset past the region (only a slice's own arithmetic could
        // make one) saturates and is clipped by the log.
        self.log.mark_dirty(self.base.saturating_add(offset), len);
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(self.base.saturating_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        DirtyLogSlice {
            log: self.log,
            base: self.base.saturating_add(offset),
        }
    }
}

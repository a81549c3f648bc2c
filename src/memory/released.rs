//! Library reads of pages the library knows are released: zero (discarded,
//! reported free) or ballooned by their state word, raw writes not trapped,
//! on their own frame. Such a page's memory is a hole in the memfd, unless a
//! vCPU wrote it behind the state's back. Read through the shared mapping, a
//! hole makes the kernel allocate the page again (shmem has no shared zero
//! page): a 64-byte host read of a ballooned page grew the memfd by a page,
//! and `Balloon::reclaim_touched` then deflated it as if the guest had used
//! it. So these reads go to the page's frame with `pread`, which reads a
//! hole as zeros and leaves it a hole, and reads a page the guest wrote as
//! its bytes. Only writes take a page back.
//!
//! Must never read such a page through the mapping while it may be a hole;
//! the one exception is a `pread` the kernel refuses, where reading the
//! mapping is never wrong, at worst an allocation.

use std::sync::atomic::{fence, Ordering};

use super::{
    copy,
    page_state::{PageKind, PageState, LOCKED},
    region::GuestRegion,
    AtomicInt,
};
use crate::addr::{usize_from, FrameNumber, PAGE_SHIFT};

/// Pages one frame read covers at most: their state words, loaded before
/// the read and compared after it, are kept on the stack.
const CHUNK_PAGES: usize = 64;

/// Where a library read takes a page's bytes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReadFrom {
    /// No memory and raw writes trapped: zeros, from the state alone.
    Zeros,
    /// Released on its own frame, raw writes not trapped: the frame, by
    /// `pread` ([`PageState::reads_from_frame`]).
    Frame,
    /// Anything else (memory, or a remapped view): the mapping.
    Mapping,
}

impl ReadFrom {
    /// The source for a page in state `s`.
    #[inline]
    pub(super) fn of(s: PageState) -> Self {
        if s.reads_zero() {
            ReadFrom::Zeros
        } else if s.reads_from_frame() {
            ReadFrom::Frame
        } else {
            ReadFrom::Mapping
        }
    }
}

impl GuestRegion {
    /// Where a library read takes page `page`'s bytes from now.
    #[inline]
    pub(super) fn read_from(&self, page: usize) -> ReadFrom {
        ReadFrom::of(self.page_states().load(page))
    }

    /// Reads `dst.len()` bytes at `offset`, inside pages that read from their
    /// frame; the caller checked `offset + dst.len() <= size`. A write racing
    /// the read shows as a mix of old and new bytes, as through the mapping;
    /// a naturally aligned word is still read whole (see
    /// [`GuestRegion::read_released_word`]).
    ///
    /// A page's state may change while its frame is read: dedup punches a
    /// merged page's own frame before it publishes the new state, so a page
    /// that became private and was merged meanwhile is a hole there, and
    /// its frame read gives zeros though the page held its bytes
    /// throughout. So the state words of the pages read are loaded before
    /// the frame read and again after it, and a page whose word changed
    /// (every transition changes it: a merge locks the page first) is read
    /// again by its new state.
    #[inline(never)]
    pub(super) fn read_released(&self, offset: u64, dst: &mut [u8]) {
        let end = offset + dst.len() as u64;
        let mut at = offset;
        while at < end {
            let chunk_end = (((at >> PAGE_SHIFT) + CHUNK_PAGES as u64) << PAGE_SHIFT).min(end);
            let d = &mut dst[usize_from(at - offset)..usize_from(chunk_end - offset)];
            self.read_frame_chunk(at, d);
            at = chunk_end;
        }
    }

    /// [`GuestRegion::read_released`] of at most [`CHUNK_PAGES`] pages.
    fn read_frame_chunk(&self, offset: u64, dst: &mut [u8]) {
        let first = usize_from(offset >> PAGE_SHIFT);
        let last = usize_from((offset + dst.len() as u64 - 1) >> PAGE_SHIFT);
        let states = self.page_states();
        let mut before = [PageState::new(PageKind::Private, FrameNumber(0), 0); CHUNK_PAGES];
        for (w, page) in before.iter_mut().zip(first..=last) {
            *w = states.load(page);
        }
        self.read_frame(offset, dst, before[0]);
        for (k, page) in (first..=last).enumerate() {
            let was = before[k];
            // A page that no longer read from its frame when its word was
            // loaded above (it changed since the caller's load) is read
            // again as well.
            if states.load(page) != was || ReadFrom::of(was) != ReadFrom::Frame {
                let from = offset.max((page as u64) << PAGE_SHIFT);
                let to = (offset + dst.len() as u64).min((page as u64 + 1) << PAGE_SHIFT);
                let d = &mut dst[usize_from(from - offset)..usize_from(to - offset)];
                // `from..to` lies inside `offset..offset + len`, which the
                // caller checked, and inside page `page`.
                self.read_page_settled(page, from, d);
            }
        }
    }

    /// Reads `dst.len()` bytes at `offset`, inside page `page` (the caller
    /// checked `offset + dst.len() <= size`), by the page's state now; a
    /// frame read counts only if the state held still across it.
    fn read_page_settled(&self, page: usize, offset: u64, dst: &mut [u8]) {
        loop {
            let s = self.page_states().load(page);
            match ReadFrom::of(s) {
                ReadFrom::Zeros => return dst.fill(0),
                ReadFrom::Mapping => {
                    // SAFETY: 1. the caller checked `offset + dst.len() <=
                    // size`, the mapping's length; 2. the mapping lives as
                    // long as `self`.
                    return unsafe { copy::copy_from_guest(self.ptr_at(offset), dst) };
                }
                ReadFrom::Frame => {
                    self.read_frame(offset, dst, s);
                    if self.page_states().load(page) == s {
                        return;
                    }
                }
            }
        }
    }

    /// The frame read itself: a naturally aligned word without tearing,
    /// anything else with one `pread`; through the mapping where the kernel
    /// refuses (or, for a word of an unlocked page, where the page holds
    /// memory). `first` is the state of the first page read, as loaded
    /// before the read. The caller checked `offset + dst.len() <= size`.
    ///
    /// A locked page (see [`is_mid_release`]) is read with `pread` even for
    /// a word.
    fn read_frame(&self, offset: u64, dst: &mut [u8], first: PageState) {
        let done = if copy::is_single_copy(self.ptr_at(offset), dst.len()) && !is_mid_release(first)
        {
            self.read_released_word(offset, dst)
        } else {
            self.pread(offset, dst)
        };
        if !done {
            // SAFETY: 1. the caller checked `offset + dst.len() <= size`, the
            // mapping's length; 2. the mapping lives as long as `self`.
            unsafe { copy::copy_from_guest(self.ptr_at(offset), dst) };
        }
    }

    /// Atomic load of the integer at `offset`, in a page that read from its
    /// frame when the caller loaded its state; the caller checked that the
    /// integer is aligned and inside the region. Read again by the page's
    /// state until the state holds still across the read, as
    /// [`GuestRegion::read_released`] does.
    #[inline(never)]
    pub(super) fn load_released<T: AtomicInt>(&self, offset: u64, order: Ordering) -> T {
        let page = usize_from(offset >> PAGE_SHIFT);
        loop {
            let s = self.page_states().load(page);
            let v = match ReadFrom::of(s) {
                ReadFrom::Zeros => return T::zeroed(),
                // SAFETY: 1. the caller checked that the integer lies inside
                // the region's mapping and is aligned to its size; 2. the
                // mapping lives as long as `self`.
                ReadFrom::Mapping => return unsafe { T::load(self.ptr_at(offset), order) },
                ReadFrom::Frame => {
                    let mut v = T::zeroed();
                    let bytes = bytemuck::bytes_of_mut(&mut v);
                    let from_frame = if is_mid_release(s) {
                        self.pread(offset, bytes)
                    } else {
                        self.read_released_word(offset, bytes)
                    };
                    if from_frame {
                        // Unlocked, the page held no memory throughout, so
                        // the value is no store's and there is nothing to
                        // acquire; locked, no library store races it (see
                        // `is_mid_release`). The fence orders the read with
                        // this thread's other accesses as strongly as any
                        // `order`.
                        fence(Ordering::SeqCst);
                        v
                    } else {
                        // SAFETY: as above.
                        unsafe { T::load(self.ptr_at(offset), order) }
                    }
                }
            };
            if self.page_states().load(page) == s {
                return v;
            }
        }
    }

    /// Reads the naturally aligned word (1, 2, 4 or 8 bytes) at `offset`
    /// into `dst` without tearing, or returns `false`: the page holds memory
    /// (reading the mapping allocates nothing) and the caller does its own
    /// single-copy load through the mapping.
    ///
    /// `pread` promises no single-copy atomicity, so its bytes are kept only
    /// when the page held no memory both before and after it (`mincore`):
    /// a write in between would have allocated the page, so no write
    /// overlapped the copy. At either check a page holding memory was
    /// written by the guest, or swapped out and brought back by the `pread`.
    /// (On hugetlbfs `mincore` answers for this mapping: a page written only
    /// through another process's mapping is read by `pread`, right bytes
    /// without that guarantee.)
    fn read_released_word(&self, offset: u64, dst: &mut [u8]) -> bool {
        let page = usize_from(offset >> PAGE_SHIFT);
        self.holds_no_memory(page) && self.pread(offset, dst) && self.holds_no_memory(page)
    }

    /// Whether the kernel says page `page` holds no memory (`false` when it
    /// will not say).
    fn holds_no_memory(&self, page: usize) -> bool {
        let mut resident = [0u8; 1];
        self.mincore(page, &mut resident) && resident[0] & 1 == 0
    }

    /// `pread` of `dst.len()` bytes at region offset `offset` from the
    /// frames (consecutive in the memfd); `false` if the kernel refused.
    fn pread(&self, offset: u64, dst: &mut [u8]) -> bool {
        let at = self.frames().start.file_offset() + offset;
        self.store().read_bytes(at, dst).is_ok()
    }
}

/// Whether a page in state `s`, which reads from its frame, is locked: a
/// layer is releasing it (an inflate between its state change and its
/// punch; a discard likewise). Its frame still holds the old bytes or is
/// already a hole, and a read through the mapping after the punch would
/// make the kernel allocate the page again; `mincore` first cannot tell,
/// since the punch can land between the check and the load (found by
/// review). So it is read with `pread` only, even a single word, which
/// gives the old bytes or zeros: what the page holds at one instant of the
/// release. That is sound without the word's single-copy guarantee
/// because library writes wait for the lock, so no library store can tear
/// it; only a raw store by a vCPU into a page its guest is giving up could,
/// and those bytes are punched away anyway.
#[inline]
fn is_mid_release(s: PageState) -> bool {
    s.flags() & LOCKED != 0
}

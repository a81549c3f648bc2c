//! Library reads of a region: plain pages through the mapping, and pages the
//! library knows are released (zero, discarded,
//! reported free) or ballooned by their state word, raw writes not trapped,
//! on their own frame. Such a page's memory is a hole in the memfd, unless a
//! vCPU wrote it behind the state's back. Read through the shared mapping, a
//! hole makes the kernel allocate the page again (shmem has no shared zero
//! page): a 64-byte host read of a ballooned page grew the memfd by a page,
//! and `Balloon::reclaim_touched` then deflated it as if the guest had used
//! it. So these reads go to the page's frame with `pread`, which reads a
//! hole as zeros and leaves it a hole, and reads a page the guest wrote as
//! its bytes. A read that finds the page holding memory again (the guest
//! used it) takes it back as private, so later reads take the mapping
//! ([`GuestRegion::take_back`]); a hole stays a hole.
//!
//! Must never read such a page through the mapping while it may be a hole;
//! the one exception is a `pread` the kernel refuses, where reading the
//! mapping is never wrong, at worst an allocation.

use std::sync::atomic::{fence, Ordering};

use super::{
    copy,
    page_state::{Flags, PageKind, PageState},
    region::GuestRegion,
    AtomicInt,
};
use crate::addr::{usize_from, FrameNumber, PAGE_SHIFT, PAGE_SIZE};

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
    /// Reads `buf.len()` bytes at `offset`; `offset + len <= size` is checked
    /// by the caller. Released pages read as zeros (or, if a vCPU wrote one
    /// since, its bytes) without the kernel allocating them again
    /// ([`ReadFrom`]).
    #[inline]
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) {
        if !self.needs_state_checks() {
            // SAFETY: the caller checked `offset + len <= size`, the mapping's
            // length; the mapping lives as long as `self`.
            unsafe { copy::copy_from_guest(self.ptr_at(offset), buf) };
            return;
        }
        self.read_at_checked(offset, buf);
    }

    #[inline(never)]
    fn read_at_checked(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let from = self.read_from((off >> PAGE_SHIFT) as usize);
            // Extend the run over following pages with the same answer, so a
            // large copy is one `rep movsb` (or one `pread`), not one per page.
            let mut end = (((off >> PAGE_SHIFT) + 1) << PAGE_SHIFT).min(offset + buf.len() as u64);
            while end < offset + buf.len() as u64
                && self.read_from((end >> PAGE_SHIFT) as usize) == from
            {
                end = (end + PAGE_SIZE as u64).min(offset + buf.len() as u64);
            }
            let n = usize_from(end - off);
            let dst = &mut buf[done..done + n];
            match from {
                ReadFrom::Zeros => dst.fill(0),
                // `off + n <= offset + len <= size`, as `read_released` asks.
                ReadFrom::Frame => self.read_released(off, dst),
                // SAFETY: 1. `off + n <= offset + len <= size`, the mapping's
                // length; 2. the mapping lives as long as `self`.
                ReadFrom::Mapping => unsafe { copy::copy_from_guest(self.ptr_at(off), dst) },
            }
            done += n;
        }
    }

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
        let mut before =
            [PageState::new(PageKind::Private, FrameNumber(0), Flags::NONE); CHUNK_PAGES];
        for (w, page) in before.iter_mut().zip(first..=last) {
            *w = states.load(page);
        }
        let held = self.read_frame(offset, dst, &before[..=last - first]);
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
            } else if held & (1 << k) != 0 {
                self.take_back(page, was);
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
                    let held = self.read_frame(offset, dst, &[s]);
                    if self.page_states().load(page) == s {
                        if held & 1 != 0 {
                            self.take_back(page, s);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// The frame read itself: a naturally aligned word without tearing,
    /// anything else with one `pread`; through the mapping where the kernel
    /// refuses (or, for a word of an unlocked page, where the page holds
    /// memory). `states` are the states of the pages read, as loaded
    /// before the read. The caller checked `offset + dst.len() <= size`.
    ///
    /// Returns which of the pages (bit `k`: the `k`th) the kernel said hold
    /// memory, for unlocked pages only ([`GuestRegion::take_back`]); a
    /// locked page (see [`is_mid_release`]) is read with `pread` even for a
    /// word.
    fn read_frame(&self, offset: u64, dst: &mut [u8], states: &[PageState]) -> u64 {
        if copy::is_single_copy(self.ptr_at(offset), dst.len()) && !is_mid_release(states[0]) {
            return match self.read_released_word(offset, dst) {
                WordRead::Frame => 0,
                WordRead::Mapping { held } => {
                    // SAFETY: 1. the caller checked `offset + dst.len() <=
                    // size`, the mapping's length; 2. the mapping lives as
                    // long as `self`.
                    unsafe { copy::copy_from_guest(self.ptr_at(offset), dst) };
                    u64::from(held)
                }
            };
        }
        if !self.pread(offset, dst) {
            // SAFETY: as above.
            unsafe { copy::copy_from_guest(self.ptr_at(offset), dst) };
        }
        // Which pages hold memory: one `mincore` for the chunk, only where
        // an unlocked page could be taken back.
        if !states.iter().any(|s| s.is_unflagged()) {
            return 0;
        }
        let mut resident = [0u8; CHUNK_PAGES];
        let first = usize_from(offset >> PAGE_SHIFT);
        if !self.mincore(first, &mut resident[..states.len()]) {
            return 0;
        }
        resident[..states.len()]
            .iter()
            .enumerate()
            .filter(|&(_, &r)| crate::host::residency::is_resident(r))
            .fold(0, |bits, (k, _)| bits | 1 << k)
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
            let mut held = false;
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
                        match self.read_released_word(offset, bytes) {
                            WordRead::Frame => true,
                            WordRead::Mapping { held: h } => {
                                held = h;
                                false
                            }
                        }
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
                if held {
                    self.take_back(page, s);
                }
                return v;
            }
        }
    }

    /// Reads the naturally aligned word (1, 2, 4 or 8 bytes) at `offset`
    /// into `dst` without tearing ([`WordRead::Frame`]), or leaves it to
    /// the caller's own single-copy load through the mapping
    /// ([`WordRead::Mapping`]): the page holds memory, so reading the
    /// mapping allocates nothing.
    ///
    /// `pread` promises no single-copy atomicity, so its bytes are kept only
    /// when the page held no memory both before and after it (`mincore`):
    /// a write in between would have allocated the page, so no write
    /// overlapped the copy. At either check a page holding memory was
    /// written by the guest, or swapped out and brought back by the `pread`.
    /// (On hugetlbfs `mincore` answers for this mapping: a page written only
    /// through another process's mapping is read by `pread`, right bytes
    /// without that guarantee.)
    fn read_released_word(&self, offset: u64, dst: &mut [u8]) -> WordRead {
        let page = usize_from(offset >> PAGE_SHIFT);
        match self.memory_of(page) {
            Some(false) => {}
            held => {
                return WordRead::Mapping {
                    held: held.is_some(),
                }
            }
        }
        if !self.pread(offset, dst) {
            return WordRead::Mapping { held: false };
        }
        match self.memory_of(page) {
            Some(false) => WordRead::Frame,
            held => WordRead::Mapping {
                held: held.is_some(),
            },
        }
    }

    /// Takes back page `page`, released by its state `s` (loaded before a
    /// frame read and unchanged after it), which the kernel said holds
    /// memory: the guest used it since it was released (a vCPU wrote or
    /// read it through the mapping). It becomes private, so later reads
    /// take the mapping, which allocates nothing now, instead of a `pread`
    /// and `mincore` each (a reported-free page the guest reused cost 481
    /// ns a read instead of 14). A ballooned page counts as deflated, as a
    /// library write's does; on hugetlb stores ballooned pages are left to
    /// the balloon, as `Balloon::reclaim_touched` leaves them (one touch
    /// gives a whole huge page memory again).
    ///
    /// Only an unlocked word on the page's own frame is swapped, exactly
    /// from `s`: a locked page is being released (its memory is about to be
    /// punched), a remapped one is dedup's. Discards and inflates lock a
    /// page until after their punch, but a page locked, punched and
    /// unlocked since `s` was loaded has the same word again, so the memory
    /// is asked for once more after the swap, and a page found empty goes
    /// back to `s` (a write that saw it private in between left its bytes
    /// in the frame, where a released page's reads find them).
    fn take_back(&self, page: usize, s: PageState) {
        let ballooned = match s.kind() {
            PageKind::Zero => false,
            PageKind::Ballooned if self.store().granule().bytes() == PAGE_SIZE as u64 => true,
            _ => return,
        };
        if !s.is_unflagged() {
            return;
        }
        let states = self.page_states();
        let private = s.with_kind(PageKind::Private);
        if states.transition(page, s, private).is_err() {
            return;
        }
        if self.memory_of(page) == Some(false) && states.transition(page, private, s).is_ok() {
            return;
        }
        if ballooned {
            self.count_balloon_take_back();
        }
    }

    /// Whether the kernel says page `page` holds memory (`None` when it
    /// will not say).
    fn memory_of(&self, page: usize) -> Option<bool> {
        let mut resident = [0u8; 1];
        self.mincore(page, &mut resident)
            .then_some(crate::host::residency::is_resident(resident[0]))
    }

    /// `pread` of `dst.len()` bytes at region offset `offset` from the
    /// frames (consecutive in the memfd); `false` if the kernel refused.
    fn pread(&self, offset: u64, dst: &mut [u8]) -> bool {
        let at = self.frames().start.file_offset() + offset;
        self.store().read_bytes(at, dst).is_ok()
    }
}

/// How [`GuestRegion::read_released_word`] read a word.
enum WordRead {
    /// From the frame, the page holding no memory throughout.
    Frame,
    /// Not read: the caller loads it through the mapping. `held`: the
    /// kernel said the page holds memory (else the kernel refused a call).
    Mapping { held: bool },
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
    s.is_locked()
}

//! One guest-physical region: a contiguous host mapping of a contiguous run of
//! store frames, and the page-state table for its pages. A region only knows
//! offsets inside itself; `GuestMemory` does the address lookup.

use std::{
    os::fd::RawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use super::{
    copy,
    page_state::{Flags, PageCensus, PageKind, PageState, PageStateTable},
    AccessError,
};
use crate::{
    addr::{usize_from, GuestPhysAddr, HostVirtAddr, PAGE_SHIFT, PAGE_SIZE},
    frames::{FrameRange, FrameStore, HostMapping},
};

/// What a hypervisor or a vhost-user backend needs to map a region itself:
/// KVM's `kvm_userspace_memory_region` takes `guest_start`, `size` and
/// `host_addr`; vhost-user's memory table also takes `fd` and `file_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// First guest-physical address.
    pub guest_start: GuestPhysAddr,
    /// Size in bytes.
    pub size: u64,
    /// Where the region is mapped in this process.
    pub host_addr: HostVirtAddr,
    /// The frame store's memfd (owned by the store; do not close), or -1
    /// for anonymous memory ([`GuestMemory::adopt_anonymous`](super::GuestMemory::adopt_anonymous)),
    /// which has no file to share: KVM needs none, a vhost-user backend
    /// cannot map such a region.
    pub fd: RawFd,
    /// Offset of the region's first frame in `fd` (meaningless when `fd`
    /// is -1).
    pub file_offset: u64,
}

/// What holds a region, at most one holder of each.
#[derive(Clone, Copy, Debug)]
pub(super) enum Claim {
    /// A dedup host or a raw-write tracker: both register the region's
    /// pages with a userfaultfd.
    Pages = 0,
    /// A migration sender.
    Migration = 1,
}

/// A guest-physical region of [`GuestMemory`](super::GuestMemory).
#[derive(Debug)]
pub struct GuestRegion {
    start: GuestPhysAddr,
    size: u64,
    mapping: HostMapping,
    frames: FrameRange,
    states: PageStateTable,
    /// Set once any page may be other than plain private (a layer changed
    /// one); until then accesses skip the state table entirely. A layer sets
    /// it before its first compare-and-swap on a page word, so an access that
    /// saw it clear raced that change exactly as one that read the word
    /// just before the swap would have (the layers' own protocols cover
    /// that). Never cleared.
    state_checks: AtomicBool,
    /// Held by whoever changes the write protection of this region's host
    /// pages (a dedup window, a userfaultfd handler): protection is
    /// registered on a userfaultfd, not per caller, so two at once over the
    /// same pages would disarm each other.
    protection: std::sync::Mutex<()>,
    /// The dirty log: on/off flag and the lazily allocated bitmap
    /// (`crate::dirty`).
    dirty: super::RegionLog,
    /// Ballooned pages the library took back: written through it, or found
    /// holding memory again by a read (each counts as deflated; see
    /// `crate::balloon`).
    balloon_taken: std::sync::atomic::AtomicU64,
    /// Who holds the region, one holder per [`Claim`].
    claims: [AtomicBool; 2],
    /// The region's file and offset as vm-memory hands them to devices
    /// (`GuestMemoryRegion::file_offset`, what a vhost-user frontend sends):
    /// made on first use from a duplicate of the store's descriptor.
    #[cfg(feature = "vm-memory")]
    pub(crate) vmm_file: std::sync::OnceLock<Option<vm_memory::FileOffset>>,
    store: Arc<FrameStore>,
}

impl GuestRegion {
    /// Allocates and maps frames for `size` bytes at `start`. The caller
    /// has validated the layout.
    pub(super) fn new(
        store: &Arc<FrameStore>,
        start: GuestPhysAddr,
        size: u64,
    ) -> Result<Self, crate::frames::FrameError> {
        let pages = size >> PAGE_SHIFT;
        let frames = store.allocate(pages)?;
        let mapping = match store.map(frames) {
            Ok(m) => m,
            Err(e) => {
                // Best effort: the store stays usable either way.
                let _ = store.free(frames);
                return Err(e);
            }
        };
        Self::from_parts(store, start, size, frames, mapping)
    }

    /// A region of `size` bytes at `start` whose pages are `frames` of
    /// `store`, mapped (or, for an anonymous store, simply present) at
    /// `mapping`; the frames go back to the store when the region drops,
    /// here too if this fails.
    pub(super) fn from_parts(
        store: &Arc<FrameStore>,
        start: GuestPhysAddr,
        size: u64,
        frames: FrameRange,
        mapping: HostMapping,
    ) -> Result<Self, crate::frames::FrameError> {
        let pages = size >> PAGE_SHIFT;
        let table = usize::try_from(pages)
            .ok()
            .and_then(|n| PageStateTable::new_private(frames.start, n).map(|t| (n, t)));
        let Some((page_count, states)) = table else {
            let _ = store.free(frames);
            return Err(crate::frames::FrameError::TooLarge { frames: pages });
        };
        Ok(GuestRegion {
            start,
            size,
            mapping,
            frames,
            states,
            state_checks: AtomicBool::new(false),
            protection: std::sync::Mutex::new(()),
            dirty: super::RegionLog::new(page_count),
            balloon_taken: std::sync::atomic::AtomicU64::new(0),
            claims: [AtomicBool::new(false), AtomicBool::new(false)],
            #[cfg(feature = "vm-memory")]
            vmm_file: std::sync::OnceLock::new(),
            store: Arc::clone(store),
        })
    }

    /// A region of `size` bytes at `start` on new frames of `store`, for
    /// [`GuestMemory::from_regions`](super::GuestMemory::from_regions) or
    /// [`GuestMemory::insert_region`](super::GuestMemory::insert_region)
    /// (memory hotplug). `start` and `size` must be non-zero multiples of
    /// the store's granule (`size` non-zero) and must not wrap.
    pub fn allocate(
        store: &Arc<FrameStore>,
        start: GuestPhysAddr,
        size: u64,
    ) -> Result<Arc<GuestRegion>, super::error::MemoryError> {
        super::layout::validate_layout(&[(start, size)], store.granule().bytes())?;
        Ok(Arc::new(Self::new(store, start, size)?))
    }

    /// First guest-physical address.
    #[inline]
    pub fn start(&self) -> GuestPhysAddr {
        self.start
    }

    /// Size in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// One past the last address (fits in `u64`: layouts that wrap are refused).
    #[inline]
    pub fn end(&self) -> u64 {
        self.start.0 + self.size
    }

    /// Host address of the region's first byte.
    #[inline]
    pub fn host_addr(&self) -> HostVirtAddr {
        HostVirtAddr(self.mapping.as_ptr() as u64)
    }

    /// The frames backing the region, in order.
    #[inline]
    pub fn frames(&self) -> FrameRange {
        self.frames
    }

    /// The region's page-state table, for the layers that change how pages
    /// are backed (through its protocol operations).
    #[inline]
    pub(crate) fn page_states(&self) -> &PageStateTable {
        &self.states
    }

    /// A snapshot of page `page`'s state (read-only), or `None` past the
    /// region's end.
    #[inline]
    pub fn page_state(&self, page: usize) -> Option<PageState> {
        (page < self.states.len()).then(|| self.states.load(page))
    }

    /// The region's pages by how they are backed.
    pub fn census(&self) -> PageCensus {
        self.states.census()
    }

    /// What KVM and vhost-user need to map the region.
    pub fn info(&self) -> RegionInfo {
        use std::os::fd::AsRawFd;
        RegionInfo {
            guest_start: self.start,
            size: self.size,
            host_addr: self.host_addr(),
            fd: self
                .store
                .file("a region's file")
                .map_or(-1, |f| f.as_raw_fd()),
            file_offset: self.frames.start.file_offset(),
        }
    }

    /// Host pointer to byte `offset` of the region.
    ///
    /// The caller keeps `offset` below `size` before dereferencing.
    #[inline]
    pub(crate) fn ptr_at(&self, offset: u64) -> *mut u8 {
        // Wrapping: computing the address is harmless; every caller has
        // bounds-checked `offset` against `size`, which equals the mapping length.
        self.mapping.as_ptr().wrapping_add(usize_from(offset))
    }

    /// Makes every page of `[offset, offset+len)` plainly writable, then
    /// writes `data` there. The caller checked the bounds.
    #[inline]
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        self.prepare_write(offset, data.len() as u64)?;
        // SAFETY: bounds checked by the caller against the mapping length;
        // the mapping lives as long as `self`.
        unsafe { copy::copy_to_guest(self.ptr_at(offset), data) };
        self.dirty.note_write(offset, data.len() as u64);
        Ok(())
    }

    /// Brings each page in `[offset, offset+len)` to a state that accepts a
    /// write. Cheap when all are plain private pages: one load per page.
    #[inline]
    pub(crate) fn prepare_write(&self, offset: u64, len: u64) -> Result<(), AccessError> {
        if !self.needs_state_checks() {
            return Ok(());
        }
        self.prepare_write_checked(offset, len)
    }

    #[inline(never)]
    fn prepare_write_checked(&self, offset: u64, len: u64) -> Result<(), AccessError> {
        let first = (offset >> PAGE_SHIFT) as usize;
        let last = ((offset + len.max(1) - 1) >> PAGE_SHIFT) as usize;
        for page in first..=last {
            let s = self.states.load(page);
            if !s.is_plain_writable() {
                self.make_writable(page, s)?;
            }
        }
        Ok(())
    }

    #[cold]
    fn make_writable(&self, page: usize, mut s: PageState) -> Result<(), AccessError> {
        let mut spins = 0u32;
        loop {
            if s.is_locked() {
                // Another layer is changing this page's backing: wait for it.
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                s = self.states.load(page);
                continue;
            }
            match s.kind() {
                PageKind::Private if s.is_plain_writable() => return Ok(()),
                // No memory behind it: the write allocates a fresh zeroed frame
                // in the memfd at the same offset; the state just says so.
                // Mapped onto a private copy-on-write view (a shared frame,
                // anonymous zeros): the kernel copies before the write lands,
                // so no other page can see it. The dedup layer notices the
                // copy when it reconciles.
                _ if s.flags() == Flags::REMAPPED => return Ok(()),
                PageKind::Zero | PageKind::Ballooned if s.is_unflagged() => {
                    match self
                        .states
                        .transition(page, s, s.with_kind(PageKind::Private))
                    {
                        Ok(()) => {
                            if s.kind() == PageKind::Ballooned {
                                // The guest took a ballooned page back by
                                // writing it: it counts as deflated.
                                self.count_balloon_take_back();
                            }
                            return Ok(());
                        }
                        Err(now) => s = now,
                    }
                }
                _ => {
                    return Err(AccessError::WriteProtected {
                        addr: GuestPhysAddr(self.start.0 + ((page as u64) << PAGE_SHIFT)),
                    })
                }
            }
        }
    }

    /// Releases the memory of whole pages `[first, first+count)`: they read as
    /// zeros afterwards and the next write allocates again. Returns how many
    /// pages changed state (pages already released are left alone).
    ///
    /// Every page it changes or punches is locked from before the punch to
    /// after it, as an inflate does: a library write waits and lands in
    /// the fresh frame instead of in memory the punch takes, and a read
    /// that finds the page holding memory does not take it back as private
    /// while that memory is about to go ([`GuestRegion::take_back`]).
    pub(super) fn discard_pages(&self, first: usize, count: usize) -> Result<u64, AccessError> {
        self.enable_state_checks();
        let mut changed = 0u64;
        // Bit `k`: page `first + k` is locked here until after the punch.
        let mut held = vec![0u64; count.div_ceil(64)];
        let mut page = first;
        while page < first + count {
            let s = self.states.load(page);
            if s.is_locked() {
                // Another layer holds it; it keeps what that layer decides.
                page += 1;
                continue;
            }
            if s.is_remapped() {
                // Mapped elsewhere (a shared frame, the kernel's copy, anonymous
                // zeros): put its own frame, a hole, back under it. The dedup
                // layer recounts shared-frame references from the states.
                let end = self.remapped_run(page, first + count);
                match self.discard_remapped(page, end, first, &mut held) {
                    Ok(n) => changed += n,
                    Err(e) => {
                        // Nothing is punched; what this call locked is
                        // unlocked as it stands.
                        self.unlock_held(first, &held);
                        return Err(e);
                    }
                }
                page = end;
                continue;
            }
            let released = match s.kind() {
                PageKind::Private => s.with_kind(PageKind::Zero),
                PageKind::Zero | PageKind::Ballooned => s,
                PageKind::Shared => {
                    page += 1;
                    continue;
                }
            };
            if self.states.try_lock_as(page, s, released).is_err() {
                // It moved (a write, or a read taking it back as private):
                // look at it again, so no page is punched unlocked.
                continue;
            }
            held[(page - first) / 64] |= 1 << ((page - first) % 64);
            if s.kind() == PageKind::Private {
                changed += 1;
            }
            page += 1;
        }
        // One punch for the whole run: the region's frames are consecutive.
        let range = FrameRange {
            start: crate::addr::FrameNumber(self.frames.start.0 + first as u64),
            count: count as u64,
        };
        let punched = self.store.release(range);
        // Unlocked after the punch whether it worked or not: a page whose
        // memory stayed reads its bytes from its frame, and a read takes it
        // back as private.
        self.unlock_held(first, &held);
        punched?;
        Ok(changed)
    }

    /// Unlocks the pages `discard_pages` locked: bit `k` of `held` is page
    /// `first + k`. Only the holder changes a locked word, so each is
    /// unlocked as it stands.
    fn unlock_held(&self, first: usize, held: &[u64]) {
        for (w, &bits) in held.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let p = first + w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                self.states.unlock_as_is(p);
            }
        }
    }

    /// End of the run of unlocked remapped pages starting at `page`.
    fn remapped_run(&self, page: usize, limit: usize) -> usize {
        let mut end = page;
        while end < limit {
            if !self.states.load(end).is_remapped_unlocked() {
                break;
            }
            end += 1;
        }
        end
    }

    /// Locks remapped pages `[from, to)`, maps their own frames back (holes
    /// by the time the caller punches), and marks them released, still
    /// locked (bit `p - first` of `held`: the caller unlocks them after its
    /// punch); pages the mapping budget cannot split off their merged
    /// stretch stay as they are.
    fn discard_remapped(
        &self,
        from: usize,
        to: usize,
        first: usize,
        held_out: &mut [u64],
    ) -> Result<u64, AccessError> {
        let mut held = Vec::with_capacity(to - from);
        for p in from..to {
            let s = self.states.load(p);
            if s.is_remapped_unlocked() && self.states.try_lock(p, s).is_ok() {
                held.push((p, s));
            }
        }
        let mut changed = 0;
        let mut failed = None;
        let mut k = 0;
        while k < held.len() {
            let mut e = k + 1;
            while e < held.len() && held[e].0 == held[e - 1].0 + 1 {
                e += 1;
            }
            // After a failed remap the remaining stretches are only unlocked
            // as they were (a review found them left locked for good, their
            // writers waiting forever); the first error is returned.
            // Cutting pages out of a merged stretch splits its mapping: a
            // discard spends from the process's mapping budget, and where
            // the budget has nothing left the pages stay merged (found from
            // outside: a guest reporting scattered free pages used up the
            // VMM's mappings, and the next thread spawn aborted it). They
            // hold no memory of their own; the shared frame holds theirs.
            let cost = self.own_remap_cost(held[k].0, e - k);
            let budget = self.store.map_budget();
            let remapped = match failed {
                Some(_) => false,
                None if cost > 0 && !budget.try_spend(cost.unsigned_abs()) => false,
                None => {
                    let own = crate::frames::RemapTarget::OwnShared {
                        file_offset: self.own_frame(held[k].0).file_offset(),
                    };
                    match self.remap_pages(held[k].0, e - k, own) {
                        Ok(()) => {
                            if cost < 0 {
                                budget.give_back(cost.unsigned_abs());
                            }
                            true
                        }
                        Err(err) => {
                            failed = Some(err);
                            false
                        }
                    }
                }
            };
            for &(p, s) in &held[k..e] {
                if remapped {
                    changed += 1;
                    held_out[(p - first) / 64] |= 1 << ((p - first) % 64);
                    let released = PageState::new(PageKind::Zero, self.own_frame(p), Flags::NONE);
                    let _ = self.states.relock_as(p, s, released);
                } else {
                    self.states.unlock(p, s);
                }
            }
            k = e;
        }
        match failed {
            Some(err) => Err(err.into()),
            None => Ok(changed),
        }
    }
}

impl GuestRegion {
    /// Pages in the region.
    #[inline]
    pub fn pages(&self) -> usize {
        self.states.len()
    }

    /// Whether accesses must consult the page-state table.
    #[inline]
    pub(crate) fn needs_state_checks(&self) -> bool {
        self.state_checks.load(Ordering::Acquire)
    }

    /// The flag [`GuestRegion::needs_state_checks`] reads.
    pub(crate) fn state_checks_flag(&self) -> &AtomicBool {
        &self.state_checks
    }

    /// Makes accesses consult the page-state table from now on; every layer
    /// calls it before it first changes a page's state word.
    pub(crate) fn enable_state_checks(&self) {
        self.state_checks.store(true, Ordering::SeqCst);
    }

    /// Ballooned pages the library has taken back since the region was
    /// made: written through it, or found holding memory again by a read
    /// (see `crate::balloon`).
    pub(crate) fn balloon_taken(&self) -> u64 {
        self.balloon_taken.load(Ordering::Relaxed)
    }

    /// Counts a ballooned page the library took back (it moved to private).
    pub(super) fn count_balloon_take_back(&self) {
        self.balloon_taken.fetch_add(1, Ordering::Relaxed);
    }

    /// The region's dirty log (see `crate::dirty`).
    #[inline(always)]
    pub(crate) fn dirty_log(&self) -> &super::RegionLog {
        &self.dirty
    }

    /// Takes the region's write-protection lock (see the field).
    pub(crate) fn lock_protection(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data, only the order of kernel calls.
        self.protection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The page's own frame: where its bytes live while it is private.
    #[inline]
    pub(crate) fn own_frame(&self, page: usize) -> crate::addr::FrameNumber {
        crate::addr::FrameNumber(self.frames.start.0 + page as u64)
    }

    /// Which of pages `[first, first + count)` hold memory in the kernel
    /// (`mincore` on this region's mapping, a byte per page that
    /// `crate::host::residency::is_resident` reads), or `None`
    /// if the range is not inside the region or the kernel refuses. For a
    /// page that maps its own frame this is whether the frame holds memory:
    /// a hole reads as zeros, and reading it through the mapping would
    /// allocate it.
    pub(crate) fn resident(&self, first: usize, count: usize) -> Option<Vec<u8>> {
        // The range first: the buffer is a byte per page asked for.
        if !self.holds_pages(first, count) {
            return None;
        }
        let mut vec = vec![0u8; count];
        self.mincore(first, &mut vec).then_some(vec)
    }

    /// Whether pages `[first, first + count)` lie inside the region.
    fn holds_pages(&self, first: usize, count: usize) -> bool {
        first
            .checked_add(count)
            .is_some_and(|end| end <= self.pages())
    }

    /// `mincore` of pages `[first, first + out.len())` into `out`; `false`
    /// if the range is not inside the region or the kernel refuses.
    pub(super) fn mincore(&self, first: usize, out: &mut [u8]) -> bool {
        if !self.holds_pages(first, out.len()) {
            return false;
        }
        crate::host::residency::mincore(self.page_host_addr(first), out)
    }

    /// The frame store the region's frames are in.
    #[inline]
    pub(crate) fn store(&self) -> &FrameStore {
        &self.store
    }

    /// The frame store, shared.
    pub(crate) fn store_arc(&self) -> &Arc<FrameStore> {
        &self.store
    }

    /// Claims the region for a holder of `kind`; `false` if one has it.
    pub(super) fn claim(&self, kind: Claim) -> bool {
        !self.claims[kind as usize].swap(true, Ordering::AcqRel)
    }

    /// Whether `kind` of this region is claimed now.
    pub(super) fn claimed(&self, kind: Claim) -> bool {
        self.claims[kind as usize].load(Ordering::Acquire)
    }

    /// Ends a [`claim`](Self::claim).
    pub(super) fn release_claim(&self, kind: Claim) {
        self.claims[kind as usize].store(false, Ordering::Release);
    }

    /// Host address of page `page`'s first byte.
    #[inline]
    pub(crate) fn page_host_addr(&self, page: usize) -> HostVirtAddr {
        HostVirtAddr(self.host_addr().0 + ((page as u64) << PAGE_SHIFT))
    }

    /// Host pointer to page `page` (the caller keeps `page < pages()`).
    #[inline]
    pub(crate) fn page_ptr(&self, page: usize) -> *mut u8 {
        self.ptr_at((page as u64) << PAGE_SHIFT)
    }

    /// Copies page `page` as the host mapping shows it now.
    pub(crate) fn read_page(&self, page: usize, out: &mut [u8; PAGE_SIZE]) {
        // SAFETY: `page < pages()` is the caller's contract, so the page lies
        // inside the live mapping.
        unsafe { copy::copy_from_guest(self.page_ptr(page), out) };
    }

    /// Whether page `page`, as the host mapping shows it now, equals `bytes`
    /// (one page). Compares in place with the C library's `memcmp`: the call
    /// is opaque to the compiler, so a racing write only changes the answer,
    /// which the callers re-check under write protection anyway.
    pub(crate) fn page_equals(&self, page: usize, bytes: &[u8; PAGE_SIZE]) -> bool {
        // SAFETY: `page < pages()` is the caller's contract, so the page lies
        // inside the live mapping; `bytes` is a page-sized buffer.
        unsafe { libc::memcmp(self.page_ptr(page).cast(), bytes.as_ptr().cast(), PAGE_SIZE) == 0 }
    }

    /// Whether page `page`, as the host mapping shows it now, is all zeros
    /// (compared in place; stops at the first non-zero byte).
    pub(crate) fn page_is_zero(&self, page: usize) -> bool {
        self.page_equals(page, &crate::addr::ZERO_PAGE)
    }

    /// Mappings that remapping pages `[first, first+count)` (all remapped
    /// now) back onto their own frames adds to the process, at most: one
    /// per side whose neighbour stays remapped (the mapping around the
    /// pages splits there), one less per side whose neighbour is already
    /// in its own frame (the new mapping joins the neighbour's: one shared
    /// mapping of the memfd at consecutive offsets), none at the region's
    /// edges. Between -2 and 2; the kernel may join more, never split more.
    pub(crate) fn own_remap_cost(&self, first: usize, count: usize) -> i64 {
        let side = |page: Option<usize>| match page.filter(|&p| p < self.pages()) {
            None => 0,
            Some(p) if self.states.load(p).is_remapped() => 1,
            Some(_) => -1,
        };
        side(first.checked_sub(1)) + side(first.checked_add(count))
    }

    /// Points pages `[first, first+count)` at `target` in one remap.
    pub(crate) fn remap_pages(
        &self,
        first: usize,
        count: usize,
        target: crate::frames::RemapTarget,
    ) -> Result<(), crate::frames::FrameError> {
        self.mapping
            .remap(&self.store, first * PAGE_SIZE, count * PAGE_SIZE, target)
    }
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        // The mapping is unmapped after this (field drop order); freeing the
        // frames first only punches memory no one reads any more.
        let _ = self.store.free(self.frames);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::{GuestMemory, GuestPhysAddr};

    /// Review: `resident` allocated its byte-per-page buffer before its
    /// range check, so an absurd count panicked (capacity overflow) or
    /// aborted on allocation instead of answering `None`.
    #[test]
    fn resident_checks_the_range_before_allocating() {
        let m = GuestMemory::new(&[(GuestPhysAddr(0), 1 << 16)]).expect("guest memory");
        let r = &m.regions()[0];
        assert_eq!(r.resident(0, 16).map(|v| v.len()), Some(16));
        assert_eq!(r.resident(1, 16), None);
        assert_eq!(r.resident(1, usize::MAX), None);
        assert_eq!(r.resident(0, usize::MAX), None);
        assert_eq!(r.resident(0, isize::MAX as usize), None);
    }
}

//! Guest-physical memory: a set of non-overlapping regions, each one host
//! mapping of consecutive store frames plus a page-state table, and the
//! bounds-checked access API every other layer and every VMM goes through.
//!
//! Nothing here hands out a Rust reference into guest memory: guest vCPUs
//! write it concurrently, so every access is a raw copy or an atomic.
//! No guest-controlled address can make an access leave the mapping: lengths
//! and offsets are checked against the region before any pointer is formed.

mod adopt;
mod atomic;
pub(crate) mod copy;
mod dirty_bitmap;
mod dirty_log;
mod error;
mod index;
mod layout;
pub(crate) mod page_state;
mod region;
mod released;
mod released_data;

pub(crate) use dirty_bitmap::DirtyBitmap;
pub use dirty_log::RegionLog;

use std::sync::{atomic::Ordering as MemOrdering, Arc};

use bytemuck::Pod;

pub use adopt::{AnonymousRegion, FileRegion, MappedFileRegion};
pub use atomic::AtomicInt;
pub use error::{AccessError, LayoutError, MemoryError};
pub(crate) use layout::validate_layout;
pub(crate) use page_state::Flags;
pub use page_state::{PageCensus, PageKind, PageState};
use region::Claim;
pub use region::{GuestRegion, RegionInfo};
pub(crate) use released_data::ReleasedData;

use crate::{
    addr::{usize_from, GuestPhysAddr, HostVirtAddr, PAGE_SHIFT, PAGE_SIZE},
    frames::FrameStore,
};

/// Steps of the page-state protocol that the crate's integration tests stop
/// between (an inflate between its state change and its punch). Not part
/// of the API: built only with the `test-hooks` feature, which the crate's
/// own dev-dependency on itself turns on for its tests.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod __test {
    use super::{GuestRegion, PageKind, PageState};

    /// Holds page `page` of `region` as `kind`, as an inflate's first step
    /// does; the state it holds, or `Err` with the state now if the page is
    /// held already or moved (`None` past the region's end).
    pub fn hold_as(
        region: &GuestRegion,
        page: usize,
        kind: PageKind,
    ) -> Option<Result<PageState, PageState>> {
        let s = region.page_state(page)?;
        if s.is_locked() {
            return Some(Err(s));
        }
        let held = s.with_kind(kind);
        Some(
            region
                .page_states()
                .try_lock_as(page, s, held)
                .map(|()| held),
        )
    }

    /// Lets go of a page [`hold_as`] held (as `held`), unchanged.
    pub fn release(region: &GuestRegion, page: usize, held: PageState) -> Result<(), PageState> {
        region.page_states().unlock_to(page, held, held)
    }
}

/// Guest-physical memory of one VM.
///
/// `Send + Sync`: any number of threads (vCPU threads, device emulation, the
/// dedup scanner) may access it at once.
#[derive(Debug)]
pub struct GuestMemory {
    store: Arc<FrameStore>,
    /// Sorted by start address. Shared: a memory made from another by
    /// [`GuestMemory::insert_region`] or [`GuestMemory::remove_region`]
    /// (memory hotplug) holds the same regions, page states, dirty logs
    /// and all.
    regions: Box<[Arc<GuestRegion>]>,
    /// Address-to-region lookup.
    index: index::RegionIndex,
    /// Told of every write through this API (see [`WriteObserver`]).
    observer: std::sync::OnceLock<Arc<dyn WriteObserver>>,
}

/// Something that wants to know when guest memory is written through this
/// library — e.g. [`crate::paging::TableWatch`], which invalidates walk
/// caches when a page-table page changes. Raw writes through the host
/// mapping (vCPUs) are not seen; a VMM learns of those from the guest
/// (INVLPG, MOV CR3) as hardware does.
pub trait WriteObserver: Send + Sync + std::fmt::Debug {
    /// `[gpa, gpa + len)` was written.
    fn wrote(&self, gpa: GuestPhysAddr, len: u64);
}

impl GuestMemory {
    /// Guest memory with the given `(start, size)` regions, on a new memfd
    /// frame store with 4 KiB pages. For memory a VMM made already, see
    /// [`GuestMemory::from_file`], [`GuestMemory::adopt_mapped_file`] and
    /// [`GuestMemory::adopt_anonymous`].
    pub fn new(layout: &[(GuestPhysAddr, u64)]) -> Result<Self, MemoryError> {
        let store = Arc::new(FrameStore::memfd()?);
        Self::with_store(store, layout)
    }

    /// Guest memory on an existing frame store; several VMs may share one
    /// store, which is what lets dedup map one frame into all of them.
    pub fn with_store(
        store: Arc<FrameStore>,
        layout: &[(GuestPhysAddr, u64)],
    ) -> Result<Self, MemoryError> {
        let order = validate_layout(layout, store.granule().bytes())?;
        let mut regions = Vec::with_capacity(order.len());
        for i in order {
            let (start, size) = layout[i];
            // On error, the regions built so far drop and free their frames.
            regions.push(Arc::new(GuestRegion::new(&store, start, size)?));
        }
        Ok(Self::assemble(store, regions, None))
    }

    /// Guest memory made of regions built one by one
    /// ([`GuestRegion::allocate`]) or taken from other memories, in any
    /// order; they must not overlap and must all be in one frame store.
    /// The regions are shared, not copied: every memory holding a region
    /// sees the same bytes, page states and dirty log.
    pub fn from_regions(regions: Vec<Arc<GuestRegion>>) -> Result<Self, LayoutError> {
        let Some(first) = regions.first() else {
            return Err(LayoutError::NoRegions);
        };
        let store = Arc::clone(first.store_arc());
        if let Some(index) = regions
            .iter()
            .position(|r| !Arc::ptr_eq(r.store_arc(), &store))
        {
            return Err(LayoutError::OtherStore {
                index,
                start: regions[index].start(),
            });
        }
        let sorted = sorted_regions(regions)?;
        Ok(Self::assemble(store, sorted, None))
    }

    /// A new memory with this one's regions and `region` (memory hotplug):
    /// this memory is unchanged, and both share every region they have in
    /// common. The write observer carries over; dirty tracking of the new
    /// region is off until turned on. A VMM that serves devices through
    /// vm-memory's `GuestAddressSpace` swaps the result in (for example
    /// with `GuestMemoryAtomic::lock().replace`).
    ///
    /// A dedup host registered with this memory does not see the new
    /// region: register a memory of it alone (`from_regions(vec![region])`)
    /// in the same domain.
    pub fn insert_region(&self, region: Arc<GuestRegion>) -> Result<GuestMemory, LayoutError> {
        let mut regions: Vec<Arc<GuestRegion>> = self.regions.to_vec();
        let index = regions.len();
        if !Arc::ptr_eq(region.store_arc(), &self.store) {
            return Err(LayoutError::OtherStore {
                index,
                start: region.start(),
            });
        }
        regions.push(region);
        let sorted = sorted_regions(regions)?;
        Ok(Self::assemble(
            Arc::clone(&self.store),
            sorted,
            self.observer.get().cloned(),
        ))
    }

    /// A new memory without the region that starts at `start` and has
    /// `size` bytes, and that region (memory unplug). This memory is
    /// unchanged; the region's frames go back to the store when the last
    /// memory holding it (and the returned `Arc`) drops. A dedup host must
    /// be done with the region first (unregister the VM it was registered
    /// in), since the host unmerges it through this memory.
    pub fn remove_region(
        &self,
        start: GuestPhysAddr,
        size: u64,
    ) -> Result<(GuestMemory, Arc<GuestRegion>), LayoutError> {
        let Some(pos) = self
            .regions
            .iter()
            .position(|r| r.start() == start && r.size() == size)
        else {
            return Err(LayoutError::NoSuchRegion { start, size });
        };
        if self.regions.len() == 1 {
            return Err(LayoutError::LastRegion { start });
        }
        let mut regions: Vec<Arc<GuestRegion>> = self.regions.to_vec();
        let removed = regions.remove(pos);
        let mem = Self::assemble(
            Arc::clone(&self.store),
            regions,
            self.observer.get().cloned(),
        );
        Ok((mem, removed))
    }

    /// A memory over `regions`, sorted and checked by the caller.
    fn assemble(
        store: Arc<FrameStore>,
        regions: Vec<Arc<GuestRegion>>,
        observer: Option<Arc<dyn WriteObserver>>,
    ) -> Self {
        let index =
            index::RegionIndex::new(regions.iter().map(|r| (r.start().0, r.end())).collect());
        let cell = std::sync::OnceLock::new();
        if let Some(o) = observer {
            let _ = cell.set(o);
        }
        GuestMemory {
            store,
            regions: regions.into_boxed_slice(),
            index,
            observer: cell,
        }
    }

    /// Marks every region as owned by a dedup host (or a raw-write
    /// tracker, which cannot share the userfaultfd registration with
    /// dedup); `false`, with nothing claimed, if one already owns any of
    /// them. Claims are per region, so a memory made from another by
    /// hotplug cannot be registered twice through its shared regions.
    pub(crate) fn claim_for_dedup(&self) -> bool {
        self.claim_all(Claim::Pages)
    }

    /// Ends a dedup host's ownership of every region.
    pub(crate) fn release_from_dedup(&self) {
        self.release_all(Claim::Pages);
    }

    /// Marks every region as being migrated (one `Sender` at a time: each
    /// harvests the regions' dirty logs and saves and puts back their
    /// tracking); `false`, with nothing claimed, if a sender holds any of
    /// them, through this memory or another sharing its regions.
    pub(crate) fn claim_for_migration(&self) -> bool {
        self.claim_all(Claim::Migration)
    }

    /// Ends a sender's migration.
    pub(crate) fn release_from_migration(&self) {
        self.release_all(Claim::Migration);
    }

    /// Whether a sender holds region `index` (through this memory or
    /// another sharing the region); `false` for an index out of range.
    pub(crate) fn region_migrating(&self, index: usize) -> bool {
        self.regions
            .get(index)
            .is_some_and(|r| r.claimed(Claim::Migration))
    }

    /// Claims `kind` of every region, or of none.
    fn claim_all(&self, kind: Claim) -> bool {
        for (i, r) in self.regions.iter().enumerate() {
            if !r.claim(kind) {
                for earlier in &self.regions[..i] {
                    earlier.release_claim(kind);
                }
                return false;
            }
        }
        true
    }

    fn release_all(&self, kind: Claim) {
        for r in self.regions.iter() {
            r.release_claim(kind);
        }
    }

    /// The frame store holding this memory's frames.
    pub fn frame_store(&self) -> &Arc<FrameStore> {
        &self.store
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[Arc<GuestRegion>] {
        &self.regions
    }

    /// Sum of region sizes in bytes.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size()).sum()
    }

    /// What KVM and vhost-user need, one entry per region.
    pub fn region_infos(&self) -> Vec<RegionInfo> {
        self.regions.iter().map(|r| r.info()).collect()
    }

    /// Index of the region holding `addr` (see `index.rs`: O(1) for even
    /// layouts, O(log n) at worst).
    #[inline]
    pub fn find_region(&self, addr: GuestPhysAddr) -> Option<usize> {
        self.index.find(addr.0)
    }

    /// The region holding `addr` and the offset of `addr` in it.
    #[inline]
    pub fn region_of(&self, addr: GuestPhysAddr) -> Result<(&GuestRegion, u64), AccessError> {
        let i = self
            .find_region(addr)
            .ok_or(AccessError::Unmapped { addr })?;
        let r = &self.regions[i];
        Ok((r, addr.0 - r.start().0))
    }

    /// Host address of guest-physical `addr`.
    pub fn host_address(&self, addr: GuestPhysAddr) -> Result<HostVirtAddr, AccessError> {
        let (r, off) = self.region_of(addr)?;
        Ok(HostVirtAddr(r.host_addr().0 + off))
    }

    /// Installs `observer`, told of every write through this API from now
    /// on (library writes, atomics, fills; not raw writes through the host
    /// mapping). One per memory: `Err` hands it back if one is installed.
    pub fn set_write_observer(
        &self,
        observer: Arc<dyn WriteObserver>,
    ) -> Result<(), Arc<dyn WriteObserver>> {
        self.observer.set(observer)
    }

    /// Tells the observer, if any, of a write.
    #[inline(always)]
    fn wrote(&self, addr: GuestPhysAddr, len: usize) {
        if let Some(o) = self.observer.get() {
            o.wrote(addr, len as u64);
        }
    }

    /// Reads `buf.len()` bytes at `addr`. The range may span adjacent regions.
    ///
    /// A page the library knows is released (discarded, reported free,
    /// ballooned) reads as zeros, or as what a vCPU wrote to it since,
    /// without the kernel allocating memory for it. Writes take a page back,
    /// and so does a read that finds the page holding memory again (the
    /// guest reused it): it becomes private, so later reads take the mapping
    /// (a ballooned page counts as deflated, once). The same holds for [`read_obj`](Self::read_obj) and
    /// [`load`](Self::load).
    #[inline]
    pub fn read(&self, addr: GuestPhysAddr, buf: &mut [u8]) -> Result<(), AccessError> {
        if let Ok((r, off)) = self.region_of(addr) {
            if (buf.len() as u64) <= r.size() - off {
                r.read_at(off, buf);
                return Ok(());
            }
        }
        // Slow path: empty, spanning regions, or an error to name exactly.
        self.check_span(addr, buf.len())?;
        let mut done = 0;
        self.for_each_chunk(addr, buf.len(), |r, off, n| {
            r.read_at(off, &mut buf[done..done + n]);
            done += n;
            Ok(())
        })
    }

    /// Writes `data` at `addr`. The range may span adjacent regions. The whole
    /// range is checked first: on error nothing was written.
    #[inline]
    pub fn write(&self, addr: GuestPhysAddr, data: &[u8]) -> Result<(), AccessError> {
        if let Ok((r, off)) = self.region_of(addr) {
            if !data.is_empty() && (data.len() as u64) <= r.size() - off {
                r.write_at(off, data)?;
                self.wrote(addr, data.len());
                return Ok(());
            }
        }
        self.check_span(addr, data.len())?;
        // Prepare every page first, so a refused page leaves nothing written.
        self.for_each_chunk(addr, data.len(), |r, off, n| r.prepare_write(off, n as u64))?;
        let mut done = 0;
        self.for_each_chunk(addr, data.len(), |r, off, n| {
            r.write_at(off, &data[done..done + n])?;
            done += n;
            Ok(())
        })?;
        self.wrote(addr, data.len());
        Ok(())
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: GuestPhysAddr, byte: u8, len: usize) -> Result<(), AccessError> {
        self.check_span(addr, len)?;
        self.for_each_chunk(addr, len, |r, off, n| r.prepare_write(off, n as u64))?;
        self.for_each_chunk(addr, len, |r, off, n| {
            r.prepare_write(off, n as u64)?;
            // SAFETY: `for_each_chunk` only yields in-bounds chunks of a
            // live region.
            unsafe { copy::fill_guest(r.ptr_at(off), byte, n) };
            r.dirty_log().note_write(off, n as u64);
            Ok(())
        })?;
        self.wrote(addr, len);
        Ok(())
    }

    /// Reads a plain-old-data object at `addr` (any alignment). Guest
    /// memory is little-endian, as is every host pagefold builds for.
    #[inline]
    pub fn read_obj<T: Pod>(&self, addr: GuestPhysAddr) -> Result<T, AccessError> {
        // Fast path, inlined: one region, one page, no page state to consult.
        if let Some((r, off)) = self.one_page_target(addr, std::mem::size_of::<T>()) {
            let mut v = T::zeroed();
            // SAFETY: `one_page_target` checked that the object lies inside
            // one page of the region's live mapping.
            unsafe { copy::copy_from_guest(r.ptr_at(off), bytemuck::bytes_of_mut(&mut v)) };
            return Ok(v);
        }
        self.read_obj_slow(addr)
    }

    #[inline(never)]
    fn read_obj_slow<T: Pod>(&self, addr: GuestPhysAddr) -> Result<T, AccessError> {
        let mut v = T::zeroed();
        self.read(addr, bytemuck::bytes_of_mut(&mut v))?;
        Ok(v)
    }

    /// Writes a plain-old-data object at `addr` (any alignment).
    #[inline]
    pub fn write_obj<T: Pod>(&self, addr: GuestPhysAddr, val: T) -> Result<(), AccessError> {
        if let Some((r, off)) = self.one_page_target(addr, std::mem::size_of::<T>()) {
            // SAFETY: as in `read_obj`.
            unsafe { copy::copy_to_guest(r.ptr_at(off), bytemuck::bytes_of(&val)) };
            r.dirty_log()
                .note_write(off, std::mem::size_of::<T>() as u64);
            self.wrote(addr, std::mem::size_of::<T>());
            return Ok(());
        }
        self.write_obj_slow(addr, val)
    }

    #[inline(never)]
    fn write_obj_slow<T: Pod>(&self, addr: GuestPhysAddr, val: T) -> Result<(), AccessError> {
        self.write(addr, bytemuck::bytes_of(&val))
    }

    /// The region and offset for an access of `len` (non-zero) bytes at
    /// `addr` that stays inside one page of a region whose pages need no
    /// state check; `None` sends the access down the general path.
    #[inline]
    fn one_page_target(&self, addr: GuestPhysAddr, len: usize) -> Option<(&GuestRegion, u64)> {
        let r = &self.regions[self.index.find(addr.0)?];
        let off = addr.0 - r.start().0;
        let in_page = usize_from(off & (PAGE_SIZE as u64 - 1));
        // Regions are whole pages, so staying inside the page keeps the
        // access inside the region.
        (len != 0 && in_page + len <= PAGE_SIZE && !r.needs_state_checks()).then_some((r, off))
    }

    /// The region a page-table walker's direct view of `addr` covers
    /// (`paging::EntryWindow`): the one holding `addr`, or with one region
    /// that region whatever `addr` (the window checks its own bounds, so no
    /// index and no bounds check here, on the walk's path).
    #[inline(always)]
    pub(crate) fn window_region(&self, addr: u64) -> Option<&GuestRegion> {
        match &*self.regions {
            [r] => Some(r),
            _ => self.index.find(addr).map(|i| &*self.regions[i]),
        }
    }

    /// Atomic load of an aligned integer, `None` for an unbacked or
    /// misaligned address: the page-table walker's entry read, kept free of
    /// error construction so it inlines into the walk.
    #[inline(always)]
    pub(crate) fn load_entry<T: AtomicInt>(&self, addr: GuestPhysAddr) -> Option<T> {
        if addr.0 % T::SIZE as u64 != 0 {
            return None;
        }
        // One region, the common layout: its bounds are the whole lookup.
        let (r, off) = if let [r] = &*self.regions {
            let off = addr.0.wrapping_sub(r.start().0);
            if off >= r.size() {
                return None;
            }
            (r, off)
        } else {
            let r = &self.regions[self.index.find(addr.0)?];
            (r, addr.0 - r.start().0)
        };
        // `off < r.size()` (checked above, or `find` put `addr` in `r`);
        // regions are whole pages and `addr` is aligned to `T::SIZE`: so the
        // integer lies inside the mapping, aligned.
        if r.needs_state_checks() {
            match r.read_from((off >> PAGE_SHIFT) as usize) {
                released::ReadFrom::Zeros => return Some(T::zeroed()),
                released::ReadFrom::Frame => {
                    return Some(r.load_released(off, MemOrdering::Acquire))
                }
                released::ReadFrom::Mapping => {}
            }
        }
        // SAFETY: 1. the integer lies inside the mapping, aligned (above);
        // 2. the mapping is live while `self` is borrowed.
        Some(unsafe { T::load(r.ptr_at(off), MemOrdering::Acquire) })
    }

    /// Atomic load of an aligned integer.
    #[inline]
    pub fn load<T: AtomicInt>(
        &self,
        addr: GuestPhysAddr,
        order: MemOrdering,
    ) -> Result<T, AccessError> {
        load_ordering("load", order)?;
        let (r, off) = self.atomic_target::<T>(addr)?;
        // Until a layer changes some page of the region, every page reads
        // through the mapping: skip the state table (a cache line per load).
        if r.needs_state_checks() {
            match r.read_from((off >> PAGE_SHIFT) as usize) {
                released::ReadFrom::Zeros => return Ok(T::zeroed()),
                // `atomic_target` checked alignment and bounds, as asked.
                released::ReadFrom::Frame => return Ok(r.load_released(off, order)),
                released::ReadFrom::Mapping => {}
            }
        }
        // SAFETY: `atomic_target` checked alignment and that the integer lies
        // inside the region's live mapping.
        Ok(unsafe { T::load(r.ptr_at(off), order) })
    }

    /// Atomic store of an aligned integer.
    #[inline]
    pub fn store<T: AtomicInt>(
        &self,
        addr: GuestPhysAddr,
        val: T,
        order: MemOrdering,
    ) -> Result<(), AccessError> {
        if matches!(order, MemOrdering::Acquire | MemOrdering::AcqRel) {
            return Err(AccessError::Ordering { op: "store", order });
        }
        let (r, off) = self.atomic_target::<T>(addr)?;
        r.prepare_write(off, T::SIZE as u64)?;
        // SAFETY: as in `load`.
        unsafe { T::store(r.ptr_at(off), val, order) };
        r.dirty_log().note_write(off, T::SIZE as u64);
        self.wrote(addr, T::SIZE);
        Ok(())
    }

    /// Atomic swap of an aligned integer; returns the previous value.
    pub fn swap<T: AtomicInt>(
        &self,
        addr: GuestPhysAddr,
        val: T,
        order: MemOrdering,
    ) -> Result<T, AccessError> {
        let (r, off) = self.atomic_target::<T>(addr)?;
        r.prepare_write(off, T::SIZE as u64)?;
        // SAFETY: as in `load`.
        let old = unsafe { T::swap(r.ptr_at(off), val, order) };
        r.dirty_log().note_write(off, T::SIZE as u64);
        self.wrote(addr, T::SIZE);
        Ok(old)
    }

    /// Atomic compare-exchange of an aligned integer. The outer result is
    /// the access; the inner one is the exchange (`Err` holds the value
    /// found when it differed from `current`).
    pub fn compare_exchange<T: AtomicInt>(
        &self,
        addr: GuestPhysAddr,
        current: T,
        new: T,
        success: MemOrdering,
        failure: MemOrdering,
    ) -> Result<Result<T, T>, AccessError> {
        let r = self.compare_exchange_quiet(addr, current, new, success, failure)?;
        if r.is_ok() {
            self.wrote(addr, T::SIZE);
        }
        Ok(r)
    }

    /// [`GuestMemory::compare_exchange`] without telling the write observer:
    /// for hardware-like updates (a walker setting accessed/dirty flags)
    /// that change no translation.
    ///
    /// A successful exchange still marks the dirty log: a processor's
    /// accessed/dirty update is a write to the page-table page, and KVM's
    /// dirty log records it too (a migrated guest must find its A/D bits
    /// as it left them). A failed one wrote nothing and marks nothing.
    pub(crate) fn compare_exchange_quiet<T: AtomicInt>(
        &self,
        addr: GuestPhysAddr,
        current: T,
        new: T,
        success: MemOrdering,
        failure: MemOrdering,
    ) -> Result<Result<T, T>, AccessError> {
        load_ordering("compare-exchange's failure", failure)?;
        let (r, off) = self.atomic_target::<T>(addr)?;
        r.prepare_write(off, T::SIZE as u64)?;
        // SAFETY: as in `load`.
        let res = unsafe { T::compare_exchange(r.ptr_at(off), current, new, success, failure) };
        if res.is_ok() {
            r.dirty_log().note_write(off, T::SIZE as u64);
        }
        Ok(res)
    }

    /// Gives the memory of whole pages in `[addr, addr+len)` back to the host
    /// (punch hole). They read as zeros afterwards and the next write
    /// allocates again. `addr` and `len` must be multiples of the store's
    /// granule. Returns the number of pages released. Writes racing with a
    /// discard of the same page may be lost, as with `MADV_DONTNEED` (a
    /// library write that finds the page locked by the discard waits, and
    /// lands after its punch).
    ///
    /// A merged page (deduplicated) is released by mapping its own frame
    /// back, which splits the merged stretch around it: where the frame
    /// store's [`MapBudget`](crate::frames::MapBudget) has no mappings left
    /// for that, the page stays merged and uncounted (it holds no memory of
    /// its own, and reads what it read before), so a guest reporting
    /// scattered free pages cannot use up the process's mappings.
    ///
    /// Reads through this API do not allocate a released page again (they
    /// read its frame in the memfd, not the mapping); a raw access through
    /// the host mapping (a vCPU's load or store) does: shmem has no shared
    /// zero page. A read through this API that then finds the page holding
    /// memory takes it back as private (the guest reused it), so later
    /// reads go through the mapping again.
    ///
    /// Anonymous memory ([`GuestMemory::adopt_anonymous`]) has no frames to
    /// punch: [`FrameError::NeedsFile`](crate::frames::FrameError::NeedsFile).
    pub fn discard(&self, addr: GuestPhysAddr, len: u64) -> Result<u64, AccessError> {
        self.store.file("discard")?;
        let granule = self.store.granule();
        // Name the unaligned edge: the start, else the end.
        for x in [addr.0, addr.0.wrapping_add(len)] {
            if x % granule.bytes() != 0 {
                return Err(AccessError::Misaligned {
                    addr: GuestPhysAddr(x),
                    align: granule.bytes(),
                });
            }
        }
        let len = usize::try_from(len).map_err(|_| AccessError::Overflow {
            addr,
            len: usize::MAX,
        })?;
        self.check_span(addr, len)?;
        let mut released = 0;
        self.for_each_chunk(addr, len, |r, off, n| {
            let pages = r.discard_pages((off >> PAGE_SHIFT) as usize, n / PAGE_SIZE);
            // Released pages read as zeros from now on: their contents
            // changed, so the dirty log hears of it (even on a partial
            // failure, conservatively).
            r.dirty_log().note_write(off, n as u64);
            released += pages?;
            Ok(())
        })?;
        Ok(released)
    }

    /// Counts pages by backing, over all regions.
    pub fn census(&self) -> PageCensus {
        let mut c = PageCensus::default();
        for r in self.regions.iter() {
            let r = r.census();
            c.private += r.private;
            c.zero += r.zero;
            c.shared += r.shared;
            c.ballooned += r.ballooned;
        }
        c
    }

    fn atomic_target<T: AtomicInt>(
        &self,
        addr: GuestPhysAddr,
    ) -> Result<(&GuestRegion, u64), AccessError> {
        if addr.0 % T::SIZE as u64 != 0 {
            return Err(AccessError::Misaligned {
                addr,
                align: T::SIZE as u64,
            });
        }
        let (r, off) = self.region_of(addr)?;
        // Regions are page-aligned and the integer is naturally aligned, so
        // it cannot straddle the region's end.
        Ok((r, off))
    }

    /// Checks that `[addr, addr+len)` is covered by regions with no hole.
    fn check_span(&self, addr: GuestPhysAddr, len: usize) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        // The end must be representable: regions never reach 2^64 either.
        if addr.checked_add(len as u64).is_none() {
            return Err(AccessError::Overflow { addr, len });
        }
        self.for_each_chunk(addr, len, |_, _, _| Ok(()))
    }

    /// Calls `f(region, offset, n)` for each piece of `[addr, addr+len)`,
    /// in order. Stops at the first hole with `Unmapped`.
    fn for_each_chunk(
        &self,
        addr: GuestPhysAddr,
        len: usize,
        mut f: impl FnMut(&GuestRegion, u64, usize) -> Result<(), AccessError>,
    ) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        let mut cur = addr.0;
        let mut left = len as u64;
        let mut idx = self
            .find_region(addr)
            .ok_or(AccessError::Unmapped { addr })?;
        loop {
            let r = &self.regions[idx];
            let off = cur - r.start().0;
            let n = left.min(r.size() - off);
            f(r, off, usize_from(n))?;
            left -= n;
            if left == 0 {
                return Ok(());
            }
            cur = r.end();
            idx += 1;
            match self.regions.get(idx) {
                Some(next) if next.start().0 == cur => {}
                _ => {
                    return Err(AccessError::Unmapped {
                        addr: GuestPhysAddr(cur),
                    })
                }
            }
        }
    }
}

/// `regions` checked as a layout (no overlap, no wrap) and sorted by
/// start address.
fn sorted_regions(regions: Vec<Arc<GuestRegion>>) -> Result<Vec<Arc<GuestRegion>>, LayoutError> {
    let layout: Vec<(GuestPhysAddr, u64)> = regions.iter().map(|r| (r.start(), r.size())).collect();
    let order = validate_layout(&layout, PAGE_SIZE as u64)?;
    let mut slots: Vec<Option<Arc<GuestRegion>>> = regions.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// A load's ordering (and a failed compare-exchange's, which only loads)
/// cannot release: std's atomics panic on one, a caller gets an error.
fn load_ordering(op: &'static str, order: MemOrdering) -> Result<(), AccessError> {
    if matches!(order, MemOrdering::Release | MemOrdering::AcqRel) {
        return Err(AccessError::Ordering { op, order });
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const fn gpa(a: u64) -> GuestPhysAddr {
        GuestPhysAddr(a)
    }

    #[test]
    fn memory_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<GuestMemory>();
    }

    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn access_spans_adjacent_regions_but_not_holes() -> Result<(), MemoryError> {
        let m = GuestMemory::new(&[
            (gpa(0), 0x2000),
            (gpa(0x2000), 0x1000),
            (gpa(0x10000), 0x1000),
        ])?;
        let data: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        m.write(gpa(0x1400), &data).map_err(|e| panic!("{e}")).ok();
        let mut back = vec![0; data.len()];
        m.read(gpa(0x1400), &mut back)
            .map_err(|e| panic!("{e}"))
            .ok();
        assert_eq!(back, data);
        assert_eq!(
            m.write(gpa(0x2800), &[1u8; 0x1000]),
            Err(AccessError::Unmapped { addr: gpa(0x3000) })
        );
        let mut b = [0u8; 1];
        m.read(gpa(0x2800), &mut b).map_err(|e| panic!("{e}")).ok();
        assert_eq!(
            b[0],
            data[0x2800 - 0x1400],
            "refused write left bytes untouched"
        );
        assert_eq!(
            m.read_obj::<u64>(gpa(0x5000)),
            Err(AccessError::Unmapped { addr: gpa(0x5000) })
        );
        Ok(())
    }
}

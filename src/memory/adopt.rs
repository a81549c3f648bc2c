//! Guest memory a VMM made: regions of its memfd or hugetlbfs file that
//! pagefold maps itself, regions of that file the VMM mapped already, or
//! anonymous memory the VMM mapped. Each region list is checked whole
//! (layout, file offsets and size, host addresses, and, for a VMM's
//! mappings, `/proc/self/maps`) before any region is built.

use std::{os::fd::BorrowedFd, ptr::NonNull, sync::Arc};

use super::{layout::validate_layout, GuestMemory, GuestRegion, LayoutError, MemoryError};
use crate::{
    addr::{FrameNumber, GuestPhysAddr, HostVirtAddr, PAGE_SHIFT, PAGE_SIZE},
    frames::{
        vmm_maps::{self, Expect},
        FrameError, FrameRange, FrameStore, HostMapping,
    },
};

/// A region of a VMM's guest-memory file that pagefold maps itself
/// ([`GuestMemory::from_file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRegion {
    /// First guest-physical address.
    pub guest_start: GuestPhysAddr,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the file.
    pub file_offset: u64,
}

/// A region of a VMM's guest-memory file that the VMM mapped already
/// ([`GuestMemory::adopt_mapped_file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedFileRegion {
    /// First guest-physical address.
    pub guest_start: GuestPhysAddr,
    /// Size in bytes.
    pub size: u64,
    /// Where the VMM mapped the region in this process.
    pub host_addr: HostVirtAddr,
    /// Offset of the region's first byte in the file.
    pub file_offset: u64,
}

/// Anonymous memory a VMM mapped for a region
/// ([`GuestMemory::adopt_anonymous`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnonymousRegion {
    /// First guest-physical address.
    pub guest_start: GuestPhysAddr,
    /// Size in bytes.
    pub size: u64,
    /// Where the VMM mapped the region in this process.
    pub host_addr: HostVirtAddr,
}

impl GuestMemory {
    /// Guest memory over the file a VMM made for it (a memfd, a hugetlbfs
    /// or tmpfs file), given by `fd`: pagefold duplicates the descriptor
    /// (the VMM keeps and closes its own) and maps each region itself,
    /// `MAP_SHARED`, so a region's frames are the file's pages at its
    /// offsets. The file's page size (`st_blksize`: 2 MiB or 1 GiB on
    /// hugetlbfs) is the granule regions and offsets must be aligned to;
    /// the file must be long enough for every region, and no two regions
    /// may share its bytes.
    ///
    /// The VMM owns the file: frames given back when the memory drops are
    /// not punched, and the regions' runs are never handed out again by
    /// the store ([`FrameStore::reserve`]). KVM slots take the regions'
    /// host addresses ([`GuestMemory::region_infos`]).
    ///
    /// The VMM then reaches guest memory only through pagefold (this
    /// API, the host addresses pagefold hands out, or vm-memory's traits
    /// on it). A mapping of its own that it keeps accessing must be left
    /// out of dedup (`VmOptions::exclude`): a merged page's bytes leave
    /// its file offset for a shared frame (and a write to it lands in a
    /// private copy, back at the offset only when the host unmerges it),
    /// so the VMM's mapping would read stale bytes, and its writes would
    /// not reach the guest.
    pub fn from_file(fd: BorrowedFd<'_>, regions: &[FileRegion]) -> Result<Self, MemoryError> {
        let store = Arc::new(FrameStore::adopt_file(fd, "vmm-file")?);
        let spans: Vec<_> = regions
            .iter()
            .map(|r| (r.guest_start, r.size, r.file_offset))
            .collect();
        let order = check_file_layout(&store, &spans)?;
        let mut built = Vec::with_capacity(order.len());
        for i in order {
            let r = regions[i];
            let frames = reserve(&store, r.size, r.file_offset)?;
            built.push(region_over(&store, r.guest_start, r.size, frames, || {
                Ok(store.map(frames)?)
            })?);
        }
        Ok(Self::assemble(store, built, None))
    }

    /// Guest memory over a VMM's file that the VMM mapped already, where
    /// its KVM slots point: each region is the VMM's mapping at
    /// `host_addr`, used in place (pagefold never unmaps it), of the file
    /// `fd` (duplicated, as in [`GuestMemory::from_file`], whose checks
    /// apply too). `/proc/self/maps` must show each range mapped readable,
    /// writable and shared, of that file at the offsets given; anything
    /// else is a [`LayoutError::BadMapping`] naming the region.
    ///
    /// As with [`GuestMemory::from_file`], the VMM then accesses guest
    /// memory through pagefold (its mapping now is pagefold's: dedup
    /// remaps pages of it in place).
    ///
    /// # Safety
    ///
    /// For each region, the VMM guarantees that `host_addr..host_addr+size`
    /// is a `MAP_SHARED`, readable and writable mapping of the file `fd`
    /// at `file_offset`, that it stays mapped for as long as the returned
    /// memory (and any region taken from it) lives, and that nothing but
    /// pagefold unmaps, remaps or changes the protection of any of it
    /// meanwhile. The file must not shrink under it.
    pub unsafe fn adopt_mapped_file(
        fd: BorrowedFd<'_>,
        regions: &[MappedFileRegion],
    ) -> Result<Self, MemoryError> {
        let store = Arc::new(FrameStore::adopt_file(fd, "vmm-file")?);
        let spans: Vec<_> = regions
            .iter()
            .map(|r| (r.guest_start, r.size, r.file_offset))
            .collect();
        let order = check_file_layout(&store, &spans)?;
        let hosts: Vec<_> = regions.iter().map(|r| (r.host_addr, r.size)).collect();
        check_host_ranges(&hosts, store.granule().bytes())?;
        let (dev, ino) = store.file_id()?;
        for (index, r) in regions.iter().enumerate() {
            let expect = Expect::File {
                dev,
                ino,
                offset: r.file_offset,
            };
            check_mapping(index, r.host_addr, r.size, expect)?;
        }
        let mut built = Vec::with_capacity(order.len());
        for i in order {
            let r = regions[i];
            let frames = reserve(&store, r.size, r.file_offset)?;
            built.push(region_over(&store, r.guest_start, r.size, frames, || {
                // SAFETY: the caller guarantees the range is a live shared
                // mapping of the file at these offsets that only pagefold
                // changes while the memory lives; `/proc/self/maps` agreed.
                Ok(unsafe { adopt_mapping(r.host_addr, r.size)? })
            })?);
        }
        Ok(Self::assemble(store, built, None))
    }

    /// Guest memory over anonymous memory a VMM mapped
    /// (`MAP_PRIVATE | MAP_ANONYMOUS`, or `MAP_SHARED | MAP_ANONYMOUS`),
    /// used in place: pagefold never unmaps it. `/proc/self/maps` must show
    /// each range mapped readable and writable, and not a private mapping
    /// of a file.
    ///
    /// Without a file, only what needs none applies: the access API, the
    /// dirty log (library writes, KVM bitmap merge), the raw-write
    /// tracker, page-table walkers, migration (send, and receive into such
    /// memory), KVM slots. What needs the file refuses with
    /// [`FrameError::NeedsFile`] naming the feature: dedup
    /// ([`DedupHost::register`](crate::dedup::DedupHost::register)),
    /// balloon inflates and free page reports, [`GuestMemory::discard`],
    /// the host service client. [`RegionInfo::fd`](super::RegionInfo::fd)
    /// is -1: a vhost-user backend cannot map such memory.
    ///
    /// # Safety
    ///
    /// For each region, the VMM guarantees that `host_addr..host_addr+size`
    /// is anonymous memory mapped readable and writable, that it stays
    /// mapped for as long as the returned memory (and any region taken
    /// from it) lives, and that nothing unmaps, remaps or changes the
    /// protection of any of it meanwhile. Regions must not share host
    /// addresses (checked).
    pub unsafe fn adopt_anonymous(regions: &[AnonymousRegion]) -> Result<Self, MemoryError> {
        let store = Arc::new(FrameStore::anonymous()?);
        let layout: Vec<_> = regions.iter().map(|r| (r.guest_start, r.size)).collect();
        let order = validate_layout(&layout, PAGE_SIZE as u64)?;
        let hosts: Vec<_> = regions.iter().map(|r| (r.host_addr, r.size)).collect();
        check_host_ranges(&hosts, PAGE_SIZE as u64)?;
        for (index, r) in regions.iter().enumerate() {
            check_mapping(index, r.host_addr, r.size, Expect::Anonymous)?;
        }
        let mut built = Vec::with_capacity(order.len());
        for i in order {
            let r = regions[i];
            // Frame numbers only: they name no memory, but each page's
            // state holds one, as for memory with a file.
            let frames = store.allocate(r.size >> PAGE_SHIFT)?;
            built.push(region_over(&store, r.guest_start, r.size, frames, || {
                // SAFETY: the caller guarantees the range is live anonymous
                // memory that stays mapped, unchanged, while the memory
                // lives; `/proc/self/maps` agreed.
                Ok(unsafe { adopt_mapping(r.host_addr, r.size)? })
            })?);
        }
        Ok(Self::assemble(store, built, None))
    }
}

impl GuestRegion {
    /// A region of the VMM's file behind `store` (the frame store of a
    /// memory made by [`GuestMemory::from_file`]) that pagefold maps
    /// itself, for [`GuestMemory::insert_region`] (memory hotplug). The
    /// checks of [`GuestMemory::from_file`] apply; its run must overlap no
    /// region of the store ([`FrameError::Reserved`]).
    pub fn from_file(
        store: &Arc<FrameStore>,
        region: FileRegion,
    ) -> Result<Arc<GuestRegion>, MemoryError> {
        if !store.is_vmm_file() {
            return Err(FrameError::NotAdoptable {
                what: "the store holds no VMM's file (GuestMemory::from_file makes one)",
            }
            .into());
        }
        check_file_layout(
            store,
            &[(region.guest_start, region.size, region.file_offset)],
        )?;
        let frames = reserve(store, region.size, region.file_offset)?;
        region_over(store, region.guest_start, region.size, frames, || {
            Ok(store.map(frames)?)
        })
    }
}

/// The region of `size` bytes at `guest_start` over `frames` of `store`,
/// mapped by `map`; if the mapping fails, the frames go back to the store
/// (a VMM's run is given up, not punched), as `from_parts` does for its
/// own failure.
fn region_over(
    store: &Arc<FrameStore>,
    guest_start: GuestPhysAddr,
    size: u64,
    frames: FrameRange,
    map: impl FnOnce() -> Result<HostMapping, MemoryError>,
) -> Result<Arc<GuestRegion>, MemoryError> {
    let mapping = match map() {
        Ok(m) => m,
        Err(e) => {
            let _ = store.free(frames);
            return Err(e);
        }
    };
    Ok(Arc::new(GuestRegion::from_parts(
        store,
        guest_start,
        size,
        frames,
        mapping,
    )?))
}

/// Checks regions `(guest start, size, file offset)` of the file behind
/// `store`: the guest layout, offsets aligned to the file's page size,
/// every region inside the file, no two sharing its bytes. Returns the
/// regions' order by guest address.
fn check_file_layout(
    store: &FrameStore,
    spans: &[(GuestPhysAddr, u64, u64)],
) -> Result<Vec<usize>, MemoryError> {
    let align = store.granule().bytes();
    let layout: Vec<_> = spans.iter().map(|&(g, s, _)| (g, s)).collect();
    let order = validate_layout(&layout, align)?;
    let file_size = store.file_size()?;
    for (index, &(_, size, file_offset)) in spans.iter().enumerate() {
        if file_offset % align != 0 {
            return Err(LayoutError::FileMisaligned {
                index,
                file_offset,
                align,
            }
            .into());
        }
        if file_offset.checked_add(size).is_none_or(|e| e > file_size) {
            return Err(LayoutError::FileTooSmall {
                index,
                file_offset,
                size,
                file_size,
            }
            .into());
        }
    }
    let mut by_offset: Vec<usize> = (0..spans.len()).collect();
    by_offset.sort_by_key(|&i| spans[i].2);
    for pair in by_offset.windows(2) {
        let (a, b) = (spans[pair[0]], spans[pair[1]]);
        // Both end inside the file (checked above): no overflow.
        if b.2 < a.2 + a.1 {
            return Err(LayoutError::FileOverlap {
                first: pair[0],
                second: pair[1],
                file_offset: b.2,
            }
            .into());
        }
    }
    Ok(order)
}

/// Checks host ranges `(address, size)`: aligned to `align`, not wrapping,
/// no two sharing an address.
fn check_host_ranges(hosts: &[(HostVirtAddr, u64)], align: u64) -> Result<(), LayoutError> {
    for (index, &(host_addr, size)) in hosts.iter().enumerate() {
        if host_addr.0 % align != 0 || host_addr.0 == 0 {
            return Err(LayoutError::HostMisaligned {
                index,
                host_addr,
                align,
            });
        }
        if host_addr.0.checked_add(size).is_none() {
            return Err(LayoutError::BadMapping {
                index,
                host_addr,
                what: "the range wraps the address space",
            });
        }
    }
    let mut order: Vec<usize> = (0..hosts.len()).collect();
    order.sort_by_key(|&i| hosts[i].0);
    for pair in order.windows(2) {
        let (a, b) = (hosts[pair[0]], hosts[pair[1]]);
        if b.0 .0 < a.0 .0 + a.1 {
            return Err(LayoutError::HostOverlap {
                first: pair[0],
                second: pair[1],
                host_addr: b.0,
            });
        }
    }
    Ok(())
}

/// Checks region `index`'s mapping against `/proc/self/maps`.
fn check_mapping(
    index: usize,
    host_addr: HostVirtAddr,
    size: u64,
    expect: Expect,
) -> Result<(), MemoryError> {
    match vmm_maps::check(host_addr.0, size, expect) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(what)) => Err(LayoutError::BadMapping {
            index,
            host_addr,
            what,
        }
        .into()),
        Err(source) => Err(FrameError::Os {
            op: "reading /proc/self/maps",
            source,
        }
        .into()),
    }
}

/// Reserves the run of a region of `size` bytes at `file_offset` (checked
/// aligned and inside the file).
fn reserve(store: &FrameStore, size: u64, file_offset: u64) -> Result<FrameRange, FrameError> {
    let frames = FrameRange {
        start: FrameNumber(file_offset >> PAGE_SHIFT),
        count: size >> PAGE_SHIFT,
    };
    store.reserve(frames)?;
    Ok(frames)
}

/// The VMM's mapping of `size` bytes at `host_addr` as a [`HostMapping`]
/// that is never unmapped here.
///
/// # Safety
///
/// As [`HostMapping::adopt`]: the range is mapped readable and writable
/// and stays so, unchanged but by pagefold, while the mapping lives.
unsafe fn adopt_mapping(host_addr: HostVirtAddr, size: u64) -> Result<HostMapping, FrameError> {
    let too_large = || FrameError::TooLarge {
        frames: size >> PAGE_SHIFT,
    };
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let addr = usize::try_from(host_addr.0).map_err(|_| too_large())?;
    let ptr = NonNull::new(addr as *mut u8).ok_or(FrameError::Empty)?;
    // SAFETY: the caller's contract is `HostMapping::adopt`'s.
    Ok(unsafe { HostMapping::adopt(ptr, len) })
}

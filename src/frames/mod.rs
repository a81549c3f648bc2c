//! Host frames: a `FrameStore` keeps guest pages in one memfd, so a frame is
//! a file offset. That is what lets a frame be mapped at several guest pages
//! (sharing), be freed for real with `fallocate(PUNCH_HOLE)`, and be handed to
//! KVM, vhost-user or another process as (fd, offset).
//!
//! The store owns frame allocation and the kernel's view of how much memory
//! the frames really hold. It touches frame contents only when a caller
//! asks, by `pread`/`pwrite`.

mod allocator;
mod map_budget;
mod mapping;
pub(crate) mod memfd;
mod page_lock;
mod vmm_files;
pub(crate) mod vmm_maps;

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
};

pub use map_budget::MapBudget;
pub use mapping::HostMapping;
pub(crate) use mapping::RemapTarget;
pub use page_lock::FramePageLock;

use crate::addr::{FrameNumber, PageSize, PAGE_SHIFT, PAGE_SIZE};
use allocator::RangeAllocator;

/// Errors of the frame store.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The call that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The process's kernel mappings (VMAs) are used up: a remap would pass
    /// `vm.max_map_count`, or the kernel refused one with `ENOMEM`.
    #[error(
        "{op}: this process's kernel mappings are used up (vm.max_map_count = {max}, headroom kept for the rest of the process included); raise vm.max_map_count or give the mappings back"
    )]
    MapLimit {
        /// What needed the mapping.
        op: &'static str,
        /// `vm.max_map_count` when it was refused.
        max: u64,
    },
    /// A request for zero frames.
    #[error("a frame range must hold at least one frame")]
    Empty,
    /// The request does not fit the store's address arithmetic.
    #[error("{frames} frames do not fit in a file offset or this process's address space")]
    TooLarge {
        /// Frames asked for (or the end frame reached).
        frames: u64,
    },
    /// A range is not a multiple of the store's allocation granule.
    #[error("frame range {start}+{count} is not aligned to the store's {granule} granule")]
    Misaligned {
        /// First frame.
        start: u64,
        /// Frames in the range.
        count: u64,
        /// The store's granule.
        granule: PageSize,
    },
    /// A range that the store did not hand out, or already took back.
    #[error("frame range {start}+{count} is not allocated in this store")]
    NotAllocated {
        /// First frame.
        start: u64,
        /// Frames in the range.
        count: u64,
    },
    /// A descriptor handed over by another process cannot be adopted as a
    /// store: it is no sealed 4 KiB-page memfd (`what` says which check).
    #[error("cannot adopt the memory descriptor: {what}")]
    NotAdoptable {
        /// What the descriptor lacks.
        what: &'static str,
    },
    /// The operation needs the memory's file (punching frames, mapping them
    /// elsewhere, handing them to another process), and this memory has
    /// none: it is anonymous memory a VMM mapped
    /// ([`GuestMemory::adopt_anonymous`](crate::GuestMemory::adopt_anonymous)).
    #[error("{feature} needs guest memory in a memfd; this memory is anonymous")]
    NeedsFile {
        /// What needed the file (`"dedup"`, `"balloon"`, `"discard"`, ...).
        feature: &'static str,
    },
    /// A VMM's region would reserve frames of its file that another of its
    /// regions already reserved.
    #[error(
        "frame range {start}+{count} overlaps the reserved frames {other_start}+{other_count} of another region"
    )]
    Reserved {
        /// First frame asked for.
        start: u64,
        /// Frames asked for.
        count: u64,
        /// First frame of the run it overlaps.
        other_start: u64,
        /// Frames in that run.
        other_count: u64,
    },
    /// Hugetlb backing was asked for but the kernel has no huge pages to give.
    #[error(
        "no {size} huge pages available: reserve some in /sys/kernel/mm/hugepages (nr_hugepages)"
    )]
    NoHugePages {
        /// The huge page size asked for.
        size: PageSize,
    },
}

/// What backs the store's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A shmem memfd with 4 KiB pages (optionally transparent huge pages).
    Memfd,
    /// A hugetlbfs memfd (`MFD_HUGETLB`) with 2 MiB or 1 GiB pages; frames
    /// are allocated and released in whole huge pages.
    Hugetlb(PageSize),
    /// No file: anonymous memory a VMM mapped
    /// ([`GuestMemory::adopt_anonymous`](crate::GuestMemory::adopt_anonymous)).
    /// Frame numbers are handed out (a page's state names one) but name no
    /// memory: every operation on frames (map, punch, read, write) fails
    /// with [`FrameError::NeedsFile`].
    Anonymous,
}

/// How a [`FrameStore`] is built.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The backing.
    pub backing: Backing,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) on mappings; effective
    /// only where `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows.
    pub transparent_huge_pages: bool,
    /// Populate mappings up front (`MAP_POPULATE`) instead of on first touch.
    pub populate: bool,
    /// Name of the memfd, as seen in `/proc/PID/maps`.
    pub name: String,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            backing: Backing::Memfd,
            transparent_huge_pages: false,
            populate: false,
            name: "pagefold".to_owned(),
        }
    }
}

/// A run of consecutive frames in a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameRange {
    /// First frame.
    pub start: FrameNumber,
    /// Number of 4 KiB frames.
    pub count: u64,
}

impl FrameRange {
    /// Size in bytes (saturating; ranges the store hands out never saturate).
    #[inline]
    pub const fn bytes(&self) -> u64 {
        self.count.saturating_mul(1 << PAGE_SHIFT)
    }

    /// The frame after the last one.
    #[inline]
    pub const fn end(&self) -> u64 {
        // Saturating: a caller's range near the top must reach the checks
        // (which refuse anything past the store's largest frame), not
        // overflow before them.
        self.start.0.saturating_add(self.count)
    }
}

/// Where a store's file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Made by the store: frames given back are punched.
    Own,
    /// Handed over by another process ([`FrameStore::adopt`]): frames
    /// given back are not punched, since that process still uses them.
    Handed,
    /// A VMM's guest-memory file ([`FrameStore::adopt_file`]): the VMM owns
    /// it, so the runs its regions name are reserved for good and never
    /// punched when given back; only frames the store allocated past the
    /// file's end are.
    Vmm,
    /// No file ([`Backing::Anonymous`]).
    Anonymous,
}

/// Host frames in one memfd, allocated in runs.
#[derive(Debug)]
pub struct FrameStore {
    /// The file; for an anonymous store an empty memfd sealed against
    /// growth and writes, so that anything reaching for a frame through
    /// [`AsFd`] fails (end of file, `EPERM`) instead of touching memory.
    fd: OwnedFd,
    source: Source,
    options: StoreOptions,
    granule: PageSize,
    allocator: Mutex<RangeAllocator>,
    map_budget: MapBudget,
    /// The VMM's file this store holds (one store per file).
    _vmm_file: Option<vmm_files::FileClaim>,
}

/// Largest store, in frames: 2^40 frames = 4 PiB, far past any host, and
/// small enough that frame numbers fit the page-state word.
const MAX_FRAMES: u64 = 1 << 40;

impl FrameStore {
    /// Creates an empty store.
    pub fn new(options: StoreOptions) -> Result<Self, FrameError> {
        if options.backing == Backing::Anonymous {
            return Self::new_anonymous(options);
        }
        let (flags, granule) = match options.backing {
            Backing::Memfd => (0, PageSize::Size4K),
            Backing::Hugetlb(PageSize::Size2M) => {
                (libc::MFD_HUGETLB | libc::MFD_HUGE_2MB, PageSize::Size2M)
            }
            Backing::Hugetlb(PageSize::Size1G) => {
                (libc::MFD_HUGETLB | libc::MFD_HUGE_1GB, PageSize::Size1G)
            }
            Backing::Hugetlb(PageSize::Size4K) | Backing::Anonymous => (0, PageSize::Size4K),
        };
        let name = std::ffi::CString::new(options.name.replace('\0', "_"))
            .unwrap_or_else(|_| c"pagefold".to_owned());
        // SAFETY: `name` is a valid NUL-terminated string that outlives the
        // call; the flags are valid memfd_create flags.
        let raw = unsafe {
            libc::memfd_create(
                name.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | flags,
            )
        };
        if raw < 0 {
            let source = io::Error::last_os_error();
            if matches!(options.backing, Backing::Hugetlb(_)) {
                return Err(FrameError::NoHugePages { size: granule });
            }
            return Err(FrameError::Os {
                op: "memfd_create",
                source,
            });
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(FrameStore {
            fd,
            source: Source::Own,
            options,
            granule,
            allocator: Mutex::new(RangeAllocator::default()),
            map_budget: MapBudget::default(),
            _vmm_file: None,
        })
    }

    /// A store with no file, for anonymous memory a VMM mapped
    /// ([`Backing::Anonymous`]).
    pub fn anonymous() -> Result<Self, FrameError> {
        Self::new(StoreOptions {
            backing: Backing::Anonymous,
            name: "pagefold-anonymous".to_owned(),
            ..StoreOptions::default()
        })
    }

    fn new_anonymous(options: StoreOptions) -> Result<Self, FrameError> {
        let os = |op| move |source| FrameError::Os { op, source };
        let fd = memfd::create(c"pagefold-no-file", libc::MFD_ALLOW_SEALING)
            .map_err(os("memfd_create"))?;
        memfd::add_seals(
            fd.as_fd(),
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
        )
        .map_err(os("fcntl(F_ADD_SEALS)"))?;
        Ok(FrameStore {
            fd,
            source: Source::Anonymous,
            options,
            granule: PageSize::Size4K,
            allocator: Mutex::new(RangeAllocator::default()),
            map_budget: MapBudget::default(),
            _vmm_file: None,
        })
    }

    /// A store over a file a VMM made for its guest memory (a memfd, a
    /// hugetlbfs or tmpfs file), from a duplicate of `fd` (the VMM keeps
    /// its own). The page size is the file's (`st_blksize`: 4 KiB, or 2
    /// MiB or 1 GiB on hugetlbfs). Its regions' runs are then reserved
    /// with [`FrameStore::reserve`]: the VMM owns the file, so they are
    /// never punched when given back nor handed out again; frames
    /// allocated later (hotplug) come from past the file's current end,
    /// which grows the file. Other runs of the file are left alone.
    pub fn adopt_file(fd: BorrowedFd<'_>, name: &str) -> Result<Self, FrameError> {
        let st = memfd::fstat(fd).map_err(|source| FrameError::Os {
            op: "fstat",
            source,
        })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FrameError::NotAdoptable {
                what: "it is not a regular file (a memfd, hugetlbfs or tmpfs file)",
            });
        }
        let (backing, granule) = match u64::try_from(st.st_blksize).unwrap_or(0) {
            b if b == PageSize::Size4K.bytes() => (Backing::Memfd, PageSize::Size4K),
            b if b == PageSize::Size2M.bytes() => {
                (Backing::Hugetlb(PageSize::Size2M), PageSize::Size2M)
            }
            b if b == PageSize::Size1G.bytes() => {
                (Backing::Hugetlb(PageSize::Size1G), PageSize::Size1G)
            }
            _ => {
                return Err(FrameError::NotAdoptable {
                    what: "its block size (st_blksize) is no page size: not 4 KiB, 2 MiB or 1 GiB",
                })
            }
        };
        // SAFETY: F_GETFL takes no argument and only reads the open
        // file's status flags; the fd is borrowed for the call.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
            return Err(FrameError::NotAdoptable {
                what: "it is not open for reading and writing (O_RDWR)",
            });
        }
        if flags & libc::O_APPEND != 0 {
            return Err(FrameError::NotAdoptable {
                what: "it is open with O_APPEND (writes at an offset would land at the end)",
            });
        }
        let Some(claim) = vmm_files::FileClaim::take(st.st_dev, st.st_ino) else {
            return Err(FrameError::NotAdoptable {
                what: "a live store of this process holds the file already (adopt it once, share the store)",
            });
        };
        let fd = fd.try_clone_to_owned().map_err(|source| FrameError::Os {
            op: "fcntl(F_DUPFD_CLOEXEC)",
            source,
        })?;
        let frames = u64::try_from(st.st_size)
            .unwrap_or(0)
            .div_ceil(PAGE_SIZE as u64)
            .next_multiple_of(granule.base_pages());
        let mut allocator = RangeAllocator::default();
        allocator.start_past(frames);
        Ok(FrameStore {
            fd,
            source: Source::Vmm,
            options: StoreOptions {
                backing,
                name: name.to_owned(),
                ..StoreOptions::default()
            },
            granule,
            allocator: Mutex::new(allocator),
            map_budget: MapBudget::default(),
            _vmm_file: Some(claim),
        })
    }

    /// Reserves `range` of a VMM's file for one of its regions (see
    /// [`FrameStore::adopt_file`]): never handed out by
    /// [`allocate`](Self::allocate), never punched or taken back by
    /// [`free`](Self::free). The range must be aligned to the granule, lie
    /// inside the file, and overlap no other reserved range
    /// ([`FrameError::Reserved`]).
    pub fn reserve(&self, range: FrameRange) -> Result<(), FrameError> {
        if self.source != Source::Vmm {
            return Err(FrameError::NotAdoptable {
                what: "only a VMM's file (FrameStore::adopt_file) has runs to reserve",
            });
        }
        self.check_granule(range)?;
        let mut alloc = self.lock_allocator();
        match alloc.reserve(range.start.0, range.count) {
            Ok(()) => Ok(()),
            Err((s, c)) if (s, c) == (range.start.0, range.count) && !alloc.is_reserved(s, c) => {
                Err(FrameError::NotAllocated { start: s, count: c })
            }
            Err((other_start, other_count)) => Err(FrameError::Reserved {
                start: range.start.0,
                count: range.count,
                other_start,
                other_count,
            }),
        }
    }

    /// Whether the store has a file: `false` for [`Backing::Anonymous`].
    pub fn has_file(&self) -> bool {
        self.source != Source::Anonymous
    }

    /// The store's file, or [`FrameError::NeedsFile`] naming `feature` for
    /// an anonymous store.
    pub fn file(&self, feature: &'static str) -> Result<BorrowedFd<'_>, FrameError> {
        if self.has_file() {
            Ok(self.fd.as_fd())
        } else {
            Err(FrameError::NeedsFile { feature })
        }
    }

    /// Size of the store's file in bytes (`fstat`).
    pub fn file_size(&self) -> Result<u64, FrameError> {
        self.file("the file's size")?;
        Ok(u64::try_from(self.fstat()?.st_size).unwrap_or(0))
    }

    /// The file's device and inode (`st_dev`, `st_ino`), as
    /// `/proc/self/maps` names the file a mapping maps.
    pub(crate) fn file_id(&self) -> Result<(u64, u64), FrameError> {
        self.file("the file's identity")?;
        let st = self.fstat()?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Whether the file belongs to a VMM ([`FrameStore::adopt_file`]).
    pub fn is_vmm_file(&self) -> bool {
        self.source == Source::Vmm
    }

    /// A store with default options (shmem memfd, 4 KiB pages).
    pub fn memfd() -> Result<Self, FrameError> {
        Self::new(StoreOptions::default())
    }

    /// Adopts a memfd another process made and handed over (a VMM's guest
    /// memory under the host service): a shmem file with 4 KiB pages that
    /// cannot shrink (`F_SEAL_SHRINK`), since a file cut short under a
    /// mapping would kill this process with `SIGBUS` on the next read.
    /// Frames are allocated from offset 0 up as in a new store (so memory
    /// made the same way in both processes has the same offsets); frames
    /// given back are never punched, since the other process owns them.
    pub fn adopt(fd: OwnedFd, name: &str) -> Result<Self, FrameError> {
        let Some(seals) = memfd::seals(fd.as_fd()) else {
            return Err(FrameError::NotAdoptable {
                what: "it is not a memfd (F_GET_SEALS failed)",
            });
        };
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(FrameError::NotAdoptable {
                what: "it is not sealed against shrinking (F_SEAL_SHRINK)",
            });
        }
        let store = FrameStore {
            fd,
            source: Source::Handed,
            options: StoreOptions {
                name: name.to_owned(),
                ..StoreOptions::default()
            },
            granule: PageSize::Size4K,
            allocator: Mutex::new(RangeAllocator::default()),
            map_budget: MapBudget::default(),
            _vmm_file: None,
        };
        let st = store.fstat()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FrameError::NotAdoptable {
                what: "it is not a regular file",
            });
        }
        if st.st_blksize != PAGE_SIZE as libc::blksize_t {
            return Err(FrameError::NotAdoptable {
                what: "its pages are not 4 KiB (a hugetlb memfd)",
            });
        }
        Ok(store)
    }

    /// Seals the memfd against shrinking (`F_SEAL_SHRINK`), as
    /// [`FrameStore::adopt`] requires of memory handed to another process;
    /// it can still grow.
    pub fn forbid_shrinking(&self) -> Result<(), FrameError> {
        // SAFETY: F_ADD_SEALS takes an int of seal bits; the fd is ours.
        let rc =
            unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        if rc != 0 {
            return Err(FrameError::Os {
                op: "fcntl(F_ADD_SEALS, F_SEAL_SHRINK)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether the memfd came from another owner: another process
    /// ([`FrameStore::adopt`]) or a VMM ([`FrameStore::adopt_file`]).
    /// Frames of the other owner are never punched when given back.
    pub fn is_adopted(&self) -> bool {
        matches!(self.source, Source::Handed | Source::Vmm)
    }

    /// The budget of kernel mappings that remaps of this store's frames
    /// (merges, unmerges, discards of merged pages) spend from.
    pub fn map_budget(&self) -> &MapBudget {
        &self.map_budget
    }

    /// The options the store was built with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The unit frames are allocated and released in: 4 KiB for memfd
    /// backing, the huge page size for hugetlb.
    pub fn granule(&self) -> PageSize {
        self.granule
    }

    /// Frames per granule.
    fn granule_frames(&self) -> u64 {
        self.granule.base_pages()
    }

    /// Allocates `count` consecutive frames (rounded up to the granule),
    /// growing the memfd if needed. New frames read as zeros and hold no
    /// memory until touched.
    pub fn allocate(&self, count: u64) -> Result<FrameRange, FrameError> {
        if count == 0 {
            return Err(FrameError::Empty);
        }
        let g = self.granule_frames();
        let count = count
            .checked_next_multiple_of(g)
            .filter(|c| *c <= MAX_FRAMES)
            .ok_or(FrameError::TooLarge { frames: count })?;
        let mut alloc = self.lock_allocator();
        // A failed growth leaves the file at this length (a refused one
        // never touches it; a failed `ftruncate` changes nothing).
        let file_len = alloc.len();
        let (start, grew_to) = alloc.allocate(count);
        if let Some(new_len) = grew_to {
            if new_len > MAX_FRAMES {
                alloc.free(start, count);
                alloc.truncate_to(file_len);
                return Err(FrameError::TooLarge { frames: new_len });
            }
            if let Err(e) = self.set_len(new_len) {
                alloc.free(start, count);
                alloc.truncate_to(file_len);
                return Err(e);
            }
        }
        Ok(FrameRange {
            start: FrameNumber(start),
            count,
        })
    }

    /// Returns frames to the store: their memory goes back to the host now
    /// (punch hole) and the frame numbers can be handed out again. A store
    /// adopted from another process ([`FrameStore::adopt`]) punches
    /// nothing; a run reserved for a VMM's region
    /// ([`FrameStore::reserve`]) is given up unpunched (the VMM's bytes stay;
    /// it may name the run again, as when it plugs the region back), and
    /// the rest of a VMM's file as it was at adoption is no frames of this
    /// store ([`FrameError::NotAllocated`]).
    pub fn free(&self, range: FrameRange) -> Result<(), FrameError> {
        self.check_granule(range)?;
        let mut alloc = self.lock_allocator();
        if alloc.unreserve(range.start.0, range.count) {
            return Ok(());
        }
        if !alloc.is_allocated(range.start.0, range.count) {
            return Err(FrameError::NotAllocated {
                start: range.start.0,
                count: range.count,
            });
        }
        // A VMM's file: only frames this store allocated past the VMM's
        // end get here (its regions' runs are reserved, the rest is below
        // the allocator's floor), and nobody else uses them.
        if matches!(self.source, Source::Own | Source::Vmm) {
            self.punch(range)?;
        }
        alloc.free(range.start.0, range.count);
        Ok(())
    }

    /// Gives the memory behind `range` back to the host while the frames
    /// stay allocated: they read as zeros afterwards and a write allocates
    /// again. Any mapping of the frames sees the zeros.
    ///
    /// On a VMM's file only the store's own frames are released: runs
    /// inside a reserved region, or frames it allocated past the file's
    /// end; the rest of the file is the VMM's ([`FrameError::NotAllocated`]).
    pub fn release(&self, range: FrameRange) -> Result<(), FrameError> {
        self.check_granule(range)?;
        if self.source == Source::Vmm {
            let alloc = self.lock_allocator();
            if !alloc.within_reserved(range.start.0, range.count)
                && !alloc.is_allocated(range.start.0, range.count)
            {
                return Err(FrameError::NotAllocated {
                    start: range.start.0,
                    count: range.count,
                });
            }
        }
        self.punch(range)
    }

    /// Bytes of memory the kernel really holds for this store right now
    /// (allocated blocks of the memfd, from `fstat`), not our own count.
    pub fn allocated_bytes(&self) -> Result<u64, FrameError> {
        self.file("counting a store's memory (fstat)")?;
        let st = self.fstat()?;
        Ok(u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512))
    }

    /// Size of the memfd in frames (allocated or not).
    pub fn len_frames(&self) -> u64 {
        self.lock_allocator().len()
    }

    /// Frames currently handed out.
    pub fn allocated_frames(&self) -> u64 {
        self.lock_allocator().allocated()
    }

    /// Maps `range` into this process, shared and writable.
    pub fn map(&self, range: FrameRange) -> Result<HostMapping, FrameError> {
        self.check_granule(range)?;
        HostMapping::new(self, range)
    }

    /// Maps new frames `range` shared and writable, ignoring the store's
    /// populate and huge-page options, for filling them before anything else maps them (see
    /// [`HostMapping::make_read_only`]).
    pub(crate) fn map_for_fill(&self, range: FrameRange) -> Result<HostMapping, FrameError> {
        self.check_granule(range)?;
        HostMapping::for_fill(self, range)
    }

    /// Writes consecutive frames starting at `frame` from `data` (a multiple
    /// of the page size) in one `pwrite`: how shared frames get their
    /// content where their fill mapping cannot take it, and how a page's
    /// bytes go back to its own frame when sharing is broken.
    pub fn write_frames(&self, frame: FrameNumber, data: &[u8]) -> Result<(), FrameError> {
        self.pio(
            frame.file_offset(),
            data.as_ptr().cast_mut(),
            data.len(),
            true,
        )
    }

    /// Reads consecutive frames starting at `frame` into `out` (`pread`;
    /// `out.len()` a multiple of the page size).
    pub fn read_frames(&self, frame: FrameNumber, out: &mut [u8]) -> Result<(), FrameError> {
        self.pio(frame.file_offset(), out.as_mut_ptr(), out.len(), false)
    }

    /// Reads `out.len()` bytes from byte `offset` of the memfd (`pread`, any
    /// alignment). A hole reads as zeros and stays a hole, where a read
    /// through a mapping would allocate it: how the memory layer reads pages
    /// it knows are released.
    pub(crate) fn read_bytes(&self, offset: u64, out: &mut [u8]) -> Result<(), FrameError> {
        self.pio(offset, out.as_mut_ptr(), out.len(), false)
    }

    /// `pread`/`pwrite` of `len` bytes at byte `at` of the memfd.
    fn pio(&self, at: u64, buf: *mut u8, len: usize, write: bool) -> Result<(), FrameError> {
        self.file(if write {
            "writing frames (pwrite)"
        } else {
            "reading frames (pread)"
        })?;
        let mut done = 0usize;
        let base = libc::off_t::try_from(at).map_err(|_| FrameError::TooLarge {
            frames: at >> PAGE_SHIFT,
        })?;
        while done < len {
            let off = base + done as libc::off_t;
            // SAFETY: `buf + done .. buf + len` is valid for reads (write) or
            // writes (read): it is the caller's slice; the fd is ours.
            let n = unsafe {
                if write {
                    libc::pwrite(self.fd.as_raw_fd(), buf.add(done).cast(), len - done, off)
                } else {
                    libc::pread(self.fd.as_raw_fd(), buf.add(done).cast(), len - done, off)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(FrameError::Os {
                    op: if write { "pwrite" } else { "pread" },
                    source: e,
                });
            }
            if n == 0 {
                return Err(FrameError::NotAllocated {
                    start: at >> PAGE_SHIFT,
                    count: len.div_ceil(PAGE_SIZE) as u64,
                });
            }
            done += n.unsigned_abs();
        }
        Ok(())
    }

    fn lock_allocator(&self) -> std::sync::MutexGuard<'_, RangeAllocator> {
        // The allocator's state is consistent between statements, so a
        // panic elsewhere while the lock was held cannot have corrupted it.
        self.allocator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_granule(&self, range: FrameRange) -> Result<(), FrameError> {
        let g = self.granule_frames();
        if range.count == 0 {
            return Err(FrameError::Empty);
        }
        if range.start.0 % g != 0 || range.count % g != 0 || range.end() > MAX_FRAMES {
            return Err(FrameError::Misaligned {
                start: range.start.0,
                count: range.count,
                granule: self.granule,
            });
        }
        Ok(())
    }

    fn punch(&self, range: FrameRange) -> Result<(), FrameError> {
        self.file("releasing frames (punch hole)")?;
        let (off, len) = byte_span(range)?;
        // SAFETY: plain syscall on a descriptor we own; offset and length
        // are in range and aligned to the granule (checked by the caller).
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc != 0 {
            return Err(FrameError::Os {
                op: "fallocate(PUNCH_HOLE)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Grows the memfd to at least `frames` frames (never shrinks it: an
    /// adopted one is sealed against that, and may be longer already).
    fn set_len(&self, frames: u64) -> Result<(), FrameError> {
        if !self.has_file() {
            // Frame numbers only: nothing to grow.
            return Ok(());
        }
        let bytes = libc::off_t::try_from(frames << PAGE_SHIFT)
            .map_err(|_| FrameError::TooLarge { frames })?;
        if self.fstat()?.st_size >= bytes {
            return Ok(());
        }
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe { libc::ftruncate(self.fd.as_raw_fd(), bytes) };
        if rc != 0 {
            let source = io::Error::last_os_error();
            if matches!(self.options.backing, Backing::Hugetlb(_)) {
                return Err(FrameError::NoHugePages { size: self.granule });
            }
            return Err(FrameError::Os {
                op: "ftruncate",
                source,
            });
        }
        Ok(())
    }

    fn fstat(&self) -> Result<libc::stat, FrameError> {
        memfd::fstat(self.fd.as_fd()).map_err(|source| FrameError::Os {
            op: "fstat",
            source,
        })
    }
}

fn byte_span(range: FrameRange) -> Result<(libc::off_t, libc::off_t), FrameError> {
    let too_large = FrameError::TooLarge {
        frames: range.end(),
    };
    let off = libc::off_t::try_from(range.start.file_offset()).map_err(|_| too_large)?;
    let len = libc::off_t::try_from(range.bytes()).map_err(|_| FrameError::TooLarge {
        frames: range.end(),
    })?;
    Ok((off, len))
}

impl AsRawFd for FrameStore {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for FrameStore {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_grows_and_free_reuses() -> Result<(), FrameError> {
        let store = FrameStore::memfd()?;
        let a = store.allocate(4)?;
        let b = store.allocate(8)?;
        assert_eq!(a.start, FrameNumber(0));
        assert_eq!(b.start, FrameNumber(4));
        assert_eq!(store.len_frames(), 12);
        store.free(a)?;
        let c = store.allocate(2)?;
        assert_eq!(c.start, FrameNumber(0), "freed frames are reused first");
        assert!(matches!(
            store.free(FrameRange {
                start: FrameNumber(100),
                count: 1
            }),
            Err(FrameError::NotAllocated { .. })
        ));
        assert!(matches!(store.allocate(0), Err(FrameError::Empty)));
        Ok(())
    }

    #[test]
    fn release_returns_memory_to_the_kernel() -> Result<(), FrameError> {
        let store = FrameStore::memfd()?;
        let range = store.allocate(256)?;
        let map = store.map(range)?;
        // SAFETY: the mapping is 256 pages long and exclusively ours here.
        unsafe { std::ptr::write_bytes(map.as_ptr(), 0xa5, map.len()) };
        let before = store.allocated_bytes()?;
        assert!(
            before >= 256 * 4096,
            "kernel holds the touched pages: {before}"
        );
        store.release(range)?;
        let after = store.allocated_bytes()?;
        assert!(after < 4096, "punch hole freed the pages: {after}");
        // SAFETY: in bounds of the live mapping.
        let b = unsafe { std::ptr::read_volatile(map.as_ptr().add(100)) };
        assert_eq!(b, 0, "released frames read as zero");
        Ok(())
    }
}

#[cfg(test)]
mod hugetlb_tests {
    use super::*;

    /// Without reserved huge pages, mapping hugetlb frames is a typed error,
    /// never a SIGBUS on first touch.
    #[test]
    fn hugetlb_shortage_is_an_error_not_a_crash() {
        let reserved =
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
        let store = match FrameStore::new(StoreOptions {
            backing: Backing::Hugetlb(PageSize::Size2M),
            ..StoreOptions::default()
        }) {
            Ok(s) => s,
            Err(FrameError::NoHugePages { .. }) => return,
            Err(e) => panic!("unexpected: {e}"),
        };
        // Ask for more than is free.
        let want = (reserved + 1) * 512;
        match store.allocate(want).and_then(|r| store.map(r)) {
            Err(FrameError::NoHugePages { size }) => assert_eq!(size, PageSize::Size2M),
            Ok(_) => panic!(
                "mapped {} huge pages with only {reserved} free",
                reserved + 1
            ),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}

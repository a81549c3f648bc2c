//! `HostMapping`: one `mmap` of a run of frame-store pages into this process.
//! It owns the address range and unmaps it on drop (or, adopted from a VMM
//! that mapped it, leaves it mapped); it never hands out Rust references
//! into the range, because guest vCPUs write it behind our back.
//!
//! Written on `libc` rather than `memmap2` because later layers remap single
//! pages inside the range with `MAP_FIXED` (sharing a frame between guests),
//! which `memmap2` deliberately does not expose.

use std::{io, os::fd::AsRawFd, ptr::NonNull};

use super::{FrameError, FrameRange, FrameStore};

/// What a range of a [`HostMapping`] can be remapped to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RemapTarget {
    /// The store's frames at `file_offset`, shared and writable: a page's
    /// own frame.
    OwnShared {
        /// Byte offset in the memfd.
        file_offset: u64,
    },
    /// A private copy-on-write view of the frames at `file_offset` of the
    /// memfd `fd` (the dedup host's shared frames, which need not live in
    /// the mapping's own store): reads see the frame, and a write makes the
    /// kernel copy the page into anonymous memory first, so the frame
    /// itself can never be written through this mapping.
    PrivateCopyOf {
        /// The memfd holding the frames; the caller keeps it open for the
        /// call (the mapping holds its own reference afterwards).
        fd: std::os::fd::RawFd,
        /// Byte offset in the memfd.
        file_offset: u64,
    },
    /// Private anonymous memory: reads see the kernel's zero page without
    /// allocating, a write allocates.
    AnonZero,
}

/// A shared, writable mapping of a contiguous run of frames.
#[derive(Debug)]
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Made here, so unmapped on drop; `false` for a VMM's mapping
    /// ([`HostMapping::adopt`]), which the VMM unmaps.
    owned: bool,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer is
// only an address, and every access to the bytes goes through raw-pointer
// copies or atomics that tolerate concurrent access.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `&HostMapping` gives no aliasing Rust references.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `range` of `store` read-write and shared.
    pub(crate) fn new(store: &FrameStore, range: FrameRange) -> Result<Self, FrameError> {
        Self::with_prot(store, range, libc::PROT_READ | libc::PROT_WRITE, true)
    }

    /// Maps new frames `range` of `store` read-write and shared, ignoring
    /// the store's populate and huge-page options, to fill them before anything else maps them;
    /// [`make_read_only`](Self::make_read_only) then turns it into a view
    /// that can never write them.
    pub(crate) fn for_fill(store: &FrameStore, range: FrameRange) -> Result<Self, FrameError> {
        Self::with_prot(store, range, libc::PROT_READ | libc::PROT_WRITE, false)
    }

    /// The VMM's mapping of `len` bytes at `ptr`, used in place and never
    /// unmapped here.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` is mapped readable and writable, and stays mapped,
    /// to the same memory, for as long as the value lives; nothing else
    /// unmaps or replaces it meanwhile (pagefold's own remaps excepted).
    pub(crate) unsafe fn adopt(ptr: NonNull<u8>, len: usize) -> Self {
        HostMapping {
            ptr,
            len,
            owned: false,
        }
    }

    /// Whether the mapping is a VMM's, used in place (`GuestMemory::adopt_mapped_file`,
    /// `GuestMemory::adopt_anonymous`):
    /// it is not unmapped on drop.
    pub fn is_adopted(&self) -> bool {
        !self.owned
    }

    fn with_prot(
        store: &FrameStore,
        range: FrameRange,
        prot: libc::c_int,
        store_options: bool,
    ) -> Result<Self, FrameError> {
        store.file("mapping frames")?;
        let len = usize::try_from(range.bytes()).map_err(|_| FrameError::TooLarge {
            frames: range.count,
        })?;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        let offset =
            libc::off_t::try_from(range.start.file_offset()).map_err(|_| FrameError::TooLarge {
                frames: range.start.0.saturating_add(range.count),
            })?;
        // Hugetlb pages are reserved at mmap time (no MAP_NORESERVE), so a
        // shortage is an error here rather than a SIGBUS on first touch.
        let hugetlb = matches!(store.options().backing, super::Backing::Hugetlb(_));
        let mut flags = libc::MAP_SHARED;
        if !hugetlb {
            flags |= libc::MAP_NORESERVE;
        }
        if store_options && store.options().populate {
            flags |= libc::MAP_POPULATE;
        }
        // A null hint lets the kernel pick an unused range (nothing replaced);
        // `offset`/`len` are granule multiples (checked by the allocator).
        // SAFETY: `fd` is the store's live memfd; the hint is null (above).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                store.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            if hugetlb && source.raw_os_error() == Some(libc::ENOMEM) {
                return Err(FrameError::NoHugePages {
                    size: store.granule(),
                });
            }
            return Err(FrameError::Os { op: "mmap", source });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(FrameError::Os {
            op: "mmap",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mapping = HostMapping {
            ptr,
            len,
            owned: true,
        };
        if store_options && store.options().transparent_huge_pages {
            // Advice only: where shmem THP is off, the kernel ignores it.
            // SAFETY: the range is exactly the mapping created above.
            unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        }
        Ok(mapping)
    }

    /// First byte of the mapping.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Replaces the pages `[offset, offset+len)` of this mapping with
    /// `target`, in one `mmap(MAP_FIXED)`; the range stays mapped throughout
    /// (the kernel swaps it under the mmap lock), so concurrent raw readers
    /// see the old or the new page, never a hole.
    ///
    /// `store` must be the store this mapping's frames come from.
    pub(crate) fn remap(
        &self,
        store: &FrameStore,
        offset: usize,
        len: usize,
        target: RemapTarget,
    ) -> Result<(), FrameError> {
        let page = crate::addr::PAGE_SIZE;
        if len == 0
            || offset % page != 0
            || len % page != 0
            || offset.checked_add(len).is_none_or(|e| e > self.len)
        {
            return Err(FrameError::Misaligned {
                start: offset as u64 / page as u64,
                count: len as u64 / page as u64,
                granule: crate::addr::PageSize::Size4K,
            });
        }
        let (flags, fd, file_offset) = match target {
            RemapTarget::OwnShared { file_offset } => (
                libc::MAP_SHARED,
                store.file("mapping a page's own frame")?.as_raw_fd(),
                file_offset,
            ),
            RemapTarget::PrivateCopyOf { fd, file_offset } => (libc::MAP_PRIVATE, fd, file_offset),
            RemapTarget::AnonZero => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
        };
        let file_offset = libc::off_t::try_from(file_offset).map_err(|_| FrameError::TooLarge {
            frames: file_offset >> crate::addr::PAGE_SHIFT,
        })?;
        // `offset + len <= self.len` (checked above): MAP_FIXED replaces only
        // pages this value owns; no Rust reference into them exists.
        // SAFETY: as argued above; `fd` is the live memfd or -1 for anon.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                file_offset,
            )
        };
        if p == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            // A file or anonymous mapping with MAP_NORESERVE commits no
            // memory: ENOMEM here is the process's mapping count (or its
            // address space), which the caller must hear as such.
            if source.raw_os_error() == Some(libc::ENOMEM) {
                store.map_budget().exhausted();
                return Err(FrameError::MapLimit {
                    op: "mmap(MAP_FIXED) of guest pages",
                    max: crate::host::proc::max_map_count().unwrap_or(0),
                });
            }
            return Err(FrameError::Os {
                op: "mmap(MAP_FIXED)",
                source,
            });
        }
        Ok(())
    }

    /// Allocates and maps the pages `[offset, offset+len)` for writing now
    /// (`MADV_POPULATE_WRITE`), so that writes to them cannot fault; an
    /// error (no memory, or a kernel without the advice) is returned rather
    /// than raised as `SIGBUS` on a later write.
    pub(crate) fn populate_write(&self, offset: usize, len: usize) -> Result<(), FrameError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(FrameError::TooLarge {
                frames: (offset.saturating_add(len) >> crate::addr::PAGE_SHIFT) as u64,
            });
        }
        // `offset + len <= self.len` (checked above), so the range lies in
        // this live mapping; the advice only faults pages in, it changes no
        // byte.
        // SAFETY: as argued above.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(FrameError::Os {
                op: "madvise(MADV_POPULATE_WRITE)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Makes the whole mapping read-only (`mprotect(PROT_READ)`): from here
    /// nothing can write the frames through it. Pages already mapped stay
    /// mapped, so reads do not fault again.
    pub(crate) fn make_read_only(&self) -> Result<(), FrameError> {
        // SAFETY: `ptr`/`len` describe exactly the mapping this value owns;
        // dropping write permission cannot invalidate any reader.
        let rc = unsafe { libc::mprotect(self.ptr.as_ptr().cast(), self.len, libc::PROT_READ) };
        if rc != 0 {
            return Err(FrameError::Os {
                op: "mprotect(PROT_READ)",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Always false: empty mappings are refused at creation.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if !self.owned {
            // The VMM's mapping: the VMM unmaps it.
            return;
        }
        // SAFETY: `ptr`/`len` describe a mapping this value created and still
        // owns; nothing can reach it after drop because no references escape.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

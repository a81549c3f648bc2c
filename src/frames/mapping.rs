//! `HostMapping`: one `mmap` of a run of frame-store pages into this process.
//! It owns the address range and unmaps it on drop; it never hands out Rust
//! references into the range, because guest vCPUs write it behind our back.
//!
//! Written on `libc` rather than `memmap2` because later layers remap single
//! pages inside the range with `MAP_FIXED` (sharing a frame between guests),
//! which `memmap2` deliberately does not expose.

use std::{io, os::fd::AsRawFd, ptr::NonNull};

use super::{FrameError, FrameRange, FrameStore};

/// A shared, writable mapping of a contiguous run of frames.
#[derive(Debug)]
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
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
        let mut flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        if store.options().populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY:
        // 1. A null hint lets the kernel choose an unused address range, so no
        //    existing mapping is replaced.
        // 2. `fd` is a valid memfd owned by `store` for the duration of the call.
        // 3. `offset` and `len` are multiples of the store's granule (checked
        //    by the allocator that produced `range`).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                store.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FrameError::Os {
                op: "mmap",
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(FrameError::Os {
            op: "mmap",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mapping = HostMapping { ptr, len };
        if store.options().transparent_huge_pages {
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

    /// Always false: empty mappings are refused at creation.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and still
        // owns; nothing can reach it after drop because no references escape.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

//! Whether pages hold memory: `mincore` on a range of this process's
//! mappings, and `lseek(SEEK_DATA)` on a file (a memfd's holes).

use std::os::fd::BorrowedFd;

use crate::addr::{HostVirtAddr, PAGE_SHIFT};

/// Whether byte `b` of a [`mincore`] answer says the page is resident.
#[inline]
pub(crate) const fn is_resident(b: u8) -> bool {
    b & 1 != 0
}

/// `mincore` of the `out.len()` pages from page-aligned `addr` into `out`
/// (one byte per page, see [`is_resident`]); `false` if the kernel refuses
/// (unaligned, or not all mapped).
pub(crate) fn mincore(addr: HostVirtAddr, out: &mut [u8]) -> bool {
    let Some(len) = out.len().checked_shl(PAGE_SHIFT) else {
        return false;
    };
    // `mincore` reads no memory of the range: the kernel checks that it is
    // mapped and page aligned and fails otherwise.
    // SAFETY: 1. the range is only looked up by the kernel, never
    // dereferenced, so any address is sound; 2. `out` has one writable byte
    // per page of the range, as mincore(2) requires.
    let rc = unsafe { libc::mincore(addr.0 as *mut libc::c_void, len, out.as_mut_ptr()) };
    rc == 0
}

/// Where a file holds data, from an offset on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DataFrom {
    /// The first offset at or after the one asked that holds data.
    At(u64),
    /// No data from the offset asked to the end of the file.
    None,
    /// The kernel will not say.
    Unknown,
}

/// `lseek(fd, offset, SEEK_DATA)`: the first offset at or after `offset`
/// that holds data (`[offset, that)` is a hole).
pub(crate) fn seek_data(fd: BorrowedFd<'_>, offset: u64) -> DataFrom {
    use std::os::fd::AsRawFd;
    let Ok(at) = libc::off_t::try_from(offset) else {
        return DataFrom::Unknown;
    };
    // SAFETY: `lseek` only reads the descriptor's file; `fd` is borrowed
    // open for the call.
    let data = unsafe { libc::lseek(fd.as_raw_fd(), at, libc::SEEK_DATA) };
    if data < 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            DataFrom::None
        } else {
            DataFrom::Unknown
        }
    } else {
        DataFrom::At(u64::try_from(data).unwrap_or(0))
    }
}

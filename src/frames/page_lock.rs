//! A lock on one page of a memfd between processes that may each copy it
//! home (an open-file-description lock, `F_OFD_SETLKW`, which excludes other
//! open file descriptions of the file, in this process or another), and
//! whether the page holds data: the first to copy a page into a hole wins,
//! and nobody overwrites a page that holds data since, a guest's write
//! perhaps.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use crate::{addr::PAGE_SIZE, host::residency};

// `F_WRLCK`, `F_UNLCK` and `SEEK_SET` as the `flock` fields take them:
// small constants (1, 2 and 0) that fit a short.
#[allow(clippy::cast_possible_truncation)]
const WRITE_LOCK: libc::c_short = libc::F_WRLCK as libc::c_short;
#[allow(clippy::cast_possible_truncation)]
const UNLOCK: libc::c_short = libc::F_UNLCK as libc::c_short;
#[allow(clippy::cast_possible_truncation)]
const FROM_START: libc::c_short = libc::SEEK_SET as libc::c_short;

/// An exclusive lock on the page at byte `offset` of a memfd, held until
/// dropped. Locks through different open file descriptions of one file
/// exclude each other; through the same one they do not (a descriptor
/// passed with SCM_RIGHTS shares its description: reopen it).
#[derive(Debug)]
pub struct FramePageLock<'a> {
    fd: BorrowedFd<'a>,
    offset: u64,
}

fn flock(kind: libc::c_short, offset: u64) -> io::Result<libc::flock> {
    Ok(libc::flock {
        l_type: kind,
        l_whence: FROM_START,
        l_start: libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        l_len: PAGE_SIZE as libc::off_t,
        l_pid: 0,
    })
}

impl<'a> FramePageLock<'a> {
    /// Waits for and takes the lock on the page at `offset` of `fd`.
    pub fn take(fd: BorrowedFd<'a>, offset: u64) -> io::Result<Self> {
        let mut fl = flock(WRITE_LOCK, offset)?;
        loop {
            // SAFETY: `fl` is a valid flock for the call; the fd is borrowed
            // open for it.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLKW, &mut fl) } == 0 {
                return Ok(FramePageLock { fd, offset });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Whether the page holds data (is no hole). A page the kernel will not
    /// say of counts as holding data: never overwritten.
    pub fn holds_data(&self) -> bool {
        match residency::seek_data(self.fd, self.offset) {
            residency::DataFrom::At(at) => at == self.offset,
            residency::DataFrom::None => false,
            residency::DataFrom::Unknown => true,
        }
    }
}

impl Drop for FramePageLock<'_> {
    fn drop(&mut self) {
        if let Ok(mut fl) = flock(UNLOCK, self.offset) {
            // SAFETY: as in `take`.
            unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        }
    }
}

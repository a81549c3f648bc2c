//! What a process asks of a memfd that crosses to or from another: its
//! status (`fstat`), its seals (a file that can shrink under a mapping
//! makes the next access a `SIGBUS`), and a new open file description of
//! it (read-only, to share frames without letting them be written; or
//! read-write, so page locks exclude the processes that received the same
//! descriptor). One place for the syscalls the frame store, the host
//! service and its clients each need.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// `fstat` of `fd`.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable buffer of the right type; the kernel fills
    // it completely when the call succeeds; the fd is borrowed open.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    Ok(unsafe { st.assume_init() })
}

/// The seals of `fd` (`F_GET_SEALS`), or `None` where it has none to tell
/// (it is no memfd).
pub(crate) fn seals(fd: BorrowedFd<'_>) -> Option<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and reads nothing of ours.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    (seals >= 0).then_some(seals)
}

/// Whether `fd` is a memfd that cannot shrink (`F_SEAL_SHRINK`).
pub(crate) fn cannot_shrink(fd: BorrowedFd<'_>) -> bool {
    seals(fd).is_some_and(|s| s & libc::F_SEAL_SHRINK != 0)
}

/// Opens the file behind `fd` again (through `/proc/self/fd`) as a new
/// open file description, read-only or read-write.
pub(crate) fn reopen(fd: BorrowedFd<'_>, writable: bool) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mode = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    // SAFETY: a valid NUL-terminated path and open flags.
    let raw = unsafe { libc::open(path.as_ptr(), mode | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A new memfd named `name` (close-on-exec, plus `flags`).
pub(crate) fn create(name: &std::ffi::CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string that outlives the
    // call; the flags are memfd_create flags.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Adds `seals` to the memfd `fd` (`F_ADD_SEALS`).
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int of seal bits; the fd is borrowed open.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

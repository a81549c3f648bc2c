//! The window word: one `AtomicU64` in a small sealed memfd that a VMM
//! process and the host service both map, through which a remap window is
//! either taken by the client or revoked by the service, never both.
//!
//! The service arms a window (`ARMED`, with its sequence number) before it
//! sends the remap; the client takes it (`ARMED -> TAKEN`) before its first
//! `mmap` and marks it `DONE` after its last; a service whose deadline
//! passed revokes it (`ARMED -> REVOKED`). One compare-and-swap decides, so
//! a late client never remaps pages the service already gave back to their
//! own frames, and the service knows whether a silent client remapped.

use crate::frames::memfd;

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// The word's states (low two bits; the sequence number is above them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Window {
    /// No window, or one the service revoked.
    Revoked,
    /// The service armed it and waits.
    Armed,
    /// The client took it and is remapping.
    Taken,
    /// The client finished its remaps.
    Done,
}

const CONTROL_LEN: usize = 4096;

impl Window {
    fn bits(self) -> u64 {
        match self {
            Window::Revoked => 0,
            Window::Armed => 1,
            Window::Taken => 2,
            Window::Done => 3,
        }
    }

    fn from_bits(b: u64) -> Window {
        match b & 3 {
            1 => Window::Armed,
            2 => Window::Taken,
            3 => Window::Done,
            _ => Window::Revoked,
        }
    }
}

/// One process's mapping of the window word.
#[derive(Debug)]
pub(crate) struct ControlPage {
    ptr: NonNull<AtomicU64>,
}

// SAFETY: the mapping is only ever accessed through the `AtomicU64` it
// holds, which is Sync, and lives as long as the value.
unsafe impl Send for ControlPage {}
// SAFETY: as above.
unsafe impl Sync for ControlPage {}

impl ControlPage {
    /// Makes a new control memfd (4 KiB, sealed against every size change
    /// so the other process can map it safely) and maps it here.
    pub(crate) fn create() -> io::Result<(ControlPage, OwnedFd)> {
        // SAFETY: a valid NUL-terminated name and memfd flags.
        let raw = unsafe {
            libc::memfd_create(
                c"pagefold-control".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscalls on our descriptor.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), CONTROL_LEN as libc::off_t) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; F_ADD_SEALS takes an int of seal bits.
        let rc = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let page = Self::map(fd.as_fd())?;
        Ok((page, fd))
    }

    /// Maps a control memfd the other process made, after checking that it
    /// cannot shrink under the mapping (a shrunk file would make the next
    /// access a `SIGBUS`).
    pub(crate) fn adopt(fd: BorrowedFd<'_>) -> io::Result<ControlPage> {
        if !memfd::cannot_shrink(fd) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the control memfd is not sealed against shrinking",
            ));
        }
        let st = memfd::fstat(fd)?;
        if st.st_size < CONTROL_LEN as libc::off_t {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the control memfd is shorter than a page",
            ));
        }
        Self::map(fd)
    }

    fn map(fd: BorrowedFd<'_>) -> io::Result<ControlPage> {
        // SAFETY: a fresh shared mapping of a page of a file at least that
        // long (checked or made by the callers); nothing else is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CONTROL_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(ControlPage { ptr })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: the page is mapped for the life of `self`, page-aligned
        // (so aligned for u64), and only ever accessed atomically.
        unsafe { self.ptr.as_ref() }
    }

    /// The service arms window `seq`.
    pub(crate) fn arm(&self, seq: u64) {
        self.word()
            .store(seq << 2 | Window::Armed.bits(), Ordering::SeqCst);
    }

    /// Moves window `seq` from `from` to `to`; whether this call did.
    pub(crate) fn advance(&self, seq: u64, from: Window, to: Window) -> bool {
        self.word()
            .compare_exchange(
                seq << 2 | from.bits(),
                seq << 2 | to.bits(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// The state of window `seq` (`Revoked` if the word names another).
    pub(crate) fn state(&self, seq: u64) -> Window {
        let w = self.word().load(Ordering::SeqCst);
        if w >> 2 == seq {
            Window::from_bits(w)
        } else {
            Window::Revoked
        }
    }
}

impl Drop for ControlPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once, here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), CONTROL_LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_side_wins_a_window() {
        let (client, fd) = ControlPage::create().unwrap();
        let service = ControlPage::adopt(fd.as_fd()).unwrap();
        service.arm(7);
        assert_eq!(client.state(7), Window::Armed);
        assert!(client.advance(7, Window::Armed, Window::Taken));
        assert!(!service.advance(7, Window::Armed, Window::Revoked));
        assert!(client.advance(7, Window::Taken, Window::Done));
        assert_eq!(service.state(7), Window::Done);
        service.arm(8);
        assert!(service.advance(8, Window::Armed, Window::Revoked));
        assert!(!client.advance(8, Window::Armed, Window::Taken));
        // A stale sequence number never matches.
        assert_eq!(client.state(7), Window::Revoked);
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        // SAFETY: a valid name and flags.
        let raw = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        assert!(ControlPage::adopt(fd.as_fd()).is_err());
    }
}

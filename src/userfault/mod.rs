//! A thin, typed wrapper over Linux `userfaultfd` in write-protect mode: the
//! mechanism that holds a raw-pointer writer or a KVM vCPU inside the kernel's
//! fault path, with no exit, while pagefold changes a page's backing.
//!
//! Hand-written on `libc` because the `userfaultfd` crate's bindings are
//! generated with bindgen at build time (libclang on every build machine) and
//! do not expose `UFFD_FEATURE_WP_UNPOPULATED`; the interface is five ioctls.
//!
//! `missing.rs` builds on the missing-page mode: a fault server and its
//! page sources, shared by lazy snapshot restore and post-copy migration.
//!
//! Kernel-mode faults (KVM touching guest memory on a vCPU's behalf) are only
//! delivered to a userfaultfd created without `UFFD_USER_MODE_ONLY`, which
//! needs `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd = 1`.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use crate::addr::HostVirtAddr;

mod missing;
pub use missing::{FaultServer, FaultSource, MissingPages, MissingSpan};

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `mremap` of a registered range keeps its registration and its write
/// protection, and waits until the move is read from the descriptor.
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Write faults on protected pages are resolved by the kernel itself (the
/// protection is dropped and the write goes on, no message), leaving the
/// page marked written for `PAGEMAP_SCAN` (Linux 6.7+). Implies
/// `UFFD_FEATURE_WP_UNPOPULATED`.
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `userfaultfd(2)` flag: only user-mode faults are delivered. Enough for
/// asynchronous write protection, where no fault is ever delivered, and
/// needs no privilege.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_POISON: libc::c_ulong = 0xc020_aa08;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Missing-page faults on shmem mappings (Linux 4.11+; memfd memory).
pub(crate) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFDIO_POISON`: a page that reads as a memory error (Linux 6.6+).
pub(crate) const UFFD_FEATURE_POISON: u64 = 1 << 14;

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`, and `struct uffdio_poison` (same layout).
#[repr(C)]
struct UffdioFill {
    range: UffdioRange,
    mode: u64,
    result: i64,
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` for page faults (32 bytes; other events share the size).
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// Errors of userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    /// `userfaultfd(2)` could not be created.
    #[error("userfaultfd unavailable: {0} (kernel-mode faults need CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)")]
    Unavailable(#[source] io::Error),
    /// The kernel lacks asynchronous write protection
    /// (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+) for shmem mappings.
    #[error("this kernel's userfaultfd has no asynchronous write protection for shmem (features {features:#x}; needs WP_ASYNC, Linux 6.7+)")]
    NoAsyncWriteProtect {
        /// Features the kernel offered.
        features: u64,
    },
    /// The kernel lacks write protection for shmem mappings, or for pages
    /// not yet populated (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM` and
    /// `UFFD_FEATURE_WP_UNPOPULATED`, Linux 6.4+); dedup needs both.
    #[error(
        "this kernel's userfaultfd lacks write protection for shmem or for unpopulated pages (features {features:#x}; needs WP_HUGETLBFS_SHMEM and WP_UNPOPULATED, Linux 6.4+)"
    )]
    NoShmemWriteProtect {
        /// Features the kernel offered.
        features: u64,
    },
    /// The kernel lacks missing-page faults on shmem mappings
    /// (`UFFD_FEATURE_MISSING_SHMEM`, Linux 4.11+), which a lazy restore
    /// into memfd memory needs.
    #[error("this kernel's userfaultfd has no missing-page faults on shmem (features {features:#x}; needs MISSING_SHMEM, Linux 4.11+)")]
    NoMissingShmem {
        /// Features the kernel offered.
        features: u64,
    },
    /// An ioctl failed.
    #[error("{op} on [{start:#x}, +{len:#x}) failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Range start (host-virtual).
        start: HostVirtAddr,
        /// Range length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A write fault a thread is waiting in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteFault {
    /// The faulting address (page-aligned by the kernel unless the exact
    /// address feature is on).
    pub addr: HostVirtAddr,
    /// The fault is due to write protection (not a missing page).
    pub write_protect: bool,
}

/// Any page fault a thread is waiting in (missing or write-protect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address (page-aligned by the kernel).
    pub addr: HostVirtAddr,
    /// The access was a write.
    pub write: bool,
    /// The fault is due to write protection (not a missing page).
    pub write_protect: bool,
}

/// What a [`Userfault::copy`] did: it stops at the first page present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    /// Bytes placed from the start of the range.
    pub bytes: u64,
    /// The page right after them was present already (`EEXIST`): someone
    /// else filled it; the caller skips it and goes on.
    pub exists: bool,
}

/// One userfaultfd, in write-protect mode (or, from
/// [`Userfault::new_missing`], missing-page mode).
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    features: u64,
}

impl Userfault {
    /// Opens a userfaultfd (non-blocking, close-on-exec) that also receives
    /// kernel-mode faults, with write protection for shmem and for pages
    /// not yet populated (Linux 6.4+; an older kernel gets
    /// [`UserfaultError::NoShmemWriteProtect`]).
    pub fn new() -> Result<Self, UserfaultError> {
        Self::with_features(0)
    }

    /// [`Userfault::new`] that also keeps registration and write
    /// protection across `mremap` (`UFFD_FEATURE_EVENT_REMAP`): how a
    /// protected mapping replaces another with no unprotected moment. Every
    /// `mremap` of a registered range then waits until a thread reads the
    /// event ([`read_fault`](Self::read_fault) does, and skips it), so the
    /// process must keep a thread reading.
    pub fn new_with_remap_events() -> Result<Self, UserfaultError> {
        Self::with_features(UFFD_FEATURE_EVENT_REMAP)
    }

    fn with_features(extra: u64) -> Result<Self, UserfaultError> {
        // SAFETY: plain syscall with flag arguments only.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(UserfaultError::Unavailable(io::Error::last_os_error()));
        }
        let raw = RawFd::try_from(raw)
            .map_err(|_| UserfaultError::Unavailable(io::Error::from_raw_os_error(libc::EBADF)))?;
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED | extra,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid, writable `uffdio_api` for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            // Both are needed: without WP_UNPOPULATED, protection does not
            // cover a page with no page-table entry yet (a merged zero
            // page's untouched anonymous memory), so a write there during
            // an unmerge's copy would not wait, and would be lost. Report
            // what the kernel offers (a failed UFFDIO_API leaves the fd
            // unusable: ask on a new one).
            drop(fd);
            let probe = Self::open_raw(0)?;
            let mut offered = UffdioApi {
                api: UFFD_API,
                features: 0,
                ioctls: 0,
            };
            // SAFETY: `offered` is a valid, writable `uffdio_api`.
            let features =
                if unsafe { libc::ioctl(probe.as_raw_fd(), UFFDIO_API, &mut offered) } == 0 {
                    offered.features
                } else {
                    0
                };
            return Err(UserfaultError::NoShmemWriteProtect { features });
        }
        let needed = UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED | extra;
        if api.features & needed != needed {
            return Err(UserfaultError::NoShmemWriteProtect {
                features: api.features,
            });
        }
        Ok(Userfault {
            fd,
            features: api.features,
        })
    }

    /// Opens a userfaultfd in asynchronous write-protect mode
    /// (`UFFD_FEATURE_WP_ASYNC`): a write to a protected page is resolved
    /// by the kernel at once and only marks the page written, which
    /// `PAGEMAP_SCAN` reports and re-protects. No fault is ever delivered,
    /// so the descriptor is opened user-mode-only where the kernel allows
    /// (no privilege needed) and needs no handler thread.
    pub fn new_async_wp() -> Result<Self, UserfaultError> {
        let want =
            UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        // First ask what the kernel offers (features 0 reports them all):
        // requesting an unknown feature would only fail with EINVAL.
        let probe = Self::open_raw(UFFD_USER_MODE_ONLY)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid, writable `uffdio_api` for the call.
        if unsafe { libc::ioctl(probe.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(UserfaultError::Unavailable(io::Error::last_os_error()));
        }
        drop(probe);
        if api.features & want != want {
            return Err(UserfaultError::NoAsyncWriteProtect {
                features: api.features,
            });
        }
        let fd = Self::open_raw(UFFD_USER_MODE_ONLY)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(UserfaultError::NoAsyncWriteProtect {
                features: api.features,
            });
        }
        Ok(Userfault {
            fd,
            features: api.features,
        })
    }

    /// A new userfaultfd with `extra` flags (falling back to none where the
    /// kernel refuses them), close-on-exec and non-blocking.
    fn open_raw(extra: libc::c_int) -> Result<OwnedFd, UserfaultError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall with flag arguments only.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | extra) };
        if raw < 0 && extra != 0 {
            // SAFETY: as above.
            raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        }
        if raw < 0 {
            return Err(UserfaultError::Unavailable(io::Error::last_os_error()));
        }
        let raw = RawFd::try_from(raw)
            .map_err(|_| UserfaultError::Unavailable(io::Error::from_raw_os_error(libc::EBADF)))?;
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// A userfaultfd another process opened and handed over (SCM_RIGHTS):
    /// its ioctls act on *that* process's address space, which is how the
    /// host service arms and releases write protection in a VMM process.
    /// The features it was opened with are not known here (0).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Userfault { fd, features: 0 }
    }

    /// Features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[addr, addr+len)` for write-protect faults. Registration
    /// belongs to the mappings (VMAs) present now: a mapping created later
    /// over the range (a `MAP_FIXED` remap) must be registered again.
    pub fn register(&self, addr: HostVirtAddr, len: u64) -> Result<(), UserfaultError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr.0, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid, writable `uffdio_register`; the kernel
        // validates the range against this process's mappings.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        self.check(rc, "UFFDIO_REGISTER", addr, len)
    }

    /// Unregisters `[addr, addr+len)`; waiting faulters are woken.
    pub fn unregister(&self, addr: HostVirtAddr, len: u64) -> Result<(), UserfaultError> {
        let mut range = UffdioRange { start: addr.0, len };
        // SAFETY: `range` is a valid `uffdio_range` for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) };
        self.check(rc, "UFFDIO_UNREGISTER", addr, len)
    }

    /// Arms write protection on a registered range: from now on a write to
    /// it blocks in the kernel until the range is unprotected or woken.
    pub fn protect(&self, addr: HostVirtAddr, len: u64) -> Result<(), UserfaultError> {
        self.writeprotect(addr, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Disarms write protection; `wake` releases threads waiting on it.
    pub fn unprotect(
        &self,
        addr: HostVirtAddr,
        len: u64,
        wake: bool,
    ) -> Result<(), UserfaultError> {
        let mode = if wake {
            0
        } else {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        };
        self.writeprotect(addr, len, mode)
    }

    /// Wakes threads waiting on faults in the range; they retry the access
    /// against whatever is mapped there now.
    pub fn wake(&self, addr: HostVirtAddr, len: u64) -> Result<(), UserfaultError> {
        let mut range = UffdioRange { start: addr.0, len };
        // SAFETY: `range` is a valid `uffdio_range` for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) };
        self.check(rc, "UFFDIO_WAKE", addr, len)
    }

    /// Reads the next pending write fault, if any (non-blocking); read
    /// faults and other events are skipped.
    pub fn read_fault(&self) -> Result<Option<WriteFault>, UserfaultError> {
        loop {
            match self.read_page_fault()? {
                None => return Ok(None),
                Some(f) if !f.write => continue,
                Some(f) => {
                    return Ok(Some(WriteFault {
                        addr: f.addr,
                        write_protect: f.write_protect,
                    }))
                }
            }
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) for a fault to be readable.
    /// Returns whether one is.
    pub fn wait(&self, timeout_ms: i32) -> Result<bool, UserfaultError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(false);
            }
            return Err(UserfaultError::Ioctl {
                op: "poll(userfaultfd)",
                start: HostVirtAddr(0),
                len: 0,
                source: e,
            });
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }

    fn writeprotect(&self, addr: HostVirtAddr, len: u64, mode: u64) -> Result<(), UserfaultError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start: addr.0, len },
            mode,
        };
        // While an event of the descriptor waits to be read (an `mremap`
        // of a registered range under `UFFD_FEATURE_EVENT_REMAP`, which
        // the process that made the descriptor reads on its fault thread),
        // the kernel refuses every write-protect change with `EAGAIN`:
        // "retry later", not a failure. Retry for up to a second, backing
        // off from 20 us to 1 ms; a descriptor whose events stay unread
        // that long is the caller's error to handle.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            // SAFETY: `wp` is a valid `uffdio_writeprotect` for the call.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) };
            if rc == 0
                || io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
                || std::time::Instant::now() >= deadline
            {
                return self.check(rc, "UFFDIO_WRITEPROTECT", addr, len);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(1));
        }
    }

    fn check(
        &self,
        rc: libc::c_int,
        op: &'static str,
        addr: HostVirtAddr,
        len: u64,
    ) -> Result<(), UserfaultError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(UserfaultError::Ioctl {
                op,
                start: addr,
                len,
                source: io::Error::last_os_error(),
            })
        }
    }
}

/// Missing-page mode: how a lazy restore fills memory on first touch.
impl Userfault {
    /// Opens a userfaultfd (non-blocking, close-on-exec, kernel-mode faults
    /// too, so a KVM vCPU's touch waits like a raw pointer's) for
    /// missing-page faults on shmem, with `UFFDIO_POISON` where the kernel
    /// has it ([`features`](Self::features) says). A kernel without
    /// missing faults on shmem gets [`UserfaultError::NoMissingShmem`].
    pub fn new_missing() -> Result<Self, UserfaultError> {
        // Ask what the kernel offers first (features 0 reports them all;
        // requesting one it lacks would only fail with EINVAL).
        let probe = Self::open_raw(0)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid, writable `uffdio_api` for the call.
        if unsafe { libc::ioctl(probe.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(UserfaultError::Unavailable(io::Error::last_os_error()));
        }
        drop(probe);
        if api.features & UFFD_FEATURE_MISSING_SHMEM == 0 {
            return Err(UserfaultError::NoMissingShmem {
                features: api.features,
            });
        }
        let want = UFFD_FEATURE_MISSING_SHMEM | (api.features & UFFD_FEATURE_POISON);
        let fd = Self::open_raw(0)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(UserfaultError::NoMissingShmem {
                features: api.features,
            });
        }
        Ok(Userfault {
            fd,
            features: api.features & (want | UFFD_FEATURE_MISSING_SHMEM),
        })
    }

    /// Whether `UFFDIO_POISON` was granted (see [`poison`](Self::poison)).
    pub fn can_poison(&self) -> bool {
        self.features & UFFD_FEATURE_POISON != 0
    }

    /// Registers `[addr, addr+len)` for missing-page faults: a touch of a
    /// page with no memory behind it waits until [`copy`](Self::copy),
    /// [`zero`](Self::zero) or [`poison`](Self::poison) fills it, or the
    /// range is unregistered.
    pub fn register_missing(&self, addr: HostVirtAddr, len: u64) -> Result<(), UserfaultError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr.0, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid, writable `uffdio_register`; the kernel
        // validates the range against this process's mappings.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        self.check(rc, "UFFDIO_REGISTER(MISSING)", addr, len)
    }

    /// Places `src` (whole pages) at `dst` (page-aligned, registered
    /// missing) atomically, page by page, and wakes the threads waiting
    /// there. Stops at the first page already present.
    pub fn copy(&self, dst: HostVirtAddr, src: &[u8]) -> Result<Copied, UserfaultError> {
        let len = src.len() as u64;
        let mut done = 0u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while done < len {
            let mut c = UffdioCopy {
                dst: dst.0 + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // The kernel checks the destination against this process's
            // registered mappings and writes only into missing pages.
            // SAFETY: `c` is a valid, writable `uffdio_copy` whose source,
            // `src[done..]`, is readable for `len - done` bytes for the call.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            if rc == 0 {
                return Ok(Copied {
                    bytes: len,
                    exists: false,
                });
            }
            let err = io::Error::last_os_error();
            if c.copy > 0 {
                done += c.copy as u64; // partial progress: go on
                continue;
            }
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    return Ok(Copied {
                        bytes: done,
                        exists: true,
                    })
                }
                // The address space is changing (an `mremap`, a fork):
                // retry for up to a second.
                Some(libc::EAGAIN) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                _ => {
                    return Err(UserfaultError::Ioctl {
                        op: "UFFDIO_COPY",
                        start: HostVirtAddr(dst.0 + done),
                        len: len - done,
                        source: err,
                    })
                }
            }
        }
        Ok(Copied {
            bytes: done,
            exists: false,
        })
    }

    /// Fills the missing page(s) `[addr, addr+len)` with zeros and wakes
    /// their waiters; `Ok(false)` if a page was present already.
    pub fn zero(&self, addr: HostVirtAddr, len: u64) -> Result<bool, UserfaultError> {
        self.fill(UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", addr, len)
    }

    /// Marks the missing page(s) `[addr, addr+len)` poisoned and wakes
    /// their waiters: an access then fails as a memory error does (SIGBUS
    /// for a raw pointer, an error from `KVM_RUN` for a vCPU) instead of
    /// seeing bytes that are not the page's. Needs
    /// [`can_poison`](Self::can_poison). `Ok(false)` if a page was present.
    pub fn poison(&self, addr: HostVirtAddr, len: u64) -> Result<bool, UserfaultError> {
        self.fill(UFFDIO_POISON, "UFFDIO_POISON", addr, len)
    }

    fn fill(
        &self,
        req: libc::c_ulong,
        op: &'static str,
        addr: HostVirtAddr,
        len: u64,
    ) -> Result<bool, UserfaultError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let mut z = UffdioFill {
                range: UffdioRange { start: addr.0, len },
                mode: 0,
                result: 0,
            };
            // SAFETY: `z` is a valid, writable `uffdio_zeropage` (the same
            // layout as `uffdio_poison`); the kernel checks the range.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, &mut z) };
            if rc == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => return Ok(false),
                Some(libc::EAGAIN) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now();
                }
                _ => {
                    return Err(UserfaultError::Ioctl {
                        op,
                        start: addr,
                        len,
                        source: err,
                    })
                }
            }
        }
    }

    /// Reads the next pending page fault of any kind, if any
    /// (non-blocking); other events are skipped.
    pub fn read_page_fault(&self) -> Result<Option<PageFault>, UserfaultError> {
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: `msg` is a writable buffer of exactly one `uffd_msg`.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(UserfaultError::Ioctl {
                        op: "read(userfaultfd)",
                        start: HostVirtAddr(0),
                        len: 0,
                        source: e,
                    }),
                };
            }
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            return Ok(Some(PageFault {
                addr: HostVirtAddr(msg.address),
                write: msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                write_protect: msg.flags & UFFD_PAGEFAULT_FLAG_WP != 0,
            }));
        }
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

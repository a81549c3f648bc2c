//! The status code every call returns, and the error type the exports use
//! internally: a status plus the message `pf_last_error_message` hands out.

use std::{ffi::c_char, fmt};

use pagefold::{
    dedup::RemoteError,
    service::{wire::WireError, ServiceError},
    AccessError, DedupError, FrameError, MemoryError,
};

/// What a call did: `PF_OK` (0) or why it failed (negative). The values are
/// part of the ABI and never change meaning; later versions only add codes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum pf_status {
    /// Success.
    PF_OK = 0,
    /// A required pointer argument was NULL.
    PF_ERR_NULL_POINTER = -1,
    /// An argument is out of its domain: an unknown enum value or flag bit,
    /// a length larger than PTRDIFF_MAX or one that wraps the address space.
    PF_ERR_INVALID_ARGUMENT = -2,
    /// A size-prefixed struct's `struct_size` is smaller than the first
    /// version of that struct.
    PF_ERR_STRUCT_TOO_SMALL = -3,
    /// A caller buffer is too small; the call reported the size it needs.
    PF_ERR_BUFFER_TOO_SMALL = -4,
    /// An index is not below the number of items (e.g. a region index).
    PF_ERR_OUT_OF_RANGE = -5,
    /// The region list cannot become guest memory: empty, a zero-sized or
    /// misaligned region, overlapping regions, or one that wraps past 2^64.
    PF_ERR_LAYOUT = -6,
    /// A guest-physical address of the access is not backed by any region.
    PF_ERR_UNMAPPED = -7,
    /// An atomic access to an address that is not a multiple of its size, or
    /// a page-granular operation on a range not aligned to the page size.
    PF_ERR_MISALIGNED = -8,
    /// `address + length` wraps past 2^64, or a size does not fit this host.
    PF_ERR_OVERFLOW = -9,
    /// The page is write-protected by a layer that has no way to resolve
    /// library writes installed.
    PF_ERR_WRITE_PROTECTED = -10,
    /// Hugetlb backing was asked for but the kernel has no huge pages of that
    /// size to give (see /sys/kernel/mm/hugepages).
    PF_ERR_NO_HUGE_PAGES = -11,
    /// A system call failed; the message names it and the OS error.
    PF_ERR_OS = -12,
    /// pagefold panicked; the message says where. The library stays usable,
    /// but a handle passed to the call that panicked should only be freed.
    PF_ERR_PANIC = -13,
    /// An invariant inside pagefold failed (a bug; please report it).
    PF_ERR_INTERNAL = -14,
    /// No VM with this id is registered with the dedup host (never was, or
    /// was unregistered).
    PF_ERR_UNKNOWN_VM = -15,
    /// No longer returned (ABI 0.10): a dedup host now takes VMs whose
    /// memory lives in a store of their own. The number stays reserved.
    PF_ERR_FOREIGN_STORE = -16,
    /// userfaultfd write protection, which dedup needs, is unavailable (no
    /// userfaultfd syscall, no privilege for kernel-mode faults: needs
    /// CAP_SYS_PTRACE or vm.unprivileged_userfaultfd = 1, no shmem write
    /// protect in this kernel) or one of its operations failed; the message
    /// says which.
    PF_ERR_USERFAULT = -17,
    /// Another operation held the page for too long; try again.
    PF_ERR_BUSY = -18,
    /// The operation does not support this configuration, e.g. dedup on a
    /// hugetlb-backed frame store (dedup needs 4 KiB pages).
    PF_ERR_UNSUPPORTED = -19,
    /// A guest page-table walk faulted (not present, permission, reserved
    /// bits, a second-level fault, ...); the call's `pf_walk_fault` says
    /// which, with the code a VMM would inject or report.
    PF_ERR_FAULT = -20,
    /// A migration stream is not one this library can read, or is damaged:
    /// not a pagefold stream, an unknown format version, truncated, a chunk
    /// that fails its checksum, a malformed record, a layout over the
    /// receiver's limits, or a memory digest that does not match. The
    /// partial memory was discarded; the message says what and where.
    PF_ERR_STREAM = -21,
    /// The operation was cancelled (a migration sender's cancel, cancel
    /// token or progress callback).
    PF_ERR_CANCELLED = -22,
    /// The process's kernel mappings (`vm.max_map_count`, less the dedup
    /// host's headroom) are used up: the pages stay as they were (merged
    /// pages merged); unmerge, or raise the limit.
    PF_ERR_MAP_LIMIT = -23,
    /// The host service refused this process (not an allowed user, the
    /// service's VM limit reached, guest memory over its limit, ...); the
    /// message carries the service's reason. ABI 0.10.
    PF_ERR_SERVICE_REFUSED = -24,
    /// The host service, or a process attached to it, broke the service
    /// protocol (an unexpected or malformed message, another protocol
    /// version) or closed the connection in the middle of an exchange; the
    /// message says what came. ABI 0.10.
    PF_ERR_SERVICE_PROTOCOL = -25,
    /// A snapshot file is not one this library can read, or is damaged:
    /// not a pagefold snapshot, another format version, truncated, a part
    /// that fails its checksum, a stored page that does not match its
    /// content address, a malformed header, map or table, an id that does
    /// not match the contents; or a guest larger than the restore's
    /// `max_guest_bytes`; or a working-set file that cannot be read,
    /// written or parsed. The message names the file, the part and the
    /// byte offset. ABI 0.11.
    PF_ERR_SNAPSHOT = -26,
    /// Things that must belong together do not: a memory whose region
    /// layout is not the snapshot's, or a snapshot chain whose files are
    /// not parent and child (another parent, a full snapshot given a
    /// parent, layouts that differ, a page in an ancestor that was not
    /// opened with it). The message says which. ABI 0.11.
    PF_ERR_MISMATCH = -27,
}

impl pf_status {
    /// Every status, in order of value from 0 down.
    pub(crate) const ALL: [pf_status; 28] = [
        pf_status::PF_OK,
        pf_status::PF_ERR_NULL_POINTER,
        pf_status::PF_ERR_INVALID_ARGUMENT,
        pf_status::PF_ERR_STRUCT_TOO_SMALL,
        pf_status::PF_ERR_BUFFER_TOO_SMALL,
        pf_status::PF_ERR_OUT_OF_RANGE,
        pf_status::PF_ERR_LAYOUT,
        pf_status::PF_ERR_UNMAPPED,
        pf_status::PF_ERR_MISALIGNED,
        pf_status::PF_ERR_OVERFLOW,
        pf_status::PF_ERR_WRITE_PROTECTED,
        pf_status::PF_ERR_NO_HUGE_PAGES,
        pf_status::PF_ERR_OS,
        pf_status::PF_ERR_PANIC,
        pf_status::PF_ERR_INTERNAL,
        pf_status::PF_ERR_UNKNOWN_VM,
        pf_status::PF_ERR_FOREIGN_STORE,
        pf_status::PF_ERR_USERFAULT,
        pf_status::PF_ERR_BUSY,
        pf_status::PF_ERR_UNSUPPORTED,
        pf_status::PF_ERR_FAULT,
        pf_status::PF_ERR_STREAM,
        pf_status::PF_ERR_CANCELLED,
        pf_status::PF_ERR_MAP_LIMIT,
        pf_status::PF_ERR_SERVICE_REFUSED,
        pf_status::PF_ERR_SERVICE_PROTOCOL,
        pf_status::PF_ERR_SNAPSHOT,
        pf_status::PF_ERR_MISMATCH,
    ];

    /// The constant's name as it appears in the header, NUL-terminated.
    pub(crate) const fn name(self) -> &'static std::ffi::CStr {
        match self {
            pf_status::PF_OK => c"PF_OK",
            pf_status::PF_ERR_NULL_POINTER => c"PF_ERR_NULL_POINTER",
            pf_status::PF_ERR_INVALID_ARGUMENT => c"PF_ERR_INVALID_ARGUMENT",
            pf_status::PF_ERR_STRUCT_TOO_SMALL => c"PF_ERR_STRUCT_TOO_SMALL",
            pf_status::PF_ERR_BUFFER_TOO_SMALL => c"PF_ERR_BUFFER_TOO_SMALL",
            pf_status::PF_ERR_OUT_OF_RANGE => c"PF_ERR_OUT_OF_RANGE",
            pf_status::PF_ERR_LAYOUT => c"PF_ERR_LAYOUT",
            pf_status::PF_ERR_UNMAPPED => c"PF_ERR_UNMAPPED",
            pf_status::PF_ERR_MISALIGNED => c"PF_ERR_MISALIGNED",
            pf_status::PF_ERR_OVERFLOW => c"PF_ERR_OVERFLOW",
            pf_status::PF_ERR_WRITE_PROTECTED => c"PF_ERR_WRITE_PROTECTED",
            pf_status::PF_ERR_NO_HUGE_PAGES => c"PF_ERR_NO_HUGE_PAGES",
            pf_status::PF_ERR_OS => c"PF_ERR_OS",
            pf_status::PF_ERR_PANIC => c"PF_ERR_PANIC",
            pf_status::PF_ERR_INTERNAL => c"PF_ERR_INTERNAL",
            pf_status::PF_ERR_UNKNOWN_VM => c"PF_ERR_UNKNOWN_VM",
            pf_status::PF_ERR_FOREIGN_STORE => c"PF_ERR_FOREIGN_STORE",
            pf_status::PF_ERR_USERFAULT => c"PF_ERR_USERFAULT",
            pf_status::PF_ERR_BUSY => c"PF_ERR_BUSY",
            pf_status::PF_ERR_UNSUPPORTED => c"PF_ERR_UNSUPPORTED",
            pf_status::PF_ERR_FAULT => c"PF_ERR_FAULT",
            pf_status::PF_ERR_STREAM => c"PF_ERR_STREAM",
            pf_status::PF_ERR_CANCELLED => c"PF_ERR_CANCELLED",
            pf_status::PF_ERR_MAP_LIMIT => c"PF_ERR_MAP_LIMIT",
            pf_status::PF_ERR_SERVICE_REFUSED => c"PF_ERR_SERVICE_REFUSED",
            pf_status::PF_ERR_SERVICE_PROTOCOL => c"PF_ERR_SERVICE_PROTOCOL",
            pf_status::PF_ERR_SNAPSHOT => c"PF_ERR_SNAPSHOT",
            pf_status::PF_ERR_MISMATCH => c"PF_ERR_MISMATCH",
        }
    }
}

/// The name of a status code as a static NUL-terminated string, e.g.
/// `"PF_ERR_UNMAPPED"` for `PF_ERR_UNMAPPED`, or `"PF_UNKNOWN_STATUS"` for a
/// value this library does not define. Never NULL; never freed by the caller.
/// Takes an `int32_t` rather than a `pf_status` so that any value is safe.
#[no_mangle]
pub extern "C" fn pf_status_name(status: i32) -> *const c_char {
    ffi_boundary! { returns *const c_char;
        pf_status::ALL
            .iter()
            .find(|s| **s as i32 == status)
            .map_or(c"PF_UNKNOWN_STATUS", |s| s.name())
            .as_ptr()
    }
}

/// A failed call: the status it returns and the message it leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Error {
    pub(crate) status: pf_status,
    pub(crate) message: String,
}

impl Error {
    pub(crate) fn new(status: pf_status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    /// A required pointer argument `arg` was NULL.
    pub(crate) fn null(arg: &str) -> Self {
        Error::new(
            pf_status::PF_ERR_NULL_POINTER,
            format!("argument `{arg}` is NULL"),
        )
    }

    pub(crate) fn invalid(message: impl fmt::Display) -> Self {
        Error::new(pf_status::PF_ERR_INVALID_ARGUMENT, message.to_string())
    }
}

pub(crate) fn frame_status(e: &FrameError) -> pf_status {
    match e {
        FrameError::Os { .. } => pf_status::PF_ERR_OS,
        FrameError::TooLarge { .. } => pf_status::PF_ERR_OVERFLOW,
        FrameError::NoHugePages { .. } => pf_status::PF_ERR_NO_HUGE_PAGES,
        FrameError::MapLimit { .. } => pf_status::PF_ERR_MAP_LIMIT,
        // A descriptor another process handed over (the host service's
        // side) is not a sealed 4 KiB memfd.
        FrameError::NotAdoptable { .. } | FrameError::Reserved { .. } => {
            pf_status::PF_ERR_INVALID_ARGUMENT
        }
        // A feature asked of anonymous memory (no file to punch or share).
        FrameError::NeedsFile { .. } => pf_status::PF_ERR_UNSUPPORTED,
        // Guest memory validates ranges before the frame store sees them.
        FrameError::Empty | FrameError::Misaligned { .. } | FrameError::NotAllocated { .. } => {
            pf_status::PF_ERR_INTERNAL
        }
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Error::new(frame_status(&e), e.to_string())
    }
}

/// The status of a memory creation error.
pub(crate) fn memory_status(e: &MemoryError) -> pf_status {
    match e {
        MemoryError::Layout(_) => pf_status::PF_ERR_LAYOUT,
        MemoryError::Frames(f) => frame_status(f),
    }
}

/// The status of a refused guest memory access.
pub(crate) fn access_status(e: &AccessError) -> pf_status {
    match e {
        AccessError::Unmapped { .. } => pf_status::PF_ERR_UNMAPPED,
        AccessError::Overflow { .. } => pf_status::PF_ERR_OVERFLOW,
        AccessError::Misaligned { .. } => pf_status::PF_ERR_MISALIGNED,
        AccessError::WriteProtected { .. } => pf_status::PF_ERR_WRITE_PROTECTED,
        // The C ABI's atomics always pass SeqCst.
        AccessError::Ordering { .. } => pf_status::PF_ERR_INVALID_ARGUMENT,
        AccessError::Frames(f) => frame_status(f),
    }
}

impl From<MemoryError> for Error {
    fn from(e: MemoryError) -> Self {
        Error::new(memory_status(&e), e.to_string())
    }
}

impl From<AccessError> for Error {
    fn from(e: AccessError) -> Self {
        Error::new(access_status(&e), e.to_string())
    }
}

pub(crate) fn dedup_status(e: &DedupError) -> pf_status {
    match e {
        DedupError::Userfault(_) => pf_status::PF_ERR_USERFAULT,
        DedupError::Frames(f) => frame_status(f),
        DedupError::Random(_) | DedupError::Proc { .. } => pf_status::PF_ERR_OS,
        DedupError::HugeBacking(_) => pf_status::PF_ERR_UNSUPPORTED,
        DedupError::UnknownVm(_) => pf_status::PF_ERR_UNKNOWN_VM,
        DedupError::AlreadyRegistered | DedupError::NoSuchRegion(_) | DedupError::EmptyBudget => {
            pf_status::PF_ERR_INVALID_ARGUMENT
        }
        DedupError::Unmapped(_) => pf_status::PF_ERR_UNMAPPED,
        DedupError::Busy(_) => pf_status::PF_ERR_BUSY,
        // A VM restored lazily onto an image still arriving: unregister or
        // unmerge it once its restore's wait returned.
        DedupError::Arriving(_) => pf_status::PF_ERR_BUSY,
        // The lazy restore publishes an image only once every page is in.
        DedupError::NotArrived(_) => pf_status::PF_ERR_INTERNAL,
        // A VMM process under the host service did not answer in time:
        // its window was rolled back, the pages stay as they were.
        DedupError::Remote(RemoteError::RolledBack { .. }) => pf_status::PF_ERR_BUSY,
        // The process is gone or said it failed.
        DedupError::Remote(_) => pf_status::PF_ERR_SERVICE_PROTOCOL,
    }
}

impl From<DedupError> for Error {
    fn from(e: DedupError) -> Self {
        Error::new(dedup_status(&e), e.to_string())
    }
}

/// The status of a host service or service client error.
pub(crate) fn service_status(e: &ServiceError) -> pf_status {
    match e {
        // The peer closing the socket mid-frame is the protocol's concern.
        ServiceError::Wire(WireError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            pf_status::PF_ERR_SERVICE_PROTOCOL
        }
        ServiceError::Os { .. } | ServiceError::Wire(WireError::Io { .. }) => pf_status::PF_ERR_OS,
        // What the client was given is not what the service can take: the
        // memory shares its store, or is under a dedup engine already.
        ServiceError::BadMemory { .. } => pf_status::PF_ERR_INVALID_ARGUMENT,
        ServiceError::Refused { .. } | ServiceError::NotAllowed { .. } => {
            pf_status::PF_ERR_SERVICE_REFUSED
        }
        ServiceError::Wire(_) | ServiceError::Unexpected { .. } | ServiceError::Closed => {
            pf_status::PF_ERR_SERVICE_PROTOCOL
        }
        ServiceError::Frames(f) => frame_status(f),
        ServiceError::Memory(m) => memory_status(m),
        ServiceError::Dedup(d) => dedup_status(d),
        ServiceError::Userfault(_) => pf_status::PF_ERR_USERFAULT,
        // `ServiceError` is non-exhaustive: a kind added later without a
        // code of its own here is reported, not hidden.
        _ => pf_status::PF_ERR_INTERNAL,
    }
}

impl From<ServiceError> for Error {
    fn from(e: ServiceError) -> Self {
        Error::new(service_status(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    #[test]
    fn core_errors_map_to_their_codes() {
        use pagefold::{GuestPhysAddr, LayoutError, PageSize};
        let a = GuestPhysAddr(0x5000);
        let os = || FrameError::Os {
            op: "mmap",
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        };
        let cases: [(Error, pf_status); 10] = [
            (
                AccessError::Unmapped { addr: a }.into(),
                pf_status::PF_ERR_UNMAPPED,
            ),
            (
                AccessError::Overflow { addr: a, len: 1 }.into(),
                pf_status::PF_ERR_OVERFLOW,
            ),
            (
                AccessError::Misaligned { addr: a, align: 8 }.into(),
                pf_status::PF_ERR_MISALIGNED,
            ),
            (
                AccessError::WriteProtected { addr: a }.into(),
                pf_status::PF_ERR_WRITE_PROTECTED,
            ),
            (AccessError::Frames(os()).into(), pf_status::PF_ERR_OS),
            (
                MemoryError::Layout(LayoutError::NoRegions).into(),
                pf_status::PF_ERR_LAYOUT,
            ),
            (
                MemoryError::Frames(FrameError::NoHugePages {
                    size: PageSize::Size2M,
                })
                .into(),
                pf_status::PF_ERR_NO_HUGE_PAGES,
            ),
            (
                FrameError::TooLarge { frames: 1 << 50 }.into(),
                pf_status::PF_ERR_OVERFLOW,
            ),
            (FrameError::Empty.into(), pf_status::PF_ERR_INTERNAL),
            (os().into(), pf_status::PF_ERR_OS),
        ];
        for (e, want) in cases {
            assert_eq!(e.status, want, "{}", e.message);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn dedup_errors_map_to_their_codes() {
        use pagefold::{userfault::UserfaultError, GuestPhysAddr, PageSize, VmId};
        let io = || std::io::Error::from_raw_os_error(libc::ENOSYS);
        let cases: [(DedupError, pf_status); 9] = [
            (
                UserfaultError::Unavailable(io()).into(),
                pf_status::PF_ERR_USERFAULT,
            ),
            (
                UserfaultError::NoShmemWriteProtect { features: 0 }.into(),
                pf_status::PF_ERR_USERFAULT,
            ),
            (
                FrameError::TooLarge { frames: 1 }.into(),
                pf_status::PF_ERR_OVERFLOW,
            ),
            (
                DedupError::Random("no entropy".into()),
                pf_status::PF_ERR_OS,
            ),
            (
                DedupError::HugeBacking(PageSize::Size2M),
                pf_status::PF_ERR_UNSUPPORTED,
            ),
            (DedupError::UnknownVm(VmId(7)), pf_status::PF_ERR_UNKNOWN_VM),
            (
                DedupError::Unmapped(GuestPhysAddr(0x1000)),
                pf_status::PF_ERR_UNMAPPED,
            ),
            (
                DedupError::Busy(GuestPhysAddr(0x1000)),
                pf_status::PF_ERR_BUSY,
            ),
            (
                DedupError::Proc {
                    what: "/proc/self/pagemap",
                    source: io(),
                },
                pf_status::PF_ERR_OS,
            ),
        ];
        for (e, want) in cases {
            let e = Error::from(e);
            assert_eq!(e.status, want, "{}", e.message);
            assert!(!e.message.is_empty());
        }
        let e = Error::from(DedupError::UnknownVm(VmId(7)));
        assert_eq!(e.message, "VM 7 is not registered with this dedup host");
    }

    #[test]
    fn service_errors_map_to_their_codes() {
        use pagefold::userfault::UserfaultError;
        let io = |errno| std::io::Error::from_raw_os_error(errno);
        let cases: [(ServiceError, pf_status); 10] = [
            (
                ServiceError::Os {
                    op: "connect to the service",
                    source: io(libc::ENOENT),
                },
                pf_status::PF_ERR_OS,
            ),
            (
                WireError::Io {
                    op: "send",
                    source: io(libc::EPIPE),
                }
                .into(),
                pf_status::PF_ERR_OS,
            ),
            (
                WireError::Io {
                    op: "recv",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                }
                .into(),
                pf_status::PF_ERR_SERVICE_PROTOCOL,
            ),
            (
                WireError::UnknownKind { kind: 99 }.into(),
                pf_status::PF_ERR_SERVICE_PROTOCOL,
            ),
            (ServiceError::Closed, pf_status::PF_ERR_SERVICE_PROTOCOL),
            (
                ServiceError::Unexpected {
                    expected: "Welcome",
                    got: "Remap",
                },
                pf_status::PF_ERR_SERVICE_PROTOCOL,
            ),
            (
                ServiceError::Refused {
                    code: 2,
                    text: "the service holds its maximum of 1 VMs".into(),
                },
                pf_status::PF_ERR_SERVICE_REFUSED,
            ),
            (
                ServiceError::NotAllowed { pid: 1, uid: 1000 },
                pf_status::PF_ERR_SERVICE_REFUSED,
            ),
            (
                ServiceError::BadMemory {
                    what: "the guest memory is registered with a dedup host already".into(),
                },
                pf_status::PF_ERR_INVALID_ARGUMENT,
            ),
            (
                UserfaultError::Unavailable(io(libc::ENOSYS)).into(),
                pf_status::PF_ERR_USERFAULT,
            ),
        ];
        for (e, want) in cases {
            let e = Error::from(e);
            assert_eq!(e.status, want, "{}", e.message);
            assert!(!e.message.is_empty());
        }
        let e = Error::from(ServiceError::Refused {
            code: 3,
            text: "process 1 (uid 1000) may not use this service".into(),
        });
        assert!(
            e.message.contains("may not use this service"),
            "{}",
            e.message
        );
    }

    #[test]
    fn codes_are_dense_and_names_match() {
        for (i, s) in pf_status::ALL.iter().enumerate() {
            assert_eq!(i32::try_from(i).map(|i| -i), Ok(*s as i32), "{s:?}");
            assert_eq!(s.name().to_str().ok(), Some(format!("{s:?}").as_str()));
            // SAFETY: pf_status_name returns a static NUL-terminated string.
            let n = unsafe { CStr::from_ptr(pf_status_name(*s as i32)) };
            assert_eq!(n, s.name());
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(pf_status_name(12345)) };
        assert_eq!(unknown, c"PF_UNKNOWN_STATUS");
    }
}

//! A process-wide memory barrier: after [`heavy`] returns, every other thread
//! of the process has executed a full fence since the call began, so a store
//! it made before its last compiler fence is visible here. It lets the
//! marking fast path stay free of CPU fences (see `bitmap.rs`).
//!
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (Linux 4.14+) interrupts
//! the CPUs now running this process's threads; threads not running have
//! passed a context switch, a full barrier. Where it is missing (old
//! kernels, seccomp filters, valgrind), the fallback is the one .NET and
//! folly use: changing the protection of a touched private page makes the
//! kernel shoot down its TLB entry on every CPU that runs this address
//! space, by interrupt, which serialises those CPUs.

use std::sync::{Mutex, OnceLock, PoisonError};

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

enum Kind {
    Membarrier,
    /// A private page, touched and re-protected under the mutex.
    Mprotect(Mutex<usize>),
    /// Neither works: fall back to a local fence and yield (only reachable
    /// if `mmap` of one page fails).
    Local,
}

static KIND: OnceLock<Kind> = OnceLock::new();

fn probe() -> Kind {
    // SAFETY: a plain syscall with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
            0,
            0,
        )
    };
    if rc == 0 {
        return Kind::Membarrier;
    }
    // SAFETY: an anonymous private mapping of one page at an address the
    // kernel picks; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Kind::Local;
    }
    Kind::Mprotect(Mutex::new(p as usize))
}

/// Which mechanism this process uses, for diagnostics.
pub(crate) fn mechanism() -> &'static str {
    match KIND.get_or_init(probe) {
        Kind::Membarrier => "membarrier",
        Kind::Mprotect(_) => "mprotect",
        Kind::Local => "local",
    }
}

/// Runs a full memory barrier on every thread of the process.
pub(crate) fn heavy() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match KIND.get_or_init(probe) {
        Kind::Membarrier => {
            // SAFETY: a plain syscall with integer arguments; the process
            // registered for it in `probe`.
            let rc = unsafe {
                libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)
            };
            debug_assert_eq!(rc, 0, "membarrier after registration");
        }
        Kind::Mprotect(page) => {
            let page = page.lock().unwrap_or_else(PoisonError::into_inner);
            let p = *page as *mut libc::c_void;
            // SAFETY: `p` is the page mapped in `probe`, never unmapped;
            // the mutex serialises its protection changes and the write.
            unsafe {
                libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_WRITE);
                p.cast::<u8>().write_volatile(1);
                libc::mprotect(p, 4096, libc::PROT_NONE);
            }
        }
        Kind::Local => std::thread::yield_now(),
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

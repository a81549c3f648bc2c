//! Helpers of the lazy-restore tests: reading a page through its raw host
//! pointer (a first touch, as a guest's), and a fetch hook that holds the
//! background fetch until the test opens a gate, so the touches before
//! are served on fault.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pagefold::{
    snapshot::{FetchHook, LazyFoldOptions, LazyOptions},
    GuestMemory, GuestPhysAddr, PAGE_SIZE,
};

/// Reads a page through its raw host pointer (faulting it in).
pub(crate) fn touch(mem: &GuestMemory, gpa: GuestPhysAddr) -> Vec<u8> {
    let hva = mem.host_address(gpa).unwrap().0 as *const u8;
    let mut out = vec![0u8; PAGE_SIZE];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: `hva` is the page's host address in a live mapping of
        // the memory, which outlives this call.
        *b = unsafe { std::ptr::read_volatile(hva.add(i)) };
    }
    out
}

/// A hook that holds the fetch thread until `gate` opens, or 30 s pass,
/// after which it stays open: a test that failed with the gate shut does
/// not hold the fetch (and its drop) for every page.
pub(crate) fn gated(gate: &Arc<AtomicBool>) -> FetchHook {
    let gate = Arc::clone(gate);
    Arc::new(move |_| {
        let t0 = Instant::now();
        while !gate.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.store(true, Ordering::Release);
    })
}

/// Folded lazy restore options whose fetch waits for `gate`.
pub(crate) fn gated_options(gate: &Arc<AtomicBool>) -> LazyFoldOptions {
    LazyFoldOptions {
        lazy: LazyOptions {
            on_fetch: Some(gated(gate)),
            ..LazyOptions::default()
        },
        ..LazyFoldOptions::default()
    }
}
